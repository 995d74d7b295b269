"""LeanTransport: an httpx transport on asyncio protocols and httptools, for the gateway's
upstream calls.

The gateway relays thousands of small reads a second; httpcore spends tens of microseconds
per read (h11 events, per-read timeouts, pool scans). This transport keeps httpx's API for
`AsyncClient` but reads each response straight from a protocol callback into a list, with
flow control (reading pauses past `high_water_bytes`, so a slow downstream client makes the
upstream wait instead of the gateway buffering), keep-alive reuse and httpx's exception types.
HTTP/1.1 only. Upstreams are reached through the proxies of `proxy_env` (see
gateway/proxy.py). Imports httpx and httptools (the `[gateway]` extra).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import resource
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any, Final

import httptools
import httpx

from unbroken._wait import CANCELLED, WAITING, WOKEN, SlotWait
from unbroken.client._engine import _FastLane
from unbroken.errors import ConfigError, UpstreamConnectError
from unbroken.gateway.direct import hold_writes, release_writes, writes_held
from unbroken.gateway.eager import eager_task
from unbroken.gateway.proxy import Proxy, ProxyConfig, open_tunnel

__all__ = ["LeanTransport", "pool_size"]

logger = logging.getLogger(__name__)

# How long an idle connection is reused; below uvicorn's default keep-alive (5 s), so we
# rarely pick a connection the server is closing.
KEEPALIVE_EXPIRY_S = 4.0
# Read-ahead per response before reading pauses (the gateway's per-stream buffer bound).
DEFAULT_HIGH_WATER = 256 * 1024
# File descriptors an automatically sized pool leaves to the listener, the store and logs
# (as gateway/server.py's SPARE_FDS does for the connection cap).
SPARE_FDS = 256
# The smallest automatically sized pool.
MIN_POOL = 16
# URLs whose pool key is remembered (the routes' few; reconnect URLs, each new, flush it).
MAX_KNOWN_URLS = 256
# Connections being opened ahead at once per upstream while requests outgrow the pool (see
# `LeanTransport._open_ahead`): this many, or one per `AHEAD_SHARE` connections open if more.
AHEAD = 2
AHEAD_SHARE = 8
# Weight of a new sample in the running means of the gap between requests and of the time a
# connect takes (`spares_wanted`).
MEAN_WEIGHT = 0.125
# Requests this many connects apart (or more) are no burst: the connection that replaces the
# last idle one taken is opened once that request's response head is in (`_exchange`). Wide,
# since the head may take several connects under load and the next request must find it
# open: at 32 streams of bench/gateway.py requests come ~30 ms apart and a connect takes
# under 1 ms; at 256 (4 ms apart) spares are opened at once, as before.
REPLACE_LATER_RATIO = 16.0


def spares_wanted(connect_s: float, gap_s: float) -> int:
    """Upstream connections to keep idle or being opened while requests outgrow the pool:
    the requests expected during one connect (`connect_s` over the mean `gap_s` between
    requests)."""
    if connect_s <= 0.0:
        return 0
    if gap_s <= 0.0:
        return 1 << 30  # bounded by the caller
    return math.ceil(connect_s / gap_s)


def pool_size(configured: int, max_connections: int, open_files: int | None = None) -> int:
    """How many upstream connections the gateway keeps open at once, per process.

    A relayed stream holds one downstream and one upstream connection, so by default the
    pool matches the downstream cap `max_connections`; the two together must fit the
    open-files limit (which the server raises to its hard value), so each gets at most half
    of it, less spares.

    Args:
        configured: `gateway.upstream_connections`; used as is when > 0.
        max_connections: `gateway.max_connections`.
        open_files: the open-files limit; default the process's hard RLIMIT_NOFILE.

    Raises:
        ConfigError: `configured` is negative.
    """
    if configured < 0:
        raise ConfigError(f"gateway upstream_connections must be >= 0, got {configured}")
    if configured:
        return configured
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if open_files == resource.RLIM_INFINITY:
            return max_connections
    return max(MIN_POOL, min(max_connections, (open_files - SPARE_FDS) // 2))


# The `body` and `headers` of a connection while they hold nothing: shared, never appended
# to (two lists less per live stream, ~110 bytes: a tapped answer buffers no body).
_NO_BODY: list[bytes] = []
_NO_HEADERS: list[bytes] = []
# The lengths of the header names that say how a body is delimited (content-length,
# transfer-encoding): only a name of one of these lengths is lowercased and compared.
_DELIMITING_LENGTHS = (14, 17)
# `_Connection.framing`: whether a read may be cut into chunked frames here, not by the
# parser (see `_Connection._frames`): never for this response (a Content-Length, any
# Transfer-Encoding but plain `chunked`, or the message ended), not known yet (no such
# header seen), chunked but the parser is inside a frame, chunked with the parser between
# frames, or inside a frame this connection cut itself (the parser stands between two
# then: `_Connection._left`, `_line`). Reads are cut here in the last two states. Final:
# compiled, each is a C constant, not a lookup in the module's dict at each use.
_NEVER: Final = -1
_UNKNOWN: Final = 0
_IN_FRAME: Final = 1
_AT_FRAME: Final = 2
_CUT: Final = 3
# The most hex digits of a chunk size cut here (larger frames go to the parser).
_MAX_SIZE_DIGITS: Final = 7
# The largest frame kept whole across reads (`_Connection._cut`): a larger one the parser
# hands on in parts (an answer's frames are a few hundred bytes).
_MAX_HELD: Final = 1 << 16


class _HeadWait(SlotWait):
    """The wait for a response's head (or for a new connection, `LeanTransport._dial`): as
    much of a future as a task awaits, whose waking can run the waiting task's step from
    the connection's callback itself (`run_now`) instead of in a later turn of the loop.

    Why: the head (with the answer's first events, in the same read) woke the producer's
    task through a future, in a later turn of a loop busy with other streams' reads; that
    wait was on the way to every first token. The step that follows the head takes the
    answer's body from the connection (`tap`) and writes the client's response head with
    the first events (gateway/guard.py `start_now`): from `run_now`, in the read's callback.
    Woken any other way (a connection lost, a cancellation), it wakes its task as a future
    does, from the loop."""

    __slots__ = ("_handle",)

    not_over = "the head has not arrived"

    # `run_now` wakes the waiter from the read's callback: a task whose first step has not
    # run yet is woken so by its `EagerStart` (gateway/eager.py).
    wakes_now = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._handle: asyncio.Handle | None = None  # the wake-up scheduled on the loop

    def set_result(self, result: None) -> None:
        """Resolve it (the head arrived, or the connection was made); a no-op once over."""
        if self._state == WAITING:
            self._handle = self._end(WOKEN)

    def cancel(self, msg: Any = None) -> bool:
        """Cancel it (its task is cancelled, or the connection was lost); False when it was
        over already."""
        if self._state != WAITING:
            return False
        self._handle = self._end(CANCELLED)
        return True

    def run_now(self) -> None:
        """Run the task's wake-up scheduled by `set_result` now, from a loop callback (not
        from a task: one task's step cannot run inside another's)."""
        handle, wakeup = self._handle, self._fn
        if handle is None or wakeup is None or asyncio.current_task(self._loop) is not None:
            return
        self._handle = self._fn = None
        handle.cancel()
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.run(wakeup, self)
        else:
            wakeup(self)


class _Parsing:
    """The httptools callbacks of the connections of one pool, on one event loop: each
    connection sets itself as `conn` before it feeds its parser, whose callbacks run then,
    synchronously (the loop reads one connection at a time).

    Why: a parser binds the callbacks of the object it is given when it is made: four
    bound methods of a connection, ~260 bytes per live stream (bench/stream_memory.py);
    these are bound once per pool."""

    __slots__ = (
        "conn",
        "on_body",
        "on_chunk_complete",
        "on_chunk_header",
        "on_header",
        "on_headers_complete",
        "on_message_complete",
    )

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn  # the first connection that uses them, until another feeds
        self.on_header = self._on_header
        self.on_headers_complete = self._on_headers_complete
        self.on_body = self._on_body
        self.on_message_complete = self._on_message_complete
        # Where the parser stands in a chunked body: frames are cut without it only while
        # it stands between two (`_Connection._frames`).
        self.on_chunk_header = self._on_chunk_header
        self.on_chunk_complete = self._on_chunk_complete

    def _on_header(self, name: bytes, value: bytes) -> None:
        # `_Connection.on_header` spelt out: one call less per header of every response.
        conn = self.conn
        headers = conn.headers
        if headers is _NO_HEADERS:
            conn.headers = [name, value]
        else:
            headers += (name, value)
        if len(name) in _DELIMITING_LENGTHS:
            conn.delimiting(name, value)

    def _on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def _on_body(self, body: bytes) -> None:
        conn = self.conn
        lane = conn._lane
        if lane is not None:
            lane._on_body(body)  # a native call (not through the lane's `__call__`)
            return
        tap = conn._tap
        if tap is not None:
            tap(body)
            return
        conn.on_body(body)

    def _on_chunk_header(self) -> None:
        conn = self.conn
        if conn.framing == _AT_FRAME:
            conn.framing = _IN_FRAME

    def _on_chunk_complete(self) -> None:
        conn = self.conn
        if conn.framing == _IN_FRAME:
            conn.framing = _AT_FRAME

    def _on_message_complete(self) -> None:
        self.conn.on_message_complete()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one response at a time (`parsing`: its pool's parser
    callbacks, see `_Parsing`; its own by default)."""

    # One per live answer: no instance dict (~300 bytes with this many attributes).
    __slots__ = (
        "_lane",
        "_left",
        "_line",
        "_tap",
        "absolute_form",
        "body",
        "buffered",
        "closed",
        "complete",
        "delimited",
        "error",
        "framing",
        "got_bytes",
        "headers",
        "headers_done",
        "high",
        "idle_since",
        "keep_alive",
        "key",
        "loop",
        "parser",
        "parsing",
        "paused",
        "proxy_authorization",
        "status",
        "transport",
        "waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, str, int],
        high: int,
        parsing: _Parsing | None = None,
    ):
        # First, the fields `data_received` reads for each relayed chunk: compiled, the
        # fields lie in the order first set, and these then share the object's first cache
        # line (a busy gateway's read finds it cold). (`_reset` sets them for each response.)
        self._lane: _FastLane | None = None
        self.framing = _UNKNOWN
        self._left = 0
        self.got_bytes = False
        self.loop = loop
        self.parsing = parsing or _Parsing(self)
        self.key = key
        self.high = high
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.parser: Any = None
        # Set for a plain-http upstream reached through a forwarding proxy.
        self.absolute_form = False
        self.proxy_authorization: bytes | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self.parsing)
        self.status = 0
        # The response's header names and values, one after the other (as `_LeanResponse`
        # keeps them: joined, no pair made per header).
        self.headers: list[bytes] = _NO_HEADERS
        self.body: list[bytes] = _NO_BODY
        self.buffered = 0
        self.got_bytes = False
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | _HeadWait | None = None
        self.paused = False
        self.delimited = True
        self._tap: Callable[[bytes], None] | None = None
        # The tap when it is an SDK fast lane: called natively, and frames are cut for it.
        self._lane = None
        self.framing = _UNKNOWN
        # While `framing` is `_CUT`: the start of the frame (or of its size line) a read
        # ended in, and how many bytes that frame still needs (0: its size line's rest).
        self._left = 0
        self._line = b""

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        dialing = self.transport
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        if type(dialing) is _Dialing:
            # The request was written from the connect's completion (`_Dialing`): what
            # the socket did not take goes now; the waiter is the response head's.
            dialing.handed(transport)  # type: ignore[arg-type]  # a stream transport
            return
        waiter = self.waiter
        if type(waiter) is _HeadWait:
            # A request waits for this connection (`LeanTransport._dial`): its next step,
            # the request's write, runs now, not from the loop's next pass.
            waiter.set_result(None)
            waiter.run_now()

    def data_received(self, data: bytes) -> None:
        lane = self._lane
        framing = self.framing
        if framing == _AT_FRAME:
            if lane is not None and self._frames(data, lane):
                return
        elif framing == _CUT:
            self._go_on(data)
            return
        self.got_bytes = True
        # A tapped body's read of several events (several chunked frames, or a frame of
        # several): they reach each client in one write (gateway/direct.py `hold_writes`).
        # A frame of one single-line event has no LF before its last four bytes but its
        # size line's, within 10 bytes (one rfind, ~90 ns: a count of the CRLFs took 270);
        # a miss only costs a write per event, a false hit ~0.3 us.
        held = self._tap is not None and data.rfind(b"\n", 0, -4) > 9
        if held:
            hold_writes()
        self.parsing.conn = self
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(str(exc))
        finally:
            if held:
                release_writes()
        if self.framing == _AT_FRAME and not data.endswith(b"\r\n"):
            self._inside()
        waiter = self.waiter
        if type(waiter) is _HeadWait:
            # The head came (or the read failed): the waiting step runs now, with this
            # read's events parsed and buffered for it (see `_HeadWait`).
            waiter.run_now()

    def _frames(self, data: bytes, lane: _FastLane) -> bool:
        """Cut a read into chunked frames (the parser standing between two), each frame's
        body handed to `lane` as the parser would hand it (`_cut`); False (nothing done)
        when the read does not start with a frame's size line: the parser takes it all.

        Why: a relayed chunk went through the parser's `feed_data` (a method looked up by
        name), llhttp and two callbacks through Python's call protocol (the parser's body
        callback, the lane's) before reaching the lane; cut here, it reaches it in one
        native call (bench/hotpath.py)."""
        n = len(data)
        at, size = _frame_at(data, 0, n)
        end = at + size
        if at >= 0 and end + 2 == n and data[end] == 13 and data[end + 1] == 10:
            # One whole frame: a relay's reads mostly are. (A frame of several events
            # reaches each client in one write all the same: the lane holds the writes
            # then, `hold_client_writes`.)
            self.got_bytes = True
            lane._on_body(data[at:end])
            return True
        if at < 0 and not _line_start(data, 0, n):
            return False
        self.got_bytes = True
        held = not writes_held()
        if held:
            hold_writes()
        try:
            if at >= 0 and end + 2 < n and data[end] == 13 and data[end + 1] == 10:
                lane._on_body(data[at:end])  # a whole frame first: `_cut` goes on after it
                self._cut(data, n, end + 2)
            else:
                self._cut(data, n, 0)
        finally:
            if held:
                release_writes()
        return True

    def _go_on(self, data: bytes) -> None:
        """Cut a read that goes on with the frame (or size line) the last read ended in,
        kept in `_line`: the frame is handed on whole once this read completes it."""
        line = self._line
        left = self._left
        n = len(data)
        self.got_bytes = True
        if left > n:  # the frame goes on past this read too
            self._line = line + data
            self._left = left - n
            return
        self._line = b""
        self._left = 0
        held = not writes_held()
        if held:
            hold_writes()
        try:
            if not left:  # a size line cut short (rare): a copy of this read
                self._cut(line + data, len(line) + n, 0)
                return
            frame = line + data[:left]
            at, size = _frame_at(frame, 0, len(frame))
            end = at + size
            if frame[end] != 13 or frame[end + 1] != 10:
                self._malformed()
                return
            self._hand(frame[at:end])
            self._cut(data, n, left)
        finally:
            if held:
                release_writes()

    def _cut(self, data: bytes, n: int, pos: int) -> None:
        """Cut `data[pos:n]` into chunked frames, each frame's body handed on whole, as one
        body callback of the parser's. A read that ends inside a frame (or its size line)
        keeps that part (`_line`, `_left`: the bytes the frame still needs) and leaves
        `framing` at `_CUT`: the next read goes on from there (`_go_on`). What is not a
        frame of ours (a chunk extension, the last frame, a size past `_MAX_HELD` or its
        digits) goes to the parser, from that frame's start; so does the rest of the body
        once the tap stops. (The caller holds the client writes.)

        Why: a busy gateway's reads often end inside a frame; handing that part to the
        parser left it inside the frame, and it took every read after until one ended
        between two frames: under load (c=256) most of them. And a frame handed on in
        parts took the SDK lane's slow path (an event in parts is decoded line by line;
        bench/hotpath.py --read-bytes)."""
        while pos < n:
            lane = self._lane
            if lane is None:
                break  # the tap stopped: the parser's, from this frame's start
            at, size = _frame_at(data, pos, n)
            if at < 0:
                if _line_start(data, pos, n):
                    self._line = data[pos:]
                    pos = n
                break
            end = at + size
            if end + 2 > n:
                if size > _MAX_HELD:
                    break
                self._line = data[pos:]  # the frame's start, its size line included
                self._left = end + 2 - n
                pos = n
                break
            if data[end] != 13 or data[end + 1] != 10:
                self._malformed()
                return
            lane._on_body(data[at:end])
            pos = end + 2
        if pos < n:
            self.framing = _AT_FRAME
            self._feed(data[pos:])
        else:
            self.framing = _CUT if self._line else _AT_FRAME

    def _malformed(self) -> None:
        """A frame cut here is not followed by CRLF: the response fails (nothing more of it
        is cut here or parsed)."""
        self.framing = _NEVER
        self._fail("a chunk's data is not followed by CRLF")

    def _hand(self, body: bytes) -> None:
        """Hand a part of the body on as the parser's body callback does (`_Parsing`)."""
        lane = self._lane
        if lane is not None:
            lane._on_body(body)
            return
        tap = self._tap
        if tap is not None:
            tap(body)
            return
        self.on_body(body)

    def _feed(self, data: bytes) -> None:
        """Feed `data` to the parser (as `data_received` does, its writes held)."""
        self.parsing.conn = self
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(str(exc))
            return
        if self.framing == _AT_FRAME and not data.endswith(b"\r\n"):
            self._inside()

    def _inside(self) -> None:
        """The parser was fed a read that ended past its last frame's CRLF (so inside the
        next frame's size line): it is inside a frame until its next frame completes. (A
        read it ends between two frames in ends with a CRLF: a size line's is a frame's
        start, `_Parsing._on_chunk_header`.)"""
        self.framing = _IN_FRAME

    def _fail(self, reason: str) -> None:
        """The response is malformed: fail it and drop the connection."""
        self.error = httpx.RemoteProtocolError(f"malformed HTTP response: {reason}")
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and not self.delimited and exc is None:
            self.complete = True  # a close-delimited body ends with the connection
        elif not self.complete and self.error is None:
            reason = f"{type(exc).__name__}: {exc}" if exc else "server closed the connection"
            self.error = httpx.ReadError(f"upstream connection lost ({reason})")
        self._wake()

    # -- httptools callbacks -----------------------------------------------------------------

    # (Each header is taken by `_Parsing._on_header`.)

    def delimiting(self, name: bytes, value: bytes) -> None:
        """Note a header that delimits the body (Content-Length, chunked encoding)."""
        lower = name.lower()
        if lower == b"content-length":
            self.delimited = True
            self.framing = _NEVER
        elif lower == b"transfer-encoding":
            coding = value.lower()
            if b"chunked" in coding:
                self.delimited = True
            # Frames are cut here for a plain chunked body only (nothing else to undo).
            self.framing = _IN_FRAME if coding == b"chunked" and not self.framing else _NEVER

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Read now: once the message completes, llhttp already reports the next one's state.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.framing == _IN_FRAME:
            self.framing = _AT_FRAME  # the body's first frame starts next
        self._wake()

    def on_body(self, body: bytes) -> None:
        tap = self._tap
        if tap is not None:
            tap(body)  # taken at once (see `tap`): nothing buffered, no reader to wake
            return
        if self.body is _NO_BODY:
            self.body = [body]
        else:
            self.body.append(body)
        self.buffered += len(body)
        if self.buffered > self.high and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.framing = _NEVER
        self._wake()

    # -- consumer side -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, limit_s: float | None) -> None:
        self.waiter = self.loop.create_future()
        try:
            if limit_s is None:
                await self.waiter
            else:
                await asyncio.wait_for(self.waiter, limit_s)
        finally:
            self.waiter = None

    def tap(
        self, on_body: Callable[[bytes], None] | None, waiter: asyncio.Future[None] | None
    ) -> bool:
        """Hand the response's body bytes to `on_body` as they arrive, from the data
        callback, instead of buffering them for the reader; `waiter` is resolved when the
        response completes or fails. False (nothing changed) when the response failed, or
        ended with nothing buffered: read on (the error, the end). Bytes buffered before
        the tap (the first events often come with the response's head, before the reader
        could tap) go to `on_body` at once, in one call, their direct writes held and
        written together as those of a read of several events from the data callback
        are; `waiter` is resolved then if the response is complete. `tap(None, None)`
        stops it.

        Why: the gateway's SDK client decodes and relays each chunk from here
        (client/async_.py `_FastLane`), with no task wake-up per chunk."""
        if on_body is not None and (
            self.error is not None or self.closed or (self.complete and not self.body)
        ):
            return False
        self._tap = on_body
        self._lane = on_body if type(on_body) is _FastLane else None
        self.waiter = waiter
        if on_body is not None and self.body:
            # One client write for the buffered events (and the response's head, gateway/
            # guard.py `start_now`) instead of one each: 2 writes less per 5-chunk answer.
            data = self.take()
            held = not writes_held()
            if held:
                hold_writes()
            try:
                on_body(data)
            finally:
                if held:
                    release_writes()
            if self.complete:
                self._wake()
        return True

    def hold_client_writes(self) -> bool:
        """Hold the client writes made from here on (gateway/direct.py `hold_writes`), for
        the tap's events of one read, until `release_client_writes`; False (nothing done)
        when they are held already (the read's callback holds them)."""
        if writes_held():
            return False
        hold_writes()
        return True

    def release_client_writes(self) -> None:
        """Write what `hold_client_writes` held (gateway/direct.py `release_writes`)."""
        release_writes()

    def drained(self) -> bool:
        """The response is complete and its body all taken: a read would end (the SDK's
        fast lane then ends the attempt without one, client/_engine.py)."""
        return self.complete and not self.body

    def take(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = _NO_BODY
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def begin(self) -> None:
        self._reset()  # a tap ends with its response
        self.delimited = False

    @property
    def reusable(self) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and self.loop.time() - self.idle_since < KEEPALIVE_EXPIRY_S
        )

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _frame_at(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """Where the body of the chunked frame at `pos` starts, and its size; (-1, 0) when
    `data[pos:n]` does not start with a size line of hex digits and CRLF (none at all, a
    chunk extension, or not all of it) or the size is 0 (the body's end) or too large."""
    size = 0
    i = pos
    limit = pos + _MAX_SIZE_DIGITS
    if limit > n:
        limit = n
    while i < limit:
        c = data[i]
        if 48 <= c <= 57:
            size = size * 16 + c - 48
        elif 97 <= c <= 102:
            size = size * 16 + c - 87
        elif 65 <= c <= 70:
            size = size * 16 + c - 55
        else:
            break
        i += 1
    if i == pos or size == 0 or i + 1 >= n or data[i] != 13 or data[i + 1] != 10:
        return -1, 0
    return i + 2, size


def _line_start(data: bytes, pos: int, n: int) -> bool:
    """Whether `data[pos:n]` is the start of a size line `_frame_at` would find a frame in
    once it is whole: hex digits (within the limit, not all zeros), perhaps a CR after."""
    i = pos
    nonzero = False
    while i < n and i - pos < _MAX_SIZE_DIGITS:
        c = data[i]
        if 48 <= c <= 57 or 97 <= c <= 102 or 65 <= c <= 70:
            nonzero = nonzero or c != 48
            i += 1
        else:
            break
    if not nonzero:
        return False
    return i == n or (i + 1 == n and data[i] == 13)


class _Dialing(asyncio.Transport):
    """A plain-http connection being opened on a socket of our own (`LeanTransport._dial_plain`):
    the connection's transport from the moment the connect completes until the loop's
    transport takes the socket (`_Connection.connection_made`). The request is written on
    the socket from the callback in which the loop sees the connect complete.

    Why: with `loop.create_connection(host, port)` the request waited, after the poll that
    completed the connect, for the loop pass that wakes the connect's coroutine and the one
    that runs `connection_made`: two more turns of a busy loop on the way to the first
    token of every request that found no idle connection (uvloop runs a writer callback
    from inside its poll). The socket is handed to `loop.create_connection(sock=...)` once
    the request is written; the response is read through that transport as ever."""

    def __init__(
        self,
        pool: LeanTransport,
        conn: _Connection,
        started: float,
        family: int,
        address: Any,
    ) -> None:
        super().__init__()
        self._pool = pool
        self._conn = conn
        self._started = started
        self._pending = b""  # request bytes the socket did not take
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.error: OSError | None = None  # the connect's failure
        sock = self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # No TCP_NODELAY here: the request is one send, and the loop's transport sets
            # it on the socket it takes.
            sock.setblocking(False)
            err = sock.connect_ex(address)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            conn.loop.add_writer(sock.fileno(), self._writable)
        except BaseException:
            sock.close()
            raise

    def _writable(self) -> None:
        # Runs once: the connect completed or failed.
        conn, sock = self._conn, self._sock
        loop = conn.loop
        loop.remove_writer(sock.fileno())
        made = conn.waiter
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.error = OSError(err, os.strerror(err))
            self._closed = True
            sock.close()
        else:
            conn.transport = self
        if made is not None:
            made.set_result(None)
            if type(made) is _HeadWait:
                made.run_now()  # on success, the caller's step writes the request now
        if err or self._closed:
            return  # failed, or aborted by the step that ran
        connect = loop.create_connection(lambda: conn, sock=sock)
        task, start = eager_task(loop, self._pool._timed(self._started, connect))
        self._task = task
        task.add_done_callback(self._after_handing)
        start.step_now()

    def _after_handing(self, task: asyncio.Task[None]) -> None:
        self._task = None
        exc = None if task.cancelled() else task.exception()
        conn = self._conn
        if conn.transport is self:
            # The loop's transport never came (none took the socket, or it let it go):
            # the connection is lost.
            self._closed = True
            self._sock.close()
            conn.transport = None
            conn.connection_lost(exc if isinstance(exc, Exception) else None)

    def handed(self, transport: asyncio.Transport) -> None:
        """The loop's transport took the socket: the bytes left are written there."""
        pending, self._pending = self._pending, b""
        if pending:
            transport.write(pending)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        if not self._pending:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the loop's transport writes it again and reports the failure
            data = data[sent:]
        self._pending += bytes(data)

    def is_closing(self) -> bool:
        return self._closed

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()  # the loop closes the socket it was given
        else:
            self._conn.loop.remove_writer(self._sock.fileno())
            self._sock.close()

    def close(self) -> None:
        self.abort()


def _connected(task: asyncio.Task[Any], made: _HeadWait) -> None:
    """A connect task's end: wakes its caller if `connection_made` did not (it failed);
    its error is taken here too, as the caller may be gone (cancelled) already."""
    if not task.cancelled():
        task.exception()
    made.set_result(None)


def _request_bytes(
    method: bytes, url: httpx.URL, head: bytes, body: bytes, conn: _Connection
) -> bytes:
    target = url.raw_path
    if conn.absolute_form:
        target = url.raw_scheme + b"://" + url.netloc + url.raw_path
    if conn.proxy_authorization is not None:
        head += b"Proxy-Authorization: " + conn.proxy_authorization + b"\r\n"
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", head, b"\r\n", body))


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, pool: LeanTransport, conn: _Connection, read_timeout: float | None):
        self._pool = pool
        self._conn = conn
        self._timeout = read_timeout
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        # Its own iterator, not an async generator: nothing more is held while a tapped
        # answer streams (~220 bytes per live stream).
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            if conn.body:
                return conn.take()
            if conn.complete:
                raise StopAsyncIteration
            if conn.error is not None:
                raise conn.error
            try:
                await conn.wait(self._timeout)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading the upstream response") from None

    async def aclose(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close without waiting (the SDK then needs no cancel shield around it)."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and not conn.body and not conn.closed and conn.keep_alive:
            self._pool._release(conn)
        else:
            conn.abort()
            self._pool._forget(conn)


class _Extensions(Mapping[str, Any]):
    """A `_LeanResponse`'s extensions: its HTTP version, and the connection as its network
    stream (the SDK's stream timers abort() it)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def __getitem__(self, key: str) -> Any:
        if key == "network_stream":
            return self._conn
        if key == "http_version":
            return b"HTTP/1.1"
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """`Mapping.get` in one call (the SDK reads `network_stream` twice an answer)."""
        if key == "network_stream":
            return self._conn
        if key == "http_version":
            return b"HTTP/1.1"
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(("http_version", "network_stream"))

    def __len__(self) -> int:
        return 2


# The history of every _LeanResponse (httpx's client assigns a new list, never appends).
_NO_HISTORY: list[httpx.Response] = []


class _LeanResponse(httpx.Response):
    """An httpx.Response whose headers stay one bytes object (names and values separated by
    NUL, which llhttp refuses inside a header) until first read.

    Why: a streamed answer keeps its response while it streams, and httpx's Headers holds
    three objects per header (~1.2 KB per live stream for a dozen headers); the SDK reads
    them only when the stream breaks or the status is an error."""

    def __init__(
        self,
        status_code: int,
        raw_headers: bytes,
        stream: httpx.AsyncByteStream,
        conn: _Connection,
    ) -> None:
        # httpx's `Response.__init__(status_code, stream=stream)` spelt out, without the
        # empty Headers, dict and list it makes to be replaced here: this runs on the way
        # to every answer's first token (tests/unit/test_upstream_parsing.py checks that
        # it sets what httpx's sets).
        self.status_code = status_code
        self._request: httpx.Request | None = None
        self.next_request: httpx.Request | None = None
        # Not httpx's copy into a dict: ~130 bytes less per live stream.
        self.extensions = _Extensions(conn)  # type: ignore[assignment]  # read-only: httpx and the SDK only read it
        self.history = _NO_HISTORY  # no redirects here: shared, not a list per response
        self.is_closed = False
        self.is_stream_consumed = False
        self.default_encoding = "utf-8"
        self.stream = stream
        self._num_bytes_downloaded = 0
        self._raw_headers = raw_headers
        self._headers: httpx.Headers | None = None  # not httpx's empty one: made when read

    @property  # httpx's is a plain attribute: the same type, made when first read
    def headers(self) -> httpx.Headers:
        headers = self._headers
        if headers is None:
            parts = self._raw_headers.split(b"\0") if self._raw_headers else []
            headers = self._headers = httpx.Headers(list(zip(parts[::2], parts[1::2], strict=True)))
            self._raw_headers = b""
        return headers

    @headers.setter
    def headers(self, value: httpx.Headers) -> None:
        self._raw_headers = b""
        self._headers = value


class UpstreamCertificateError(UpstreamConnectError):
    """The upstream's TLS certificate failed verification (untrusted, expired, or for
    another name); never retried."""


class LeanTransport(httpx.AsyncBaseTransport):
    """An httpx transport for HTTP/1.1 upstreams with keep-alive reuse (see module doc).

    Args:
        max_connections: connections open at once (a request waits for one up to the pool
            timeout, then fails with httpx.PoolTimeout).
        high_water_bytes: response bytes read ahead of the consumer before reading pauses.
        ssl_context: for https upstreams (default: the system's trust store).
        proxy_env: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY (`Settings.proxy_env`).

    Raises:
        ConfigError: a proxy URL in `proxy_env` is malformed.
    """

    def __init__(
        self,
        max_connections: int = 1000,
        high_water_bytes: int = DEFAULT_HIGH_WATER,
        ssl_context: ssl.SSLContext | None = None,
        proxy_env: dict[str, str] | None = None,
    ) -> None:
        self._proxies = ProxyConfig.from_env(proxy_env or {})
        self._max = max_connections
        self._high = high_water_bytes
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._keys: dict[int, tuple[httpx.URL, tuple[str, str, int]]] = {}
        self._interned: dict[tuple[str, str, int], tuple[str, str, int]] = {}
        # The connections' parser callbacks, and the loop they are for (see `_Parsing`).
        self._parsing: tuple[asyncio.AbstractEventLoop, _Parsing] | None = None
        # Connections being opened ahead, per upstream, and their tasks (`_open_ahead`).
        self._opening: dict[tuple[str, str, int], int] = {}
        self._ahead_tasks: set[asyncio.Task[None]] = set()
        # Running means of the time between requests taking a connection and of the time
        # a connect takes (loop seconds), and the latest request's time: they size the
        # spares (`spares_wanted`).
        self._gap_s = 1.0
        self._connect_s = 0.0
        self._last_take = 0.0
        self._closed = False
        # What getaddrinfo gave for the addresses (not names) connected to (`_dial_plain`).
        self._numeric: dict[tuple[str, int], list[Any]] = {}

    def _connection(
        self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]
    ) -> _Connection:
        """A new connection to `key` on `loop`, with the pool's parser callbacks for the loop
        (the first connection's)."""
        shared = self._parsing
        if shared is not None and shared[0] is loop:
            return _Connection(loop, key, self._high, shared[1])
        conn = _Connection(loop, key, self._high)
        self._parsing = (loop, conn.parsing)
        return conn

    def __repr__(self) -> str:
        return f"LeanTransport(open={self._open}, max={self._max})"

    def _key(self, url: httpx.URL) -> tuple[str, str, int]:
        """The pool key of `url`: the same tuple for every request to one upstream (the
        SDK sends its URL objects again and again; ~1.5 us a request, and one key held
        per connection)."""
        known = self._keys.get(id(url))
        if known is not None and known[0] is url:
            return known[1]
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.raw_host.decode("ascii"), port)
        key = self._interned.setdefault(key, key)
        if len(self._keys) >= MAX_KNOWN_URLS:  # the URLs of reconnects are each new
            self._keys.clear()
        self._keys[id(url)] = (url, key)
        return key

    def _release(self, conn: _Connection) -> None:
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(
        self, key: tuple[str, str, int], timeouts: dict[str, float | None]
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A gap counts for a second at most: a pool idle for an hour wants no hour of
        # requests to learn that they come faster.
        self._gap_s += (min(now - self._last_take, 1.0) - self._gap_s) * MEAN_WEIGHT
        self._last_take = now
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reusable:
                # Spares are opened once its request is written (`_exchange`).
                return conn
            conn.abort()
            self._open -= 1
        if self._open > 0:
            self._open_ahead(key, timeouts, 0)  # none idle, others busy
        pool_s = timeouts.get("pool")
        deadline = None if pool_s is None else time.monotonic() + pool_s
        while self._open >= self._max:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection free in time") from None
            idle = self._idle.get(key)
            if idle:
                return await self._connect(key, timeouts)
        return await self._new(loop, key, timeouts)

    def _open_ahead(
        self, key: tuple[str, str, int], timeouts: dict[str, float | None], idle_left: int
    ) -> None:
        """Open connections to `key` ahead of the requests that will need them, each in a
        task of its own whose connect starts now, when requests outgrow the pool: after a
        request took a connection while others are busy, leaving `idle_left` idle. One when
        none is left; more while the spares (idle or being opened) are fewer than the
        requests expected during one connect (`spares_wanted`). At most `AHEAD` (or one per
        `AHEAD_SHARE` connections open) being opened at once, never the pool's last places.

        Why: a request that opens its connection waits for the connect, a loop turn (more
        with TLS, a proxy, a name to resolve), on the way to its first token: at 256 new
        streams a second through bench/gateway.py, 239 of 256 requests connected (117 ms
        p50 from the request's bytes to the upstream write under that load, 0.15 ms on an
        idle connection; a per-request probe). A connection opened ahead waits idle, as
        any other, and is closed after `KEEPALIVE_EXPIRY_S` if no request takes it.
        With `AHEAD` at most, a burst outran them: at 256 new streams a second 60% of the
        requests still connected, their first tokens 6-10x later than those that found a
        connection (a probe per request); requests read in one loop turn (a busy loop reads
        several) find none opened in between. The connect starts in the caller's turn
        (eager start): a task's first turn came a loop turn later."""
        opening = self._opening.get(key, 0)
        n = spares_wanted(self._connect_s, self._gap_s) - idle_left - opening
        if idle_left == 0 and n < 1:
            n = 1  # the one taken (or the request's own connect) replaced
        n = min(
            n,
            max(AHEAD, self._open // AHEAD_SHARE) - opening,
            self._max - self._open - opening - 1,  # never the pool's last places
        )
        if n < 1 or self._closed:
            return
        self._opening[key] = opening + n
        loop = asyncio.get_running_loop()
        for _ in range(n):
            task, start = eager_task(loop, self._ahead(key, dict(timeouts)))
            self._ahead_tasks.add(task)
            task.add_done_callback(self._ahead_tasks.discard)
            start.step_now()

    def _replace(self, key: tuple[str, str, int], timeouts: dict[str, float | None]) -> None:
        """The spare deferred by `_exchange`, if still wanted (none idle, others busy)."""
        if self._open > 1:
            self._open_ahead(key, timeouts, len(self._idle.get(key) or ()))

    async def _ahead(self, key: tuple[str, str, int], timeouts: dict[str, float | None]) -> None:
        try:
            conn = await self._new(asyncio.get_running_loop(), key, timeouts)
        except Exception as exc:
            # The request that needs one connects (and reports a failure) itself.
            logger.debug("opening an upstream connection ahead failed: %r", exc)
            return
        finally:
            self._opening[key] -= 1
        if self._closed:
            conn.abort()
            self._open -= 1
            return
        self._release(conn)

    async def _new(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, str, int],
        timeouts: dict[str, float | None],
    ) -> _Connection:
        """Open a connection to `key` (counted in the pool)."""
        self._open += 1
        started = loop.time()
        scheme, host, port = key
        context = None
        if scheme == "https":
            context = self._ssl or ssl.create_default_context()
        proxy = self._proxies.select(scheme, host, port)
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                if proxy is not None and context is not None:
                    conn = await self._tunnel(loop, key, proxy, context, timeouts)
                    self._connect_took(started, loop)
                else:
                    # No proxy, or a plain-http upstream sent to its proxy in absolute form.
                    conn = self._connection(loop, key)
                    to_host = proxy.host if proxy is not None else host
                    to_port = proxy.port if proxy is not None else port
                    if context is None:
                        await self._dial_plain(conn, started, to_host, to_port)
                    else:
                        await self._dial(conn, started, to_host, to_port, context, host)
                    conn.proxy_authorization = proxy.authorization if proxy else None
                    conn.absolute_form = proxy is not None
        except TimeoutError:
            self._open -= 1
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except ssl.SSLCertVerificationError as exc:
            # Not transient: another attempt meets the same certificate. Raised as our own
            # error (not an httpx one), so the SDK's retry loop does not take it for a reset.
            self._open -= 1
            raise UpstreamCertificateError(
                f"the TLS certificate of upstream {host}:{port} failed verification "
                f"({exc.verify_message or exc.reason}); not retried: fix the upstream's "
                "certificate or trust its CA (SSL_CERT_FILE)"
            ) from None
        except OSError as exc:
            self._open -= 1
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from None
        except BaseException:
            self._open -= 1
            raise
        return conn

    def _connect_took(self, started: float, loop: asyncio.AbstractEventLoop) -> None:
        self._connect_s += (loop.time() - started - self._connect_s) * MEAN_WEIGHT

    async def _timed(self, started: float, connect: Coroutine[Any, Any, tuple[Any, Any]]) -> None:
        """`connect`, then its time from `started` into the mean connect time (see `_dial`)."""
        await connect
        self._connect_took(started, asyncio.get_running_loop())

    async def _dial(
        self,
        conn: _Connection,
        started: float,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> None:
        """Connect `conn` to `host`:`port` (with TLS; plain-http upstreams: `_dial_plain`);
        the caller's next step runs from the connection's `connection_made` callback.

        Why: awaiting `loop.create_connection` itself, the caller woke from the loop's ready
        queue one pass after `connection_made` (which runs from that queue once the connect
        completes): one more turn of a busy loop (10-30 ms at 256 new streams a second
        through bench/gateway.py) between the connect and the request's upstream write, on
        the way to the first token of every request that found no idle connection. The
        connect runs in a task of its own, started at once (`eager_task`); the caller waits
        on a `_HeadWait` that `connection_made` wakes and runs (`_HeadWait.run_now`), or
        that the task's end wakes when the connect fails.

        The mean connect time that sizes the spares (`spares_wanted`) is still taken when
        `loop.create_connection` returns, a loop pass after `connection_made`, as it was:
        taken there, from `started`, it was smaller, fewer spares were opened and more
        requests connected themselves (45 against 32 of 256 per run at 256 streams through
        bench/gateway.py, medians of 8 probed runs each)."""
        loop = conn.loop
        made = conn.waiter = _HeadWait(loop)
        connect = loop.create_connection(
            lambda: conn, host, port, ssl=context, server_hostname=server_hostname
        )
        task, start = eager_task(loop, self._timed(started, connect))
        task.add_done_callback(lambda done: _connected(done, made))
        start.step_now()
        try:
            await made
            if conn.transport is None:
                # The connect failed (or ended without the connection made).
                await task  # raises its error
                raise OSError("the connection was not made")
        except BaseException:
            task.cancel()  # the connect, if still under way (the socket is closed then)
            conn.abort()
            raise
        finally:
            conn.waiter = None

    async def _dial_plain(self, conn: _Connection, started: float, host: str, port: int) -> None:
        """Connect `conn` to `host`:`port` over plain TCP on a socket of our own (see
        `_Dialing`); the caller's next step, the request's write, runs from the callback in
        which the loop sees the connect complete. Each address of `host` is tried in turn;
        an OSError when none connects (the first one's if all failed alike)."""
        loop = conn.loop
        addresses = self._numeric.get((host, port))
        if addresses is None:
            try:
                addresses = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )
            except socket.gaierror:
                # A name: resolved for each connect, as the loop's own connect does.
                addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            else:
                if len(self._numeric) >= MAX_KNOWN_URLS:
                    self._numeric.clear()
                self._numeric[host, port] = addresses
        errors: list[OSError] = []
        for family, _, _, _, address in addresses:
            made = conn.waiter = _HeadWait(loop)
            try:
                dialing = _Dialing(self, conn, started, family, address)
            except OSError as exc:
                errors.append(exc)
                continue
            try:
                await made
            except BaseException:
                dialing.abort()
                raise
            finally:
                conn.waiter = None
            if dialing.error is None:
                return
            errors.append(dialing.error)
        if not errors:
            raise OSError(f"no address found for {host}")
        if all(str(exc) == str(errors[0]) for exc in errors):
            raise errors[0]
        raise OSError("; ".join(str(exc) for exc in errors))

    async def _tunnel(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, str, int],
        proxy: Proxy,
        context: ssl.SSLContext,
        timeouts: dict[str, float | None],
    ) -> _Connection:
        _, host, port = key
        raw = await open_tunnel(proxy, host, port, timeouts.get("connect"))
        conn = self._connection(loop, key)
        raw.set_protocol(conn)
        try:
            tls = await loop.start_tls(raw, conn, context, server_hostname=host)
        except BaseException:
            raw.abort()
            raise
        if tls is None:  # pragma: no cover - only when the loop closes under us
            raise httpx.ConnectError(f"TLS to {host}:{port} through the proxy did not start")
        conn.connection_made(tls)
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` and return once the response headers arrived."""
        if isinstance(request.stream, httpx.ByteStream):
            body = request.content
        else:
            body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]  # async stream
        head = b"".join([b"%s: %s\r\n" % pair for pair in request.headers.raw])
        return await self.unbroken_send_post(
            request.url,
            head,
            body,
            request.extensions.get("timeout", {}),
            method=request.method.encode("ascii"),
        )

    async def unbroken_send_post(
        self,
        url: httpx.URL,
        head: bytes,
        body: bytes,
        timeouts: dict[str, float | None],
        *,
        method: bytes = b"POST",
    ) -> httpx.Response:
        """Send a request from its parts and return once the response headers arrived:
        `head` is its header lines (each `Name: value` and CRLF, Host included),
        `timeouts` httpx's timeout extension. The SDK sends its POSTs this way
        (client/async_.py `_SendPost`): no httpx.Request is built or kept."""
        key = self._key(url)
        for tries in range(2):
            conn = await self._connect(key, timeouts)
            payload = _request_bytes(method, url, head, body, conn)
            reused = conn.idle_since > 0
            conn.begin()
            try:
                return await self._exchange(conn, payload, timeouts, key if reused else None)
            except httpx.ReadError:
                conn.abort()
                self._forget(conn)
                # A reused connection the server closed while idle fails before any byte
                # of the response: safe to send once more on a fresh connection.
                if tries == 0 and reused and not conn.got_bytes:
                    continue
                raise
            except BaseException:
                conn.abort()
                self._forget(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _exchange(
        self,
        conn: _Connection,
        payload: bytes,
        timeouts: dict[str, float | None],
        idle_key: tuple[str, str, int] | None = None,
    ) -> httpx.Response:
        """Send `payload` on `conn` and wait for the response's head; `idle_key`: the pool
        key of a connection taken idle while others are busy, whose spares are opened once
        the request is written (their connects, ~40 us each, are not on its way) - or,
        when only the one taken is to be replaced and requests come several connects
        apart (no burst), once the response's head is in and its first bytes are relayed.

        Why the wait: the upstream works on this request meanwhile, and a connect opened
        then is one more connection for it to accept before it answers (at 32 streams
        through bench/gateway.py, the requests that add streams got their upstream heads
        0.15-0.2 ms sooner with it opened after the head, p50 of a per-request probe run
        alternately on both); the next request is still several connects away."""
        assert conn.transport is not None  # noqa: S101 - set by connection_made
        conn.transport.write(payload)
        replace_later = False
        if idle_key is not None and self._open > 1:
            idle_left = len(self._idle.get(idle_key) or ())
            if (
                idle_left == 0
                and not self._opening.get(idle_key)
                and self._connect_s * REPLACE_LATER_RATIO <= self._gap_s
            ):
                replace_later = True
            else:
                self._open_ahead(idle_key, timeouts, idle_left)
        read_timeout = timeouts.get("read")
        while not conn.headers_done:
            if conn.error is not None:
                raise conn.error
            if read_timeout is None:
                conn.waiter = head = _HeadWait(conn.loop)
                try:
                    await head
                finally:
                    conn.waiter = None
                continue
            try:
                await conn.wait(read_timeout)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the upstream's headers") from None
        if replace_later and idle_key is not None:
            # After the step this head resumes (which writes the client's first bytes).
            conn.loop.call_soon(self._replace, idle_key, timeouts)
        # The response keeps the headers as one bytes object: the connection's list goes
        # now, not with the response (~600 bytes per live stream).
        raw = b"\0".join(conn.headers)
        conn.headers = _NO_HEADERS
        return _LeanResponse(
            conn.status,
            raw,
            _ResponseStream(self, conn, read_timeout),
            conn,
        )

    async def aclose(self) -> None:
        """Close every idle connection (and those being opened ahead)."""
        self._closed = True
        for task in list(self._ahead_tasks):
            task.cancel()
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
                self._open -= 1
        self._idle.clear()
        # abort() closes the socket from a loop callback; let it run before we return.
        await asyncio.sleep(0)
