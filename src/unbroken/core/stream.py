"""ChatStreamDecoder: the body bytes of a 200 answer -> typed chunks; and how a stream ended.

Pure: imports the standard library, `unbroken.errors` and core siblings. Implements the
"unbroken contract" of protocol.md §4: JSON-body sniffing, `[DONE]`, every error shape, and
the end states complete / interrupted / error / stalled / truncated.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.events import Comment, IgnoredField, IncompleteEvent, SSEEvent
from unbroken.core.sse import DEFAULT_MAX_EVENT_BYTES, SSEDecoder
from unbroken.core.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ErrorObject,
    completion_to_chunks,
    decode_chunk,
    decode_completion,
    decode_text_chunk,
    decode_text_completion,
    excerpt,
    parse_error_object,
    upstream_error_from_object,
)
from unbroken.errors import ProtocolError, UnbrokenError, UpstreamError

__all__ = [
    "COMPLETE_REASONS",
    "INTERRUPTED_REASONS",
    "ChatStreamDecoder",
    "EndState",
    "StreamEnd",
    "classify_end",
    "fold",
    "several_events",
    "split_events",
]

# finish_reason values that mean the model chose to end (protocol.md §1.6).
COMPLETE_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# finish_reason values that mean the server cut the answer short: resumable.
INTERRUPTED_REASONS = frozenset({"insufficient_system_resource", "error", "abort"})

_WHITESPACE = b" \t\r\n"
# `ChatStreamDecoder._body` while it holds nothing: shared, never appended to (one list
# less per live stream; only a JSON body or keep-alive newlines before one fill it).
_NO_BODY: list[bytes] = []
_CONTENT_KEY = b'"content":"'
_REASONING_KEY = b'"reasoning_content":"'


class EndState(enum.Enum):
    """How a stream ended (protocol.md §4 "End states")."""

    COMPLETE = "complete"
    INTERRUPTED = "interrupted"
    ERROR = "error"
    STALLED = "stalled"
    TRUNCATED = "truncated"


class StreamEnd(msgspec.Struct, frozen=True):
    """The verdict on one attempt's stream.

    Attributes:
        state: the end state.
        no_done: complete, but `[DONE]` never came (nothing was lost).
        missing_finish: `[DONE]` came while a choice had no finish_reason on a route known
            to omit it (`omits_finish_reason`): complete, and must not be resumed.
        ended_early: truncated although `[DONE]` came (a proxy or server that ends streams
            early, or a JSON body without finish_reason): resumed like any truncation.
        error: the upstream or protocol error, for the `error` state.
    """

    state: EndState
    no_done: bool = False
    missing_finish: bool = False
    ended_early: bool = False
    error: UnbrokenError | None = None


class ChatStreamDecoder:
    """Decodes the body of a 200 chat answer into `ChatCompletionChunk`s.

    The first non-whitespace byte decides the path: `{` is a whole JSON completion (some
    proxies ignore `stream: true`; DeepSeek prefixes keep-alive blank lines), anything else
    is SSE. `feed` returns only chunks, so the per-chunk path has no type tests; the end of
    the stream shows in `done` (`[DONE]` seen) and `error` (an error frame or malformed
    data). Once either is set the decoder ignores further input.

    Args:
        max_event_bytes: the limit for one SSE event, and for a whole JSON body.
        text_completions: the body is a FIM answer (`text_completion` chunks).
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_clean",
        "_decode_chunk",
        "_decode_completion",
        "_head",
        "_max",
        "_mode",
        "_n_tail",
        "_raw_ok",
        "_sse",
        "_tail",
        "_text_at",
        "done",
        "error",
        "n_comments",
        "n_ignored",
        "raw",
        "text_index",
        "text_reasoning",
    )

    def __init__(
        self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, text_completions: bool = False
    ) -> None:
        # First, the fields `Attempt.relay_one` reads for each relayed chunk: compiled, the
        # fields lie in the order first set, and these then share the object's first cache
        # lines (a busy gateway's chunk finds them cold).
        # The text template (see `feed_one`): the bytes of the last plain text chunk's JSON
        # before and after its text (not its event's `data: ` and blank line: these bytes
        # are `text_template`, shared with the gateway's stream log, ~340 bytes a live
        # stream less than a copy each), its choice, and whether the text is reasoning
        # (else content). Empty: none yet.
        self._head = b""
        self._tail = b""
        # The SSE decoder holds nothing of an earlier event and its `last_event_id` is
        # current: what `SSEDecoder.take_one` checks, known true after it took an event
        # until `_sse.feed` runs again (saves a call per relayed chunk, ~0.1 us).
        self._clean = False
        self.done = False
        self.error: UnbrokenError | None = None
        # Where the text starts in the event, and the bytes after it (no `len` per chunk).
        self._text_at = self._n_tail = 0
        self._max = max_event_bytes
        self.text_index = 0
        self.text_reasoning = False
        # The upstream's own JSON of the one chunk the last `feed` returned, when it came
        # as the only event of its read (valid UTF-8); else None (also once
        # `Attempt.relay_one` handed them on).
        self.raw: bytes | None = None
        self._sse = SSEDecoder(max_event_bytes)
        # FIM answers (`text_completion`) are read as chat chunks (see decode_text_chunk).
        self._decode_chunk = decode_text_chunk if text_completions else decode_chunk
        self._decode_completion = decode_text_completion if text_completions else decode_completion
        self._mode: Literal["sse", "json"] | None = None
        self._body: list[bytes] = _NO_BODY
        self._body_size = 0
        self.n_comments = 0
        self.n_ignored = 0
        # A FIM chunk is reshaped into a chat chunk: its bytes are not the chunk's.
        self._raw_ok = not text_completions

    @property
    def finished(self) -> bool:
        """True once `[DONE]` or an error ended the stream."""
        return self.done or self.error is not None

    @property
    def is_json_body(self) -> bool:
        """True when the body turned out to be a whole JSON document, not SSE."""
        return self._mode == "json"

    def feed_one(self, data: bytes) -> ChatCompletionChunk | str | None:
        """`feed`'s hot path for a relay: the chunk when `data` is exactly one SSE event of
        a chunk's JSON (valid UTF-8, see `SSEDecoder.one_data_event`), with `raw` its bytes;
        else None with nothing consumed (call `feed`), or None once such an event did not
        decode (`error` is set) or was `[DONE]` (`done` is set): `feed` then returns
        nothing. No list per read. The body's first read may be such an event (it decides
        the body is SSE, as `feed` would).

        A str instead of the chunk: the event is byte for byte the last plain text chunk's
        (`id` to `finish_reason`: one choice, `text_index`, with only content, or only
        reasoning_content when `text_reasoning`) but for that text's JSON string, whose
        value is the str (escapes and all). The chunk is not decoded (`text_chunk` does): a
        relay that folds the text and forwards `raw` needs no more (bench/hotpath.py: ~1 us
        per chunk less than a decode and a fold).
        """
        head = self._head
        # A template is only learned in SSE mode from the upstream's own bytes (`_learn`,
        # below the mode's check): with one, only the stream's end is checked here (fewer
        # bytecodes per chunk, each ~0.1 us when a busy gateway's caches are cold).
        if (
            head
            and data.startswith(b"data: ")
            and data.endswith(b"\n\n")
            and not self.done
            and self.error is None
        ):
            # The event's JSON, cut first (it is `raw` when taken): its template's checks
            # are then prefix and suffix compares mypyc makes in place (with offsets, each
            # was a method call by name).
            body = data[6:-2]
            size = len(data)
            start, end = self._text_at, size - self._n_tail
            if (
                body.startswith(head)
                and body.endswith(self._tail)
                and end >= start
                and size - 7 <= self._max
            ):
                text: str | None
                try:
                    text = data[start:end].decode()
                except UnicodeDecodeError:
                    text = None
                # `_is_plain` inlined (~0.1 us a chunk less than a call and a regex).
                if text is not None and ('"' in text or "\\" in text or not text.isprintable()):
                    # Escapes (a newline, a quote...) or characters `_is_plain` refuses:
                    # the JSON string's value, when these bytes are one (~0.2 us, not a
                    # decode of the chunk's ~3 us). A raw LF is in no JSON string: these
                    # bytes span several events (`several_events`; a failed decode ~1 us).
                    text = None if "\n" in text else _json_text(data[start:end])
                if text is not None and (self._clean or self._take_one()):
                    self.raw = body
                    return text
        if self._mode != "sse":
            # The body's first read: an SSE body's when it starts an event (what `feed`'s
            # sniff decides), taken here as one event rather than through `feed`'s line
            # splitting and str events (~400 bytecodes per answer less).
            if self._mode is not None or self._body or not data.startswith(b"data: "):
                return None
            self._mode = "sse"
        if not self._raw_ok or self.done or self.error is not None:
            return None
        payload = self._sse.one_data_event(data)
        if payload is None:
            return None
        self._clean = True
        if not payload.startswith(b"{") or not (payload.isascii() or _is_utf8(payload)):
            if payload == b"[DONE]":  # the end: `feed` need not take the event again
                self.done = True
            return None
        try:
            chunk = self._decode_chunk(payload)
        except UnbrokenError as exc:
            self.error = exc
            return None
        self.raw = payload
        self._learn(chunk, payload)
        return chunk

    @property
    def text_template(self) -> tuple[bytes, bytes] | None:
        """The JSON of the last plain text chunk before and after its text (see `feed_one`),
        or None before one. A log that keeps text chunks as their text can keep these very
        bytes objects as its template instead of equal copies (stores/packed.py)."""
        return (self._head, self._tail) if self._head else None

    def _take_one(self) -> bool:
        self._clean = self._sse.take_one()
        return self._clean

    def text_chunk(self) -> ChatCompletionChunk:
        """The chunk of the text event `feed_one` just returned as a str (from `raw`).

        Raises:
            UnbrokenError: `raw` is not a chunk's JSON (never after such a `feed_one`).
        """
        return self._decode_chunk(self.raw or b"")

    def _learn(self, chunk: ChatCompletionChunk, payload: bytes) -> None:
        # A plain text chunk (one choice, content or reasoning_content only) whose text's
        # bytes are in its JSON as they are, once: the template of the text chunks that
        # follow.
        if chunk.usage is not None or len(chunk.choices) != 1:
            return
        choice = chunk.choices[0]
        delta = choice.delta
        if (
            delta is None
            or choice.finish_reason is not None
            or choice.logprobs is not None
            or delta.role is not None
            or delta.reasoning is not None
            or delta.tool_calls
            or delta.refusal is not None
        ):
            return
        if delta.reasoning_content is None:
            if delta.content is None:
                return
            text, key, reasoning = delta.content, _CONTENT_KEY, False
        elif delta.content is None:
            text, key, reasoning = delta.reasoning_content, _REASONING_KEY, True
        else:
            return
        if not _is_plain(text):
            return
        needle = key + text.encode() + b'"'
        at = payload.find(needle)
        if at < 0 or payload.find(needle, at + 1) >= 0:
            return
        start = at + len(key)
        self._head = payload[:start]
        self._tail = payload[start + len(needle) - len(key) - 1 :]
        self._text_at = len(self._head) + 6  # after `data: `
        self._n_tail = len(self._tail) + 2  # and the blank line
        self.text_index = choice.index
        self.text_reasoning = reasoning

    def feed(self, data: bytes) -> list[ChatCompletionChunk]:
        """Decode one read of the body; return the chunks it completed."""
        self.raw = None
        if self.done or self.error is not None:
            return []
        if self._mode == "sse":
            payload = self._sse.one_data_event(data)
            # The hot path: one chunk per read. Its bytes, valid UTF-8, decode as their text
            # does (msgspec checks UTF-8 only in the fields it reads).
            if payload is not None:
                self._clean = True
                if payload == b"[DONE]":  # every stream's end: not parsed a second time
                    self.done = True
                    return []
            if (
                payload is not None
                and payload.startswith(b"{")
                and (payload.isascii() or _is_utf8(payload))
            ):
                try:
                    chunk = self._decode_chunk(payload)
                except UnbrokenError as exc:
                    self.error = exc
                    return []
                if self._raw_ok:
                    self.raw = payload
                return [chunk]
        if self._mode is None:
            start = data.lstrip(_WHITESPACE)
            if not start:
                # DeepSeek keep-alive newlines before a JSON body.
                self._body = [*self._body, data]
                return []
            self._mode = "json" if start[:1] == b"{" else "sse"
            if self._mode == "sse":
                if not self._body:
                    # A first read of one whole event takes the one-event path too.
                    return self.feed(data)
                data = b"".join(self._body) + data
                self._body = _NO_BODY
        if self._mode == "json":
            self._body_size += len(data)
            if self._body_size > self._max:
                self.error = ProtocolError(
                    f"the JSON body exceeds the {self._max}-byte limit (max_event_bytes)",
                    excerpt=excerpt(data[:120]),
                )
                self._body = _NO_BODY
                return []
            if self._body:
                self._body.append(data)
            else:
                self._body = [data]
            return []
        self._clean = False
        try:
            items = self._sse.feed(data)
        except ProtocolError as exc:
            self.error = exc
            return []
        chunks: list[ChatCompletionChunk] = []
        for item in items:
            if type(item) is SSEEvent:
                text = item.data
                if text[:1] != "{":
                    if text.strip() == "[DONE]":
                        self.done = True
                        break
                    if not text or text.isspace():
                        continue
                if item.event != "message":
                    if item.event == "error":
                        self.error = self._error_from_text(text)
                        break
                    self.n_ignored += 1
                    continue
                try:
                    chunks.append(self._decode_chunk(text))
                except UnbrokenError as exc:
                    self.error = exc
                    break
            elif type(item) is Comment:
                self.n_comments += 1
            # No `else`: SSEDecoder.feed never yields an IncompleteEvent (only flush does).
            elif type(item) is IgnoredField:  # pragma: no branch
                # Legacy llama.cpp reports errors as a non-standard `error:` field line.
                error = parse_error_object(item.value, bare=True) if item.name == "error" else None
                if error is not None:
                    self.error = upstream_error_from_object(error)
                    break
                self.n_ignored += 1
        return chunks

    @property
    def last_event_id(self) -> str:
        """The id of the last complete event (what a reconnect sends as Last-Event-ID)."""
        return self._sse.last_event_id

    def reconnected(self) -> None:
        """The stream goes on over a new connection: drop the unfinished event (see
        `SSEDecoder.reconnected`); chunks already decoded stay decoded."""
        self._clean = False
        self._sse.reconnected()

    def flush(self) -> list[ChatCompletionChunk]:
        """End of input: decode a JSON body, or salvage an unterminated `data: [DONE]`."""
        if self.done or self.error is not None:
            return []
        if self._mode != "sse":
            body = b"".join(self._body)
            self._body = _NO_BODY
            try:
                completion = self._decode_completion(body)
            except UnbrokenError as exc:
                self.error = exc
                return []
            self.done = True
            return completion_to_chunks(completion)
        self._clean = False
        try:
            items = self._sse.flush()
        except ProtocolError as exc:
            self.error = exc
            return []
        for item in items:
            if isinstance(item, IncompleteEvent) and item.data.strip() == "[DONE]":
                self.done = True
        return []

    @staticmethod
    def _error_from_text(text: str) -> UpstreamError:
        error = parse_error_object(text)
        if error is None:
            error = ErrorObject(message=excerpt(text, 200))
        return upstream_error_from_object(error)


