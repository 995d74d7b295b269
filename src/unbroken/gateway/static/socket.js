// Chat answers over the gateway's WebSocket (/v1/chat/ws, docs/websocket.md): where the page
// goes once it finds a proxy buffering server-sent events. One socket per page, opened when
// first needed and authenticated by its first frame (browsers cannot set headers on a
// WebSocket). When it drops, the next use opens a new one and each answer sends `resume`
// with the last event id it holds: the gateway's stream log replays the rest, with no gap
// and no repeat.

import { HttpError, sleep, waitOnline } from "./stream.js";

/** The WebSocket URL of the gateway at `base` ("" for this page's origin). */
export function socketUrl(base) {
  const origin = base || window.location.origin;
  return `${origin.replace(/^http/, "ws")}/v1/chat/ws`;
}

function socketError(error) {
  // The gateway's OpenAI-shaped error; an auth failure is a 401 to the page.
  const status = error?.type === "authentication_error" ? 401 : 0;
  const failed = new HttpError(status, error?.message || "the answer failed", error?.code || null);
  failed.fatal = true;
  return failed;
}

export class ChatSocket {
  /** `url`: the socket's URL; `getSecret()`: the gateway key or widget token, or null. */
  constructor({ url, getSecret }) {
    this.url = url;
    this.getSecret = getSecret;
    this.ws = null;
    this.opening = null;
    this.answers = new Map(); // request id -> {ws, onFrame, drop}
    this.seq = 0;
    this.everOpened = false;
    // The browser knows the network is gone before TCP does: drop the socket now; the
    // answers resume on a new one once the network is back.
    window.addEventListener("offline", () => this.drop());
  }

  /** The open, authenticated socket (opened once; concurrent callers share it). */
  open() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve(this.ws);
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      let opened = false;
      ws.onopen = async () => {
        try {
          const secret = await this.getSecret();
          if (secret) ws.send(JSON.stringify({ type: "auth", token: secret }));
        } catch (error) {
          ws.close();
          reject(error);
          return;
        }
        opened = true;
        this.everOpened = true;
        this.ws = ws;
        resolve(ws);
      };
      ws.onmessage = (message) => this.dispatch(ws, message.data);
      ws.onclose = () => {
        if (!opened) {
          const error = new Error("the WebSocket to the gateway could not be opened");
          // Never opened on this page: something on the way refuses WebSockets.
          error.unavailable = !this.everOpened;
          reject(error);
        }
        this.dropped(ws);
      };
    }).finally(() => {
      this.opening = null;
    });
    return this.opening;
  }

  /** Close the socket now (the answers on it resume on the next one). */
  drop() {
    const ws = this.ws;
    if (!ws) return;
    this.dropped(ws);
    ws.close();
  }

  dropped(ws) {
    if (this.ws === ws) this.ws = null;
    for (const answer of [...this.answers.values()]) {
      if (answer.ws === ws) answer.drop();
    }
  }

  dispatch(ws, raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      return;
    }
    const at = performance.now();
    if (frame.id === null && frame.type === "error") {
      // About the connection (auth, a malformed frame): every answer on it fails.
      for (const answer of [...this.answers.values()]) {
        if (answer.ws === ws) answer.fail(socketError(frame.error));
      }
      return;
    }
    this.answers.get(frame.id)?.onFrame(frame, at);
  }

  /**
   * Streams one answer, as `readAnswer` does over SSE: `create` holds the create frame's
   * fields (`{session_id, body}`); chunks go to `onChunk(chunk)` and each frame's arrival to
   * `onRead(1, at)`; `onStart(streamId)`, `onReconnect(attempt)`. Resolves with
   * `{done, streamId, lastId}`. Rejects with `error.unavailable` set when the socket
   * cannot be opened and never could on this page (nothing was sent: the caller may ask
   * over SSE instead).
   */
  async answer({ create, signal, onStart, onChunk, onRead, onReconnect }) {
    this.seq += 1;
    const id = `answer-${this.seq}`;
    let streamId = null;
    let lastId = null;
    let failures = 0;
    let frame = { type: "create", id, ...create };
    const aborted = () => new DOMException("stopped", "AbortError");
    for (;;) {
      if (signal?.aborted) throw aborted();
      let outcome;
      try {
        const ws = await this.open();
        outcome = await new Promise((resolve, reject) => {
          const stop = () => {
            try {
              ws.send(JSON.stringify({ type: "cancel", id }));
            } catch (_) {
              // closing anyway
            }
            reject(aborted());
          };
          signal?.addEventListener("abort", stop, { once: true });
          const settle = (fn) => (value) => {
            signal?.removeEventListener("abort", stop);
            this.answers.delete(id);
            fn(value);
          };
          const done = settle(resolve);
          const fail = settle(reject);
          this.answers.set(id, {
            ws,
            drop: () => done({ dropped: true }),
            fail,
            onFrame: (msg, at) => {
              if (msg.type === "started") {
                streamId = msg.stream_id;
                onStart?.(streamId);
              } else if (msg.type === "chunk") {
                lastId = msg.event;
                failures = 0;
                onRead?.(1, at);
                try {
                  onChunk(msg.data);
                } catch (error) {
                  error.fatal = true; // an error chunk: the answer failed, do not resume
                  fail(error);
                }
              } else if (msg.type === "done") {
                done({ done: true });
              } else if (msg.type === "error") {
                fail(socketError(msg.error));
              }
            },
          });
          ws.send(JSON.stringify(frame));
        });
      } catch (error) {
        if (signal?.aborted || error.fatal || error.unavailable || error.name === "AbortError") throw error;
        outcome = { dropped: true, error };
      }
      if (outcome.done) return { done: true, streamId, lastId };
      // The socket dropped (or could not open): resume after the last event we hold.
      if (!streamId && frame.type === "create" && outcome.error === undefined) {
        // Dropped before the gateway named the stream: nothing to resume.
        throw new Error("the WebSocket closed before the answer started");
      }
      failures += 1;
      if (failures > 8) throw outcome.error || new Error("the answer's WebSocket kept closing");
      onReconnect?.(failures);
      await waitOnline(signal);
      if (failures > 1) await sleep(Math.min(4000, 250 * 2 ** (failures - 2)), signal);
      if (streamId) frame = { type: "resume", id, stream_id: streamId, after: lastId };
    }
  }
}
