"""Writing a streamed response's body straight to the connection, beside uvicorn's ASGI
`send`: the fast path of the gateway's live answers (gateway/relay.py `LiveSink`).

Why it exists: with one ASGI `send` awaited per relayed chunk (a coroutine, uvicorn's
checks, a task switch to the reader that awaits it) the gateway spent 75 us of CPU per chunk
at 32 streams of 5 ms tokens against 23 us for a bare uvloop relay (bench/gateway.py); the
send machinery and the reader's wake-ups were most of the difference. `DirectBody.write` is
one call and one `transport.write` in uvicorn's own chunked framing, made only while the
response is in the state where uvicorn's `send` would write the same bytes at once (headers
sent, chunked, not complete, not HEAD, the client connected and the transport not paused);
otherwise it refuses and the caller goes back to `send`, which waits for the client to
drain (flow control) and ends the response. Imports uvicorn's httptools protocol types only.
"""

from __future__ import annotations

from typing import Any, Final

from unbroken.gateway._holding import Holding

__all__ = ["DIRECT_EXTENSION", "DirectBody", "hold_writes", "release_writes", "writes_held"]

# The scope extension under which the gateway's protocol (gateway/guard.py) offers it.
DIRECT_EXTENSION = "unbroken.direct_body"

# Threads holding writes now (`hold_writes`), and each one's bodies with writes held back,
# written by `release_writes`. Why: an upstream read that brings several events (a loaded
# gateway's often do: ~1.6 a read at 256 streams, bench/gateway.py) then reaches each client
# in one write, not one per event, as a relay passing the read's bytes through does (the
# write syscall is ~30% of the gateway's CPU). Per thread: event loops in other threads of
# the process (tests, embedding) write as they would; a write reads only the count while
# none holds (~10 ns, not a thread-local's ~40).


