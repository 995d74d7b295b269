// The chat: one controller behind the page at `/` and the embeddable widget. It talks to the
// gateway's OpenAI-compatible API (sessions, models, streams) and renders answers as they
// arrive. The DOM it builds follows the selector contract in docs/web.md.

import { HttpError, followStream, httpError, readAnswer } from "./stream.js";
import { ChatSocket, socketUrl } from "./socket.js";
import { MarkdownView } from "./render.js";

const KEY_STORAGE = "unbroken.gateway-key";
const SESSION_STORAGE = "unbroken.session";
const MODEL_STORAGE = "unbroken.model";
// A whole answer whose tokens all arrive within this spread after this long a wait means
// something between us and the gateway held the stream back (a buffering proxy).
const BUFFERED_SPREAD_MS = 50;
const BUFFERED_WAIT_MS = 1500;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children);
  return el;
}

function storage(kind) {
  try {
    return kind === "session" ? window.sessionStorage : window.localStorage;
  } catch (_) {
    return null; // storage disabled (third-party context, privacy mode)
  }
}

function formatCost(usd) {
  if (usd === null || usd === undefined) return null;
  if (usd === 0) return "$0";
  return usd < 0.01 ? `$${usd.toPrecision(2)}` : `$${usd.toFixed(4)}`;
}

/** The chat controller. `mountChat` builds one inside `root` (an element or shadow root). */
class Chat {
  constructor(root, options) {
    this.root = root;
    this.base = options.base || "";
    this.mode = options.mode || "page";
    this.getToken = options.getToken || null;
    this.persist = options.persist !== false;
    this.sessionId = null;
    this.stored = 0; // messages the server holds for this session
    this.items = []; // {role, content, reasoning, state, el, at, meta}
    this.active = null; // the answer being streamed
    this.prices = {};
    this.authRequired = false;
    // "sse", or "websocket" once an answer came all at once through a buffering proxy: then
    // every later answer of this page goes over /v1/chat/ws (for the page's lifetime).
    this.transport = "sse";
    this.socket = null;
    this.build();
  }

  // -- DOM ------------------------------------------------------------------------------------

