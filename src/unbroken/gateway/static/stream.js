// Reading a chat answer from the gateway: fetch + ReadableStream, a WHATWG server-sent-events
// decoder, and reconnection to the gateway's stream log (GET /v1/streams/{id} with
// Last-Event-ID) when the network drops, so the answer arrives with no loss and no repeat.

/** Incremental SSE decoder (WHATWG HTML "interpreting an event stream"). */
export class SSEDecoder {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.id = null;
    this.event = "";
    this.sawCR = false;
  }

  /** Feed decoded text; returns the events completed by it. */
  feed(text) {
    const events = [];
    let buf = this.buffer + text;
    // A CR at the end of the previous piece already ended a line; skip its LF.
    if (this.sawCR && buf.startsWith("\n")) buf = buf.slice(1);
    this.sawCR = false;
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this._line(buf.slice(start, i), events);
      if (c === 13) {
        if (i + 1 === buf.length) this.sawCR = true;
        else if (buf.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.buffer = buf.slice(start);
    return events;
  }

  _line(line, events) {
    if (line === "") {
      if (this.data.length) {
        events.push({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
      }
      this.data = [];
      this.event = "";
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "event") this.event = value;
  }
}

/** An HTTP error answer, with the gateway's message. */
export class HttpError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function httpError(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch (_) {
    // not JSON: keep the status line
  }
  return new HttpError(response.status, message, code);
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

/** Resolves once the browser is online (at once when it is, or when `signal` aborts). */
export function waitOnline(signal) {
  if (navigator.onLine) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      window.removeEventListener("online", done);
      resolve();
    };
    window.addEventListener("online", done);
    signal?.addEventListener("abort", done);
  });
}

/**
 * Streams one answer. `open()` returns the fetch Response of the first request. Events go to
 * `onEvent({id, data})` and every read to `onRead(nEvents, performance.now() when it arrived)`. When the connection breaks
 * after the gateway gave a stream id, the rest is read from `GET {base}/v1/streams/{id}`
 * after the last event id; `onReconnect(attempt)` reports it. Resolves with
 * `{done, streamId, lastId}` (`done`: `[DONE]` arrived).
 */
export async function readAnswer({ open, base, headers, signal, onStart, onEvent, onRead, onReconnect }) {
  let streamId = null;
  let lastId = null;
  let failures = 0;
  let response = await open();
  if (!response.ok) throw await httpError(response);

  async function pump(res) {
    const decoder = new SSEDecoder();
    const text = new TextDecoder();
    const reader = res.body.getReader();
    // The browser knows the network is gone before TCP does: drop this connection now and
    // reconnect after the last event id once it is back ("online").
    const dropped = () => reader.cancel().catch(() => {});
    window.addEventListener("offline", dropped);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        const at = performance.now();
        if (done) return false;
        const events = decoder.feed(text.decode(value, { stream: true }));
        onRead?.(events.length, at);
        for (const event of events) {
          if (event.id !== null) lastId = event.id;
          if (event.data === "[DONE]") return true;
          failures = 0;
          try {
            onEvent(event);
          } catch (error) {
            error.fatal = true; // an error event: the answer failed, do not reconnect
            throw error;
          }
        }
      }
    } finally {
      window.removeEventListener("offline", dropped);
      reader.releaseLock();
    }
  }

  for (;;) {
    let broken = null;
    if (response !== null) {
      streamId = response.headers.get("x-unbroken-stream-id") || streamId;
      onStart?.(streamId);
      try {
        if (await pump(response)) return { done: true, streamId, lastId };
      } catch (error) {
        if (signal?.aborted || error.fatal) throw error;
        broken = error;
      }
    }
    // The body ended or broke without [DONE]: continue from the stream log when we can.
    if (!streamId) {
      if (broken) throw broken;
      return { done: false, streamId, lastId };
    }
    failures += 1;
    if (failures > 8) throw broken || new Error("the answer's stream kept ending early");
    onReconnect?.(failures);
    await waitOnline(signal);
    if (failures > 1) await sleep(Math.min(4000, 250 * 2 ** (failures - 2)), signal);
    if (signal?.aborted) throw new DOMException("stopped", "AbortError");
    const resumeHeaders = { ...headers };
    if (lastId !== null) resumeHeaders["Last-Event-ID"] = lastId;
    response = null;
    try {
      const res = await fetch(`${base}/v1/streams/${encodeURIComponent(streamId)}`, {
        headers: resumeHeaders,
        signal,
        cache: "no-store",
      });
      if (res.ok) response = res;
      else if (res.status < 500 && res.status !== 429) throw await httpError(res);
    } catch (error) {
      if (signal?.aborted || error instanceof HttpError) throw error;
      // still unreachable: go round again
    }
  }
}

/**
 * Follows a live stream found through its session (after a reload): replays it from the
 * start and then reads on, like `readAnswer` after a break.
 */
export function followStream({ base, headers, streamId, signal, ...rest }) {
  return readAnswer({
    ...rest,
    base,
    headers,
    signal,
    open: () =>
      fetch(`${base}/v1/streams/${encodeURIComponent(streamId)}`, {
        headers,
        signal,
        cache: "no-store",
      }),
  });
}