class _Count:
    """A count in an object, not a module global: compiled, `_holding.n` is read in place
    (a global changed at run time is looked up in the module's dict at each use)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_holding: Final = _Count()  # threads holding writes now
_local = Holding()  # this thread's bodies with writes held back

# The framing of an event `seq` of `n` bytes, from tables instead of a formatting: the
# chunk's size line for each frame size below `_TABLE`, and `id: <seq>\ndata: ` for each
# seq below it (bench/hotpath.py: ~60-80 ns of the ~170 a `%x`/`%d` formatting of each
# relayed chunk took; ~0.4 MB once per process). Larger ones are formatted.
_TABLE = 4096
# Final: compiled, each is a C global, not a lookup in the module's dict at each use.
_SIZE_LINES: Final = [b"%x\r\n" % size for size in range(_TABLE)]
_ID_LINES: Final = [b"id: %d\ndata: " % seq for seq in range(_TABLE)]


def _long_frame(seq: int, data: bytes) -> bytes:
    """The chunk of event `seq` with `data`, formatted (past the framing tables)."""
    return b"%x\r\nid: %d\ndata: %b\n\n\r\n" % (len(b"%d" % seq) + len(data) + 13, seq, data)


def hold_writes() -> None:
    """Hold back the body writes this thread makes from now on until `release_writes`
    (the caller's loop callback must call it before returning: nothing else writes to
    the held bodies' transports in between)."""
    if _local.held is None:
        _local.held = []
        # Unlocked: only a hint for the writes' fast path (`_hold` asks this thread's
        # state), so threads racing here cost at most a check per write, never a write.
        _holding.n += 1


def writes_held() -> bool:
    """Whether this thread holds its body writes now (`hold_writes`)."""
    return _local.held is not None


def release_writes() -> None:
    """Write what `hold_writes` held back in this thread, each body's in one write, and
    stop holding."""
    held = _local.held
    if held is None:
        return
    _local.held = None
    _holding.n -= 1
    for body in held:
        body._release()


class DirectBody:
    """Body writes for the response of one uvicorn request cycle.

    Args:
        cycle: uvicorn's `RequestResponseCycle` of the request (httptools protocol).
    """

    # `_open` first: compiled, the fields lie in the order first set, and a relayed chunk
    # reads it and `_transport` only (one cache line of the body; not the cycle's nor the
    # flow control's, which a busy gateway's chunk finds cold).
    __slots__ = ("_cycle", "_flow", "_held", "_open", "_streaming", "_transport")

    def __init__(self, cycle: Any) -> None:
        # Streaming (below), and the response neither complete nor its client gone nor its
        # writes paused, as last checked (`writable`): the one check of a write while
        # true, the transport's `is_closing()` aside. Kept true only while it holds: the
        # protocol calls `changed` when any of them may have become false (gateway/guard.py:
        # the response's end, the connection's loss or refusal, a pause of its writes).
        self._open = False
        self._transport = cycle.transport
        self._cycle = cycle
        self._flow = cycle.flow
        # Headers sent, chunked, not HEAD: once true, true for the rest of the response
        # (checked once instead of per write).
        self._streaming = False
        # The frames held back (`hold_writes`): one, or several.
        self._held: bytes | list[bytes] | None = None

    def changed(self) -> None:
        """The cycle's state may have changed (its response completed, its client went,
        its writes paused): the next write checks it all again (`writable`)."""
        self._open = False

    def writable(self) -> bool:
        """Whether `write` would write now (see the module docstring)."""
        cycle = self._cycle
        if not self._streaming:
            if not (
                cycle.response_started
                and cycle.chunked_encoding
                and cycle.scope["method"] != "HEAD"
            ):
                return False
            self._streaming = True
        # Checked from the cycle itself: a change the protocol reported (`changed`) is seen
        # here, and `_open` is true again once it no longer holds (writes resumed).
        self._open = is_open = not (
            cycle.response_complete or cycle.disconnected or self._flow.write_paused
        )
        return is_open and not self._transport.is_closing()

    def write(self, body: bytes) -> bool:
        """Write `body` (not empty) as one chunk of the response; False when it may not be
        written this way now (nothing was written: use the ASGI `send`)."""
        if not self.writable():
            return False
        frame = b"%x\r\n%b\r\n" % (len(body), body)
        if not _holding.n:
            self._transport.write(frame)
        else:
            self._hold(frame)
        return True

    def write_raw(self, data: bytes) -> None:
        """Write `data` as it is (the response's head, rendered by the caller), now or
        with the writes held (`hold_writes`), before what is written after it."""
        if not _holding.n:
            self._transport.write(data)
        else:
            self._hold(data)

    def write_event(self, seq: int, data: bytes) -> bool:
        """`write` of the SSE event `id: seq` (a log event's id: >= 0) with `data`, framed
        in one join (the one-event case of every relayed chunk: no intermediate copy of the
        event)."""
        # `writable` is one flag while it holds: this runs once per relayed chunk.
        transport = self._transport
        if self._open:
            if transport.is_closing():
                return False
        elif not self.writable():
            return False
        try:  # the framing's tables (above); no cost until an index is past them
            head = _ID_LINES[seq]
            # A %-format of bytes only: compiled, one concatenation into the frame (no tuple,
            # no call of a bound `join`).
            frame = b"%b%b%b\n\n\r\n" % (_SIZE_LINES[len(head) + len(data) + 2], head, data)
        except IndexError:
            frame = _long_frame(seq, data)
        if not _holding.n:
            transport.write(frame)
        else:
            self._hold(frame)
        return True

    def _hold(self, frame: bytes) -> None:
        held = _local.held
        if held is None:  # another thread holds its writes, not this one
            self._transport.write(frame)
            return
        # The transport's state, checked above, cannot change before `release_writes`:
        # nothing writes to it in between.
        mine = self._held
        if mine is None:
            self._held = frame
            held.append(self)
        elif isinstance(mine, bytes):
            self._held = [mine, frame]
        else:
            mine.append(frame)

    def _release(self) -> None:
        mine, self._held = self._held, None
        if mine is not None and not self._transport.is_closing():
            self._transport.write(mine if isinstance(mine, bytes) else b"".join(mine))