  build() {
    this.list = h("ul", { class: "ub-session-list" });
    this.sidebar = h(
      "nav",
      { class: "ub-sessions", "aria-label": "Conversations", id: "ub-sessions" },
      h("button", { type: "button", class: "ub-new", "aria-label": "New chat", onclick: () => this.newChat() }, "+ New chat"),
      this.list,
    );
    this.toggle = h("button", {
      type: "button",
      class: "ub-toggle",
      "aria-label": "Conversations",
      "aria-controls": "ub-sessions",
      "aria-expanded": "false",
      onclick: () => this.toggleSidebar(),
    }, "☰");
    this.model = h("select", { class: "ub-model", "aria-label": "Model", onchange: () => storage("session")?.setItem(MODEL_STORAGE, this.model.value) });
    this.titleEl = h("h1", { class: "ub-title" }, "Chat");
    const header = h("header", { class: "ub-header" }, this.toggle, this.titleEl, this.model);
    this.keyInput = h("input", { type: "password", autocomplete: "off", "aria-label": "Gateway key", placeholder: "Gateway key or token" });
    this.keyNote = h("p", { class: "ub-key-note" }, "This gateway needs a key. It is kept in this tab only (sessionStorage).");
    this.keyForm = h(
      "form",
      { class: "ub-key", hidden: true, onsubmit: (e) => this.submitKey(e) },
      this.keyNote,
      h("div", { class: "ub-key-row" }, this.keyInput, h("button", { type: "submit" }, "Use key")),
    );
    this.log = h("div", { class: "ub-messages", role: "log", "aria-live": "polite", "aria-label": "Conversation", tabindex: "0" });
    this.notice = h("div", { class: "ub-notice", role: "status", hidden: true });
    this.input = h("textarea", { "aria-label": "Message", rows: "1", placeholder: "Type a message…", title: "Enter sends; Shift+Enter adds a line" });
    this.sendButton = h("button", { type: "submit", class: "ub-send", "aria-label": "Send", title: "Send (Enter)" }, "➤");
    this.stopButton = h("button", { type: "button", class: "ub-stop", "aria-label": "Stop", title: "Stop (Esc)", hidden: true, onclick: () => this.stop() }, "Stop");
    this.composer = h(
      "form",
      { class: "ub-composer", onsubmit: (e) => { e.preventDefault(); this.submit(); } },
      this.input,
      this.stopButton,
      this.sendButton,
    );
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        this.submit();
      }
    });
    this.input.addEventListener("input", () => this.autosize());
    const main = h("main", { class: "ub-main" }, header, this.keyForm, this.log, this.notice, this.composer);
    this.app = h("div", { class: "ub-app", "data-mode": this.mode }, this.sidebar, main);
    this.app.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && this.active) {
        e.preventDefault();
        this.stop();
      }
    });
    if (this.mode === "page") {
      document.addEventListener("keydown", (e) => {
        if (e.key === "Escape" && this.active && !this.app.contains(e.target)) this.stop();
      });
    }
    this.root.append(this.app);
  }

  autosize() {
    this.input.style.height = "auto";
    this.input.style.height = `${Math.min(this.input.scrollHeight, 200)}px`;
  }

  toggleSidebar(open) {
    const expanded = open ?? this.toggle.getAttribute("aria-expanded") !== "true";
    this.toggle.setAttribute("aria-expanded", String(expanded));
    this.app.classList.toggle("ub-sidebar-open", expanded);
  }

  say(text) {
    this.notice.textContent = text || "";
    this.notice.hidden = !text;
  }

  // -- HTTP -----------------------------------------------------------------------------------

  async secret() {
    if (this.getToken) return this.getToken();
    return storage("session")?.getItem(KEY_STORAGE) || null;
  }

  async headers(extra = {}) {
    const headers = { ...extra };
    const secret = await this.secret();
    if (secret) headers.Authorization = `Bearer ${secret}`;
    return headers;
  }

  /** Send the next answers over the WebSocket (SSE is buffered on the way). */
  useWebSocket() {
    this.transport = "websocket";
    this.app.dataset.transport = "websocket";
    this.socket = this.socket || new ChatSocket({ url: socketUrl(this.base), getSecret: () => this.secret() });
  }

  async api(method, path, body) {
    const headers = await this.headers(body === undefined ? {} : { "Content-Type": "application/json" });
    const response = await fetch(`${this.base}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    if (!response.ok) {
      const error = await httpError(response);
      if (error.status === 401) this.askKey(error.message);
      throw error;
    }
    return response.json();
  }

  askKey(message) {
    if (this.getToken) return; // the widget's token comes from the shop
    this.keyNote.textContent = message
      ? `${message}. The key is kept in this tab only (sessionStorage).`
      : "This gateway needs a key. It is kept in this tab only (sessionStorage).";
    this.keyForm.hidden = false;
    this.keyInput.focus();
  }

  async submitKey(event) {
    event.preventDefault();
    const key = this.keyInput.value.trim();
    if (!key) return;
    storage("session")?.setItem(KEY_STORAGE, key);
    this.keyInput.value = "";
    this.keyForm.hidden = true;
    await this.start();
  }

  // -- start, sessions ------------------------------------------------------------------------

  async start() {
    try {
      const config = await (await fetch(`${this.base}/ui/config.json`, { cache: "no-store" })).json();
      this.prices = config.prices_usd_per_million || {};
      this.authRequired = config.auth !== "none";
    } catch (_) {
      // an older gateway: no prices, ask for a key on the first 401
    }
    if (this.authRequired && !this.getToken && !storage("session")?.getItem(KEY_STORAGE)) {
      this.askKey();
      return;
    }
    try {
      const models = await this.api("GET", "/v1/models");
      const wanted = storage("session")?.getItem(MODEL_STORAGE);
      this.model.replaceChildren(...models.data.map((m) => h("option", { value: m.id }, m.id)));
      if (wanted && models.data.some((m) => m.id === wanted)) this.model.value = wanted;
      await this.refreshSessions();
      const saved = this.persist ? storage("session")?.getItem(SESSION_STORAGE) : null;
      if (saved) await this.openSession(saved);
    } catch (error) {
      if (!(error instanceof HttpError && error.status === 401)) this.say(`Cannot reach the gateway: ${error.message}`);
    }
    this.app.dataset.ready = "true";
  }

  async refreshSessions() {
    const sessions = await this.api("GET", "/v1/sessions");
    this.list.replaceChildren(
      ...sessions.data.map((s) => {
        const title = s.title || "New chat";
        const open = h("button", { type: "button", class: "ub-session-open", onclick: () => this.openSession(s.id) }, title);
        if (s.id === this.sessionId) open.setAttribute("aria-current", "true");
        return h(
          "li",
          { "data-session-id": s.id },
          open,
          h("button", { type: "button", class: "ub-icon", "aria-label": "Rename", title: "Rename", onclick: (e) => this.renameSession(s, e.currentTarget.parentElement) }, "✎"),
          h("button", { type: "button", class: "ub-icon", "aria-label": "Delete", title: "Delete", onclick: () => this.deleteSession(s.id) }, "✕"),
        );
      }),
    );
  }

  renameSession(session, item) {
    const field = h("input", { type: "text", value: session.title || "", "aria-label": "Title", maxlength: "200" });
    const form = h("form", { class: "ub-rename" }, field);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        await this.api("PATCH", `/v1/sessions/${encodeURIComponent(session.id)}`, { title: field.value.trim() });
        if (session.id === this.sessionId) this.titleEl.textContent = field.value.trim() || "Chat";
      } catch (error) {
        this.say(`Could not rename: ${error.message}`);
      }
      await this.refreshSessions();
    });
    field.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.stopPropagation();
        this.refreshSessions();
      }
    });
    item.replaceChildren(form);
    field.focus();
    field.select();
  }

  async deleteSession(id) {
    try {
      await this.api("DELETE", `/v1/sessions/${encodeURIComponent(id)}`);
    } catch (error) {
      this.say(`Could not delete: ${error.message}`);
    }
    if (id === this.sessionId) this.newChat();
    await this.refreshSessions();
  }

  newChat() {
    this.stop();
    this.sessionId = null;
    this.stored = 0;
    this.items = [];
    this.log.replaceChildren();
    this.titleEl.textContent = "Chat";
    storage("session")?.removeItem(SESSION_STORAGE);
    this.say("");
    this.toggleSidebar(false);
    this.refreshSessions().catch(() => {});
    this.input.focus();
  }

  async openSession(id) {
    let session;
    try {
      session = await this.api("GET", `/v1/sessions/${encodeURIComponent(id)}`);
    } catch (error) {
      if (error instanceof HttpError && error.status === 404) storage("session")?.removeItem(SESSION_STORAGE);
      else this.say(`Could not open the conversation: ${error.message}`);
      return;
    }
    this.stop();
    this.sessionId = session.id;
    storage("session")?.setItem(SESSION_STORAGE, session.id);
    this.titleEl.textContent = session.title || "Chat";
    if (session.model && [...this.model.options].some((o) => o.value === session.model)) this.model.value = session.model;
    this.items = [];
    this.log.replaceChildren();
    session.messages.forEach((m, index) => {
      if (m.role === "user") this.addUser(typeof m.content === "string" ? m.content : "", index);
      else if (m.role === "assistant") {
        const item = this.addAssistant();
        item.content = m.content || "";
        item.reasoning = m.reasoning_content || "";
        this.paint(item);
        this.finish(item, "done");
      }
    });
    this.stored = session.messages.length;
    this.toggleSidebar(false);
    this.refreshSessions().catch(() => {});
    const live = session.stream_id || session.live_stream_id || null;
    if (live) this.follow(live);
  }

  // -- messages -------------------------------------------------------------------------------

  addUser(text, at) {
    const content = h("div", { class: "ub-content", "data-part": "content" });
    content.textContent = text;
    const item = { role: "user", content: text, at, state: "done" };
    const actions = h(
      "div",
      { class: "ub-actions" },
      h("button", { type: "button", "aria-label": "Edit", title: "Edit and resend", onclick: () => this.edit(item) }, "Edit"),
      h("button", { type: "button", "aria-label": "Copy", title: "Copy", onclick: (e) => this.copy(item, e.currentTarget) }, "Copy"),
    );
    item.el = h("article", { class: "ub-msg", "data-role": "user", "aria-label": "You" }, content, actions);
    item.contentEl = content;
    this.items.push(item);
    this.log.append(item.el);
    return item;
  }

  addAssistant() {
    const reasoning = h("div", { class: "ub-reasoning-text", "data-part": "reasoning" });
    const summary = h("summary", {}, "Thinking…");
    const details = h("details", { class: "ub-reasoning", hidden: true, open: true }, summary, reasoning);
    const content = h("div", { class: "ub-content ub-markdown", "data-part": "content" });
    const error = h("div", { class: "ub-error", "data-part": "error", role: "alert", hidden: true });
    const meta = h("div", { class: "ub-meta", "data-part": "meta" });
    const item = {
      role: "assistant",
      content: "",
      reasoning: "",
      state: "streaming",
      contentEl: content,
      reasoningEl: reasoning,
      details,
      summary,
      errorEl: error,
      metaEl: meta,
      view: new MarkdownView(content),
      timing: {},
    };
    const actions = h(
      "div",
      { class: "ub-actions" },
      h("button", { type: "button", "aria-label": "Copy", title: "Copy", onclick: (e) => this.copy(item, e.currentTarget) }, "Copy"),
      h("button", { type: "button", "aria-label": "Regenerate", title: "Regenerate", onclick: () => this.regenerate(item) }, "Regenerate"),
    );
    item.actions = actions;
    item.el = h(
      "article",
      { class: "ub-msg", "data-role": "assistant", "data-state": "streaming", "aria-label": "Assistant", "aria-busy": "true" },
      details,
      content,
      error,
      meta,
      actions,
    );
    // Only a shopper's own click (or Enter/Space on the summary) keeps the block as they
    // left it; the automatic fold does not count.
    summary.addEventListener("click", () => {
      item.userToggled = true;
    });
    this.items.push(item);
    this.log.append(item.el);
    return item;
  }

  paint(item) {
    item.painted = false;
    if (item.reasoning && item.reasoningEl.textContent.length !== item.reasoning.length) {
      item.details.hidden = false;
      const shown = item.reasoningEl.textContent.length;
      if (item.reasoning.startsWith(item.reasoningEl.textContent)) item.reasoningEl.append(item.reasoning.slice(shown));
      else item.reasoningEl.textContent = item.reasoning;
    }
    if (item.content) {
      if (item.reasoning && !item.userToggled && item.details.open) item.details.open = false;
      item.view.update(item.content);
    }
    this.scrollDown();
  }

  schedulePaint(item) {
    if (item.paintQueued) return;
    item.paintQueued = true;
    // After every event of this read is in: one paint per read, before the next frame.
    queueMicrotask(() => {
      item.paintQueued = false;
      this.paint(item);
      if (item.timing.firstTokenAt !== undefined && item.timing.firstVisibleAt === undefined && !item.visibleQueued) {
        item.visibleQueued = true;
        // The frame after this DOM change is the one that shows it.
        requestAnimationFrame(() => {
          const channel = new MessageChannel();
          channel.port1.onmessage = () => {
            item.timing.firstVisibleAt = performance.now();
          };
          channel.port2.postMessage(null);
        });
      }
    });
  }

  scrollDown() {
    const log = this.log;
    if (log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
  }

  finish(item, state, message) {
    item.state = state;
    item.el.dataset.state = state;
    item.el.setAttribute("aria-busy", "false");
    if (item.reasoning) {
      const seconds = item.timing.thinkingEnd && item.timing.thinkingStart
        ? ` for ${((item.timing.thinkingEnd - item.timing.thinkingStart) / 1000).toFixed(1)} s`
        : "";
      item.summary.textContent = `Thought${seconds}`;
    }
    if (state === "error") {
      item.errorEl.hidden = false;
      item.errorEl.replaceChildren(
        h("span", { class: "ub-error-text" }, message || "The answer failed."),
        h("button", { type: "button", class: "ub-retry", "aria-label": "Retry", onclick: () => this.regenerate(item) }, "Retry"),
      );
    }
  }

  showMeta(item, model) {
    const parts = [];
    const t = item.timing;
    if (t.firstTokenAt !== undefined) parts.push(`TTFT ${((t.firstTokenAt - t.sentAt) / 1000).toFixed(2)} s`);
    const usage = item.usage;
    if (usage) {
      parts.push(`${usage.completion_tokens} tokens`);
      const price = this.prices[model];
      if (price) {
        const hit = usage.prompt_cache_hit_tokens ?? usage.prompt_tokens_details?.cached_tokens ?? 0;
        const miss = usage.prompt_cache_miss_tokens ?? Math.max(0, usage.prompt_tokens - hit);
        item.costUsd = (hit * price.cache_hit + miss * price.cache_miss + usage.completion_tokens * price.output) / 1e6;
        parts.push(formatCost(item.costUsd));
      }
    }
    if (item.stopped) parts.push("stopped");
    if (item.transport === "websocket") parts.push("via WebSocket");
    item.metaEl.textContent = parts.join(" · ");
  }

  // -- sending --------------------------------------------------------------------------------

  submit() {
    const text = this.input.value;
    if (!text.trim() || this.active) return;
    this.input.value = "";
    this.autosize();
    this.send(text);
  }

  async ensureSession(text) {
    if (this.sessionId) return this.sessionId;
    const session = await this.api("POST", "/v1/sessions", { model: this.model.value || undefined, title: text.trim().slice(0, 60) });
    this.sessionId = session.id;
    this.stored = session.n_messages || 0;
    storage("session")?.setItem(SESSION_STORAGE, session.id);
    this.titleEl.textContent = session.title || "Chat";
    return session.id;
  }

  /** Send `text` as a new user turn (keeping the first `keep` stored messages). */
  async send(text, keep) {
    if (this.active) return;
    const user = this.addUser(text, keep ?? this.stored);
    const item = this.addAssistant();
    item.user = user;
    this.run(item, async () => {
      const sessionId = await this.ensureSession(text);
      await this.syncing;
      user.at = keep ?? this.stored;
      const body = {
        content: text,
        model: this.model.value || undefined,
        stream: true,
        stream_options: { include_usage: true },
      };
      if (keep !== undefined && keep !== this.stored) body.keep = keep;
      return { sessionId, body };
    });
  }

  follow(streamId) {
    const item = this.addAssistant();
    this.run(item, null, streamId);
  }

  /** Stream an answer into `item`: a new turn (`prepare()` gives its session and message
   * body; over SSE or the WebSocket), or the live stream `streamId` (SSE). */
  async run(item, prepare, streamId) {
    const viaSocket = Boolean(prepare) && this.transport === "websocket";
    item.transport = viaSocket ? "websocket" : "sse";
    const open = prepare
      ? async (headers, signal) => {
          const { sessionId, body } = await prepare();
          return fetch(`${this.base}/v1/sessions/${encodeURIComponent(sessionId)}/messages`, {
            method: "POST",
            headers: { ...headers, "Content-Type": "application/json", "X-Unbroken-Resumable": "1" },
            body: JSON.stringify(body),
            signal,
            cache: "no-store",
          });
        }
      : null;
    const controller = new AbortController();
    const active = { item, controller, streamId: streamId || null, stopping: false };
    this.active = active;
    this.stopButton.hidden = false;
    this.sendButton.disabled = true;
    const model = this.model.value;
    item.timing.sentAt = performance.now();
    let events = 0;
    let readAt = 0;
    const onEvent = (event) => {
      let chunk;
      try {
        chunk = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      onChunk(chunk);
    };
    const onChunk = (chunk) => {
      if (chunk.error) {
        throw new HttpError(0, chunk.error.message || "the answer failed", chunk.error.code);
      }
      events += 1;
      const choice = chunk.choices && chunk.choices[0];
      const delta = choice && choice.delta;
      if (delta) {
        const piece = delta.content || "";
        const thought = delta.reasoning_content || "";
        if ((piece || thought) && item.timing.firstTokenAt === undefined) {
          item.timing.firstTokenAt = readAt;
        }
        if (piece || thought) item.timing.lastTokenAt = readAt;
        if (thought) {
          if (!item.timing.thinkingStart) item.timing.thinkingStart = readAt;
          item.reasoning += thought;
        }
        if (piece) {
          if (item.reasoning && !item.timing.thinkingEnd) item.timing.thinkingEnd = readAt;
          item.content += piece;
        }
        if (piece || thought) this.schedulePaint(item);
      }
      if (choice && choice.finish_reason) item.finishReason = choice.finish_reason;
      if (chunk.usage) item.usage = chunk.usage;
    };
    const onStart = (id) => {
      active.streamId = id;
      item.el.dataset.streamId = id || "";
    };
    try {
      const headers = await this.headers();
      const onRead = (n, at) => {
        readAt = at;
      };
      const onReconnect = () => this.say("Connection lost; reconnecting…");
      const sse = () =>
        open
          ? readAnswer({ open: () => open(headers, controller.signal), base: this.base, headers, signal: controller.signal, onStart, onRead, onEvent, onReconnect })
          : followStream({ base: this.base, headers, streamId, signal: controller.signal, onStart: () => {}, onRead, onEvent, onReconnect });
      const result = await (viaSocket
        ? this.socket
            .answer({
              create: await prepare().then(({ sessionId, body }) => ({ session_id: sessionId, body })),
              signal: controller.signal,
              onStart,
              onRead,
              onChunk,
              onReconnect,
            })
            .catch((error) => {
              if (!error.unavailable) throw error;
              // Something on the way refuses WebSockets: this page stays on SSE.
              this.transport = "sse";
              this.socketRefused = true;
              delete this.app.dataset.transport;
              item.transport = "sse";
              return sse();
            })
        : sse());
      this.say("");
      this.paint(item);
      if (item.finishReason === "stop" && active.stopping) item.stopped = true;
      if (!result.done && !active.stopping) {
        this.finish(item, "error", "The connection ended before the answer was complete.");
      } else {
        this.finish(item, "done");
        if (item.user && !active.stopping) this.stored = item.user.at + 2;
      }
      const spread = (item.timing.lastTokenAt ?? 0) - (item.timing.firstTokenAt ?? 0);
      const waited = (item.timing.firstTokenAt ?? 0) - item.timing.sentAt;
      if (item.transport === "sse" && events >= 8 && spread <= BUFFERED_SPREAD_MS && waited >= BUFFERED_WAIT_MS) {
        if (typeof WebSocket === "function" && !this.socketRefused) {
          this.useWebSocket();
          this.say("This answer arrived all at once: a proxy between you and the gateway buffers streamed responses. Switched to a WebSocket for the next answers.");
        } else {
          this.say("This answer arrived all at once: a proxy between you and the gateway buffers streamed responses.");
        }
      }
    } catch (error) {
      this.paint(item);
      if (active.stopping || error.name === "AbortError") {
        item.stopped = true;
        this.finish(item, "done");
      } else {
        if (error instanceof HttpError && error.status === 401) this.askKey(error.message);
        this.finish(item, "error", error.message || String(error));
      }
      this.say("");
    } finally {
      clearTimeout(active.stopTimer);
      this.showMeta(item, model);
      if (this.active === active) this.active = null;
      this.stopButton.hidden = true;
      this.sendButton.disabled = false;
      // What the session holds now (a stopped answer may or may not have been kept).
      const sessionId = this.sessionId;
      this.syncing = sessionId
        ? this.api("GET", `/v1/sessions/${encodeURIComponent(sessionId)}`)
            .then((session) => {
              if (this.sessionId === sessionId) this.stored = session.messages.length;
            })
            .catch(() => {})
        : null;
      this.refreshSessions().catch(() => {});
    }
  }

  /** Stop the answer being streamed: the gateway stops the generation. */
  async stop() {
    const active = this.active;
    if (!active || active.stopping) return;
    active.stopping = true;
    if (active.streamId) {
      try {
        const response = await fetch(`${this.base}/v1/streams/${encodeURIComponent(active.streamId)}`, {
          method: "DELETE",
          headers: await this.headers(),
        });
        if (response.ok) {
          // The stream ends with its finish event; do not wait for ever.
          active.stopTimer = setTimeout(() => active.controller.abort(), 3000);
          return;
        }
      } catch (_) {
        // fall through: closing the connection also cancels the upstream request
      }
    }
    active.controller.abort();
  }

  regenerate(item) {
    if (this.active) return;
    const index = this.items.indexOf(item);
    const user = item.user || this.items.slice(0, index).reverse().find((i) => i.role === "user");
    if (!user) return;
    this.removeFrom(user);
    this.send(user.content, user.at);
  }

  edit(user) {
    if (this.active) return;
    const field = h("textarea", { "aria-label": "Edit message", rows: "3" });
    field.value = user.content;
    const save = h("button", { type: "submit", "aria-label": "Send edited message" }, "Send");
    const cancel = h("button", { type: "button", "aria-label": "Cancel edit" }, "Cancel");
    const form = h("form", { class: "ub-edit" }, field, h("div", { class: "ub-actions" }, save, cancel));
    const original = [...user.el.childNodes];
    cancel.addEventListener("click", () => user.el.replaceChildren(...original));
    field.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        form.requestSubmit();
      } else if (e.key === "Escape") {
        e.stopPropagation();
        user.el.replaceChildren(...original);
      }
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const text = field.value;
      if (!text.trim()) return;
      this.removeFrom(user);
      this.send(text, user.at);
    });
    user.el.replaceChildren(form);
    field.focus();
  }

  removeFrom(item) {
    const index = this.items.indexOf(item);
    if (index < 0) return;
    for (const gone of this.items.splice(index)) gone.el.remove();
  }

  async copy(item, button) {
    try {
      await navigator.clipboard.writeText(item.content);
      button.textContent = "Copied";
    } catch (_) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  }

  // -- scripting ------------------------------------------------------------------------------

  /** The conversation as data: role, raw Markdown content, reasoning, state, figures. */
  messages() {
    return this.items.map((i) => ({
      role: i.role,
      content: i.content,
      reasoning: i.reasoning || "",
      state: i.state,
      finishReason: i.finishReason || null,
      usage: i.usage || null,
      costUsd: i.costUsd ?? null,
      ttftMs: i.timing && i.timing.firstTokenAt !== undefined ? i.timing.firstTokenAt - i.timing.sentAt : null,
      firstTokenAt: i.timing ? i.timing.firstTokenAt ?? null : null,
      firstVisibleAt: i.timing ? i.timing.firstVisibleAt ?? null : null,
      lastTokenAt: i.timing ? i.timing.lastTokenAt ?? null : null,
      transport: i.transport || null,
    }));
  }
}

/**
 * Build a chat inside `root` (an element, or a shadow root for the widget) and start it.
 * Options: `base` (the gateway's origin, "" for the page), `mode` (`page` or `widget`),
 * `getToken` (async, returns a widget token; the page asks for a key instead).
 */
export function mountChat(root, options = {}) {
  const chat = new Chat(root, options);
  chat.ready = chat.start();
  return chat;
}