def several_events(data: bytes) -> bool:
    """Whether `data` is several whole SSE events: it ends one (a blank line) after the
    end of another. A relay takes them one at a time (`split_events`), each on its hot
    path (`ChatStreamDecoder.feed_one` takes a lone event only)."""
    end = data.find(b"\n\n")
    return 0 <= end < len(data) - 2 and data.endswith(b"\n\n")


def split_events(data: bytes) -> list[bytes]:
    """`data` cut after each blank line (`\\n\\n`): its events in order, each whole with its
    blank line; joined, they are `data` again (fed one by one, they decode as `data`)."""
    pieces = data.split(b"\n\n")
    events = [piece + b"\n\n" for piece in pieces[:-1]]
    if pieces[-1]:
        events.append(pieces[-1])
    return events


def _is_plain(text: str) -> bool:
    """Whether JSON holds `text` as its UTF-8 bytes: no quote, backslash or control
    character (JSON escapes those); `isprintable` refuses a few more (NBSP, U+2028...)."""
    return '"' not in text and "\\" not in text and text.isprintable()


_TEXT = msgspec.json.Decoder(str)


def _json_text(body: bytes) -> str | None:
    """The value of the JSON string whose bytes between its quotes are `body`, as the
    chunk decoder reads it; None when `body` is not such bytes (an unescaped quote ends the
    string early, a control character, a bad escape, invalid UTF-8)."""
    try:
        return _TEXT.decode(b'"' + body + b'"')
    except msgspec.DecodeError:
        return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def classify_end(
    accumulator: ChunkAccumulator,
    decoder: ChatStreamDecoder,
    *,
    timed_out: bool = False,
    omits_finish: bool = False,
) -> StreamEnd:
    """Decide how an attempt's stream ended, from what was folded and decoded.

    Precedence when several apply: error > interrupted > complete > stalled > truncated.
    A stream whose choices did not all get a finish_reason is truncated even when `[DONE]`
    came (the "unbroken contract": an end without a finish is never a silent success),
    unless the route is known to omit finish_reason (`omits_finish`).

    Args:
        accumulator: what the stream delivered.
        decoder: the decoder that read it (`done`, `error`).
        timed_out: a stream timer (idle, first token, deadline) ended the attempt.
        omits_finish: the route ends answers with `[DONE]` and no finish_reason.
    """
    if decoder.error is not None:
        return StreamEnd(EndState.ERROR, error=decoder.error)
    reasons = accumulator.finish_reasons
    for reason in reasons:  # (no generator: this runs at every attempt's end)
        if reason in INTERRUPTED_REASONS:
            return StreamEnd(EndState.INTERRUPTED)
    if reasons and None not in reasons:
        return StreamEnd(EndState.COMPLETE, no_done=not decoder.done)
    if decoder.done:
        if omits_finish:
            return StreamEnd(EndState.COMPLETE, missing_finish=True)
        return StreamEnd(EndState.TRUNCATED, ended_early=True)
    if timed_out:
        return StreamEnd(EndState.STALLED)
    return StreamEnd(EndState.TRUNCATED)


def fold(chunks: list[ChatCompletionChunk]) -> ChatCompletion:
    """Fold a list of chunks into the completion they make up (a convenience)."""
    accumulator = ChunkAccumulator()
    for chunk in chunks:
        accumulator.feed(chunk)
    return accumulator.completion()
