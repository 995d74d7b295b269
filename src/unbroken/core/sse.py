"""Incremental server-sent-events decoder and encoder (WHATWG HTML §9.2); pure, no I/O.

Imports only the standard library, `unbroken.errors` and `core.events`.
"""

from __future__ import annotations

from unbroken.core.events import Comment, IgnoredField, IncompleteEvent, SSEEvent, SSEItem
from unbroken.errors import EncodeError, ProtocolError

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEDecoder", "encode_comment", "encode_event"]

# 16 MiB: far above any chat chunk (a few hundred bytes) or whole tool-call argument string
# seen in practice, small enough that a hostile or broken upstream cannot exhaust memory.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
# `_pending` and `_data` while they hold nothing: shared, never appended to (a list is made
# when a piece arrives), two lists less per live stream (~110 bytes; a relayed chunk read as
# one event never fills either).
_NOTHING: list[bytes] = []

# Theory of operation
# -------------------
# The stream is handled as bytes until a line is complete. Every line end (LF, CR, CRLF) is an
# ASCII byte, and no byte of a multi-byte UTF-8 sequence is below 0x80, so a complete line
# always holds whole characters: decoding per line equals decoding the stream incrementally
# (split characters across reads need no special care, and U+2028 / U+0085 - which are
# multi-byte in UTF-8 - can never be mistaken for line ends).
#
# CR handling: a read that contains CR is normalised (CRLF -> LF, then lone CR -> LF). A CR at
# the very end of a read is already a complete line end; `_skip_lf` remembers to drop one LF
# at the start of the next read, so CR | LF split across reads is one line end (spec "Lines").
#
# State kept between reads: `_pending` (pieces of the unterminated last line), the data lines
# of the event being built, the event type buffer, the last event ID buffer, and whether the
# leading BOM was decided. `_size` counts the bytes held for the current event (pending line
# plus data lines); it never exceeds `max_event_bytes` - past it a ProtocolError is raised
# before anything more is stored.


class SSEDecoder:
    """Turns the bytes of an event stream into `SSEEvent`, `Comment` and `IgnoredField` items.

    In the style of h11: `feed(bytes)` for each read, `flush()` once at end of input. The
    decoder keeps `last_event_id` (what a reconnect sends as `Last-Event-ID`) and
    `reconnection_time_ms` (from `retry:` fields).

    Args:
        max_event_bytes: the most bytes one event (its lines, including an unterminated
            one) may hold; past it `feed` raises ProtocolError. Default 16 MiB.
    """

    __slots__ = (
        "_bom_checked",
        "_data",
        "_error",
        "_event_type",
        "_id_buffer",
        "_max",
        "_pending",
        "_pending_size",
        "_size",
        "_skip_lf",
        "last_event_id",
        "reconnection_time_ms",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")
        self._max = max_event_bytes
        self._pending: list[bytes] = _NOTHING
        self._pending_size = 0
        self._data: list[bytes] = _NOTHING
        self._size = 0
        self._event_type = ""
        self._id_buffer = ""
        self._bom_checked = False
        self._skip_lf = False
        self._error: ProtocolError | None = None
        self.last_event_id = ""
        self.reconnection_time_ms: int | None = None

    def feed(self, data: bytes) -> list[SSEItem]:
        """Decode one read; return the items it completed (possibly none).

        Raises:
            ProtocolError: the current event grew past `max_event_bytes`. When the same read
                also completed events, they are returned first and the error is raised by
                the next `feed` or `flush`, so no complete event is ever lost.
        """
        # (Read into a local: narrowing `self._error` to None here would hold, for mypy and
        # mypyc's run-time type checks, past the `_lines` call below that may set it.)
        error = self._error
        if error is not None:
            raise error
        if not self._bom_checked:
            # One BOM at the very start of the stream is dropped, even if split across reads.
            head = b"".join(self._pending) + data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._pending = [head] if head else _NOTHING
                self._pending_size = len(head)
                return []
            self._bom_checked = True
            self._pending = _NOTHING
            self._pending_size = 0
            data = head[3:] if head.startswith(_BOM) else head
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        if b"\r" in data:
            self._skip_lf = data[-1] == 0x0D
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in data:
            # No line ends: only grow the pending line. Pieces are joined once a line end
            # arrives, so a long line costs linear, not quadratic, copying.
            if data:
                self._pending_size += len(data)
                if self._pending_size > self._max:
                    self._error = self._oversize(data)
                    raise self._error
                if self._pending:
                    self._pending.append(data)
                else:
                    self._pending = [data]
            return []
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending = _NOTHING
        lines = data.split(b"\n")
        tail = lines.pop()
        items = self._lines(lines)
        if self._error is None:
            if tail:
                self._pending = [tail]
            self._pending_size = len(tail)
            if self._size + self._pending_size > self._max:
                self._error = self._oversize(tail)
        if self._error is not None and not items:
            raise self._error
        return items

    def one_data_event(self, data: bytes) -> bytes | None:
        """The data of `data` when the read is exactly one event of one `data: ` line
        (`data: X\n\n`, no CR) and the decoder holds nothing of an earlier one; else None,
        with nothing consumed (call `feed`). The event is dispatched as `feed` would:
        its type is `message` and `last_event_id` takes the id buffer.

        Why: a chat stream read one event per read (a loaded gateway's reads) skips the
        line splitting, the str decode and the `SSEEvent`; the caller gets the bytes, to
        decode once and to relay as they came.
        """
        if (
            data[:6] != b"data: "
            or data.find(b"\n", 6) != len(data) - 2
            or data[-1:] != b"\n"
            or b"\r" in data
            or len(data) - 7 > self._max
            or not self.take_one()
        ):
            return None
        return data[6:-2]

    def take_one(self) -> bool:
        """Whether a read that is exactly one event of one `data: ` line (`data: X\n\n`, no
        CR, within `max_event_bytes`: the caller checked its bytes) is that event alone: the
        decoder holds nothing of an earlier one. If so it is dispatched as `feed` would (its
        type `message`, `last_event_id` takes the id buffer); else nothing changed.

        Why: a caller that knows the read's shape already (a chunk of the same bytes as the
        last but its text, core/stream.py) skips `one_data_event`'s scans of the bytes.
        """
        if (
            self._pending
            or self._data
            or self._skip_lf
            or self._event_type
            or self._error is not None
        ):
            return False
        # Nothing pending and this read starts `data: `: no BOM can lead the stream (a
        # stream's first read takes this path too, without `feed`'s BOM check).
        self._bom_checked = True
        self.last_event_id = self._id_buffer
        return True

    def reconnected(self) -> None:
        """A new connection continues the stream (WHATWG SSE "reestablish the
        connection"): what was buffered of an unfinished event is discarded - the server
        sends it again after `last_event_id` - while `last_event_id` is kept."""
        self._pending = _NOTHING
        self._pending_size = 0
        self._data = _NOTHING
        self._size = 0
        self._event_type = ""
        self._id_buffer = self.last_event_id
        self._bom_checked = False
        self._skip_lf = False

    def flush(self) -> list[SSEItem]:
        """End of input: per spec the unterminated block is discarded.

        Returns `[IncompleteEvent(data)]` when that block holds data (or an unterminated line
        that is a `data` field), so the chat layer can salvage a final `data: [DONE]` that
        lacked its blank line; otherwise `[]`. The decoder is reset for a new stream except
        for `last_event_id` and `reconnection_time_ms`.

        Raises:
            ProtocolError: an oversized event was seen by the last `feed` (see there).
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        tail = b"".join(self._pending)
        if not self._bom_checked and _BOM.startswith(tail):
            tail = b""
        lines = list(self._data)
        if tail.startswith(b"data"):
            rest = tail[4:]
            if not rest or rest[:1] == b":":
                value = rest[1:]
                lines.append(value[1:] if value[:1] == b" " else value)
        self._pending = _NOTHING
        self._pending_size = 0
        self._data = _NOTHING
        self._size = 0
        self._event_type = ""
        self._bom_checked = False
        self._skip_lf = False
        if not lines:
            return []
        return [IncompleteEvent(b"\n".join(lines).decode("utf-8", "replace"))]

    def _oversize(self, piece: bytes) -> ProtocolError:
        # Drop what was held so memory is released even if the caller keeps the decoder.
        self._pending = _NOTHING
        self._pending_size = 0
        self._data = _NOTHING
        self._size = 0
        return ProtocolError(
            f"server-sent event exceeds the {self._max}-byte limit (max_event_bytes); "
            "the upstream sent an unterminated or oversized event",
            excerpt=piece[:60].decode("utf-8", "replace"),
        )

    def _lines(self, lines: list[bytes]) -> list[SSEItem]:
        items: list[SSEItem] = []
        data = self._data
        for line in lines:
            if not line:
                # Dispatch (spec step 6): the last event ID string takes the buffer; nothing
                # is dispatched when no data field was seen.
                self.last_event_id = self._id_buffer
                if data:
                    text = (data[0] if len(data) == 1 else b"\n".join(data)).decode(
                        "utf-8", "replace"
                    )
                    items.append(SSEEvent(text, self._event_type or "message", self._id_buffer))
                    data = self._data = _NOTHING
                    self._size = 0
                self._event_type = ""
                continue
            if line.startswith(b"data:"):
                # The hot path: one `data:` line per chat chunk.
                value = line[6:] if line[5:6] == b" " else line[5:]
                if data:
                    data.append(value)
                else:
                    data = self._data = [value]
                self._size += len(value) + 1
                if self._size > self._max:
                    self._error = self._oversize(value)
                    return items
                continue
            colon = line.find(b":")
            if colon == 0:
                items.append(Comment(line[1:].decode("utf-8", "replace")))
                continue
            if colon > 0:
                name = line[:colon]
                value = line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            else:
                name = line
                value = b""
            if name == b"data":  # `data` with no colon: an empty data line
                if data:
                    data.append(b"")
                else:
                    data = self._data = [b""]
                self._size += 1
                if self._size > self._max:
                    self._error = self._oversize(line)
                    return items
            elif name == b"event":
                self._event_type = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\x00" not in value:
                    self._id_buffer = value.decode("utf-8", "replace")
            elif name == b"retry":
                # bytes.isdigit() is ASCII-only, as the spec requires; empty is ignored.
                if value.isdigit():
                    self.reconnection_time_ms = int(value)
            else:
                items.append(
                    IgnoredField(name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
                )
        return items


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """Encode one event so that `SSEDecoder` yields exactly `SSEEvent(data, event, id)`.

    Line breaks in `data` become separate `data:` lines; CR and CRLF are written as LF, the
    only line break SSE data can carry.

    Raises:
        EncodeError: `event` or `id` holds a line break (or `id` a NUL), or `retry_ms` < 0.
    """
    parts: list[str] = []
    if event is not None:
        if "\n" in event or "\r" in event:
            raise EncodeError(f"an SSE event type cannot contain a line break: {event[:40]!r}")
        parts.append(f"event: {event}\n")
    if id is not None:
        if "\n" in id or "\r" in id or "\x00" in id:
            raise EncodeError(f"an SSE id cannot contain a line break or NUL: {id[:40]!r}")
        parts.append(f"id: {id}\n")
    if retry_ms is not None:
        if retry_ms < 0:
            raise EncodeError(f"an SSE retry must be >= 0 ms, got {retry_ms}")
        parts.append(f"retry: {retry_ms}\n")
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in data:
        parts.extend(f"data: {line}\n" for line in data.split("\n"))
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment line and a blank line (`: keep-alive\\n\\n` for `text="keep-alive"`).

    Raises:
        EncodeError: `text` holds a line break.
    """
    if "\n" in text or "\r" in text:
        raise EncodeError(f"an SSE comment cannot contain a line break: {text[:40]!r}")
    return f": {text}\n\n".encode()
