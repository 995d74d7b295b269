"""One HTTP exchange of the mock over raw ASGI: writes shaped by faults, sleeps that end when
the client leaves, and a real TCP reset when the server exposes its transport.

The RST needs the asyncio transport: `unbroken.mock.server` runs uvicorn with a protocol
that puts it in `scope["extensions"]["unbroken.transport"]`. Under any other server a reset
falls back to a clean end of the response. Imports the standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal, NoReturn, Protocol, cast

__all__ = [
    "CHUNKED_WRITES_EXTENSION",
    "TRANSPORT_EXTENSION",
    "Closed",
    "Exchange",
    "Receive",
    "Scope",
    "Send",
    "Transport",
    "abort_transport",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The scope extension under which `mock.server` exposes the connection's transport.
TRANSPORT_EXTENSION = "unbroken.transport"
# The scope extension under which `mock.server` says that a response without a length goes out
# in HTTP/1.1 chunked coding written straight to that transport: body bytes may then be framed
# and written by the app between the server's own start and end of the response.
CHUNKED_WRITES_EXTENSION = "unbroken.chunked_writes"

_BOM = b"\xef\xbb\xbf"
# How long a reset waits for the transport to hand buffered bytes to the kernel.
RESET_DRAIN_S = 1.0
# A byte that starts a multi-byte UTF-8 sequence; a write cut right after it is cut inside
# the character.
_LEAD_BYTE = re.compile(rb"[\xc0-\xf7]")


class Closed(Exception):
    """The exchange is over: the client left, the connection was reset or cut, or the
    server is shutting down. Handlers let it unwind to the app, which records the outcome."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class Transport(Protocol):
    """What the mock needs of a connection's transport (asyncio's and uvloop's both fit;
    uvloop's do not subclass asyncio's classes, hence a Protocol)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport information (`socket`)."""

    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""

    def close(self) -> None:
        """Close after flushing."""

    def abort(self) -> None:
        """Close at once, dropping buffered data."""

    def write(self, data: bytes) -> None:
        """Write bytes (buffered by the transport when the socket does not take them)."""

    def get_write_buffer_size(self) -> int:
        """Bytes buffered, not yet taken by the socket."""


def _as_transport(value: object) -> Transport | None:
    if all(hasattr(value, name) for name in ("get_extra_info", "is_closing", "abort", "close")):
        return cast(Transport, value)
    return None


def abort_transport(transport: Transport) -> None:
    """Close a connection with a TCP RST: SO_LINGER (on, 0 s), then abort."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Exchange:
    """Wraps an ASGI (scope, receive, send) for one response.

    Theory of operation: after the request body is read, `watch()` starts a task that waits
    for `http.disconnect`; it marks the exchange disconnected and wakes the one sleep in
    progress. Every wait (`sleep`, `wait_closed`) and every write raises `Closed` once the
    client is gone, so no handler keeps producing for nobody. Writes go through `write`,
    which applies the write-shaping faults: a BOM before the first body byte, a cut after N
    bytes (`cut_bytes`, then `cut_action`), and a write pattern (`split`, with `gap_s`
    between writes).
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False
        self.is_closing = False
        self.has_started = False
        self.has_ended = False
        self.status = 0
        self.n_bytes = 0
        self.bom = False
        self.split: Literal["utf8", "byte"] | None = None
        self.gap_s = 0.0
        self.cut_bytes: int | None = None
        self.cut_action: Literal["reset", "close"] = "close"
        extensions = scope.get("extensions") or {}
        self._transport = _as_transport(extensions.get(TRANSPORT_EXTENSION))
        self._chunked_writes = self._transport is not None and bool(
            extensions.get(CHUNKED_WRITES_EXTENSION)
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the exchange runs on."""
        return self._loop

    @property
    def transport(self) -> Transport | None:
        """The connection's transport, when the server exposes it."""
        return self._transport

    # -- waiting ----------------------------------------------------------------------------

    def watch(self) -> None:
        """Start watching for the client's disconnect (once the body is read; every wait
        starts it)."""
        if self._watcher is None:
            self._watcher = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone()
                return

    def _gone(self) -> None:
        self.disconnected = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def shutdown(self) -> None:
        """The server is stopping: drop the connection and end every wait."""
        self.is_closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._gone()

    def raise_closed(self) -> NoReturn:
        """Raise `Closed` with the reason the exchange ended (client gone or shutdown)."""
        raise Closed("shutdown" if self.is_closing else "cancelled")

    async def wait_lost(self, timeout_s: float) -> None:
        """Wait (bounded) until the server saw the connection go, so that the ASGI server
        does not take an unfinished response for an app error."""
        self.watch()
        if self._watcher is not None:
            await asyncio.wait({self._watcher}, timeout=timeout_s)

    def _check(self) -> None:
        if not self.disconnected:
            # With the transport at hand a closed connection shows at once, even on streams
            # that never sleep and so never started the watcher.
            transport = self._transport
            if transport is None or not transport.is_closing():
                return
            self.disconnected = True
        raise Closed("shutdown" if self.is_closing else "cancelled")

    async def sleep(self, delay_s: float) -> None:
        """Sleep, or raise `Closed` as soon as the client leaves."""
        self._check()
        if delay_s <= 0:
            return
        self.watch()
        waiter = self._loop.create_future()
        handle = self._loop.call_later(delay_s, _wake, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None
        self._check()

    def park(self) -> asyncio.Future[None]:
        """A future for the handler to await while something else (`mock.pacer`) sends for
        it: it is done when that is over, or at once when the client leaves (then `unpark`
        raises `Closed`)."""
        self.watch()
        waiter = self._loop.create_future()
        self._waiter = waiter
        return waiter

    def unpark(self) -> None:
        """After the future of `park`: raise `Closed` if the client left meanwhile."""
        self._waiter = None
        self._check()

    async def wait_closed(self) -> None:
        """Wait until the client leaves (accept-and-never-answer, endless stalls)."""
        self.watch()
        while not self.disconnected:
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    async def aclose(self) -> None:
        """Stop the watcher (the response is over)."""
        watcher = self._watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    # -- writing ----------------------------------------------------------------------------

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the status line and headers."""
        self._check()
        self.status = status
        self.has_started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """A whole response in one go (errors, small JSON bodies)."""
        await self.start(
            status,
            [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        )
        self.has_ended = True
        self.n_bytes += len(body)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def write(self, data: bytes) -> None:
        """Send body bytes, shaped by the write faults; raises `Closed` when a cut ends it."""
        self._check()
        if self.bom:
            self.bom = False
            data = _BOM + data
        cut = self.cut_bytes
        if cut is not None and self.n_bytes + len(data) >= cut:
            data = data[: max(cut - self.n_bytes, 0)]
            await self._write(data)
            if self.cut_action == "reset":
                await self.reset()
                raise Closed("reset")
            await self.end()
            raise Closed("close")
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        self.n_bytes += len(data)
        if self.split is None:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
            return
        for piece in _split(data, self.split):
            self._check()
            await self._send({"type": "http.response.body", "body": piece, "more_body": True})
            if self.gap_s > 0:
                await self.sleep(self.gap_s)

    @property
    def chunked_transport(self) -> Transport | None:
        """The transport when body bytes may bypass the ASGI `send` (mock.pacer): the
        server frames a body as HTTP/1.1 chunks written straight to it, the response has
        started and not ended, and no write-shaping fault (BOM, cut, split) is set; None
        otherwise. Whoever writes to it adds the body bytes to `n_bytes`."""
        transport = self._transport
        if (
            transport is None
            or not self._chunked_writes
            or not self.has_started
            or self.has_ended
            or self.bom
            or self.split is not None
            or self.cut_bytes is not None
        ):
            return None
        return transport

    async def end(self, data: bytes = b"") -> None:
        """Send the last body bytes and end the response cleanly."""
        if data:
            await self.write(data)
        self._check()
        self.has_ended = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def reset(self) -> None:
        """Reset the connection (TCP RST) and wait until the server saw it go; without the
        transport extension, end the response cleanly instead."""
        transport = self.transport
        if transport is None:
            if not self.has_started:
                await self.start(200, [(b"content-type", b"text/plain")])
            self.has_ended = True
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        # An abort drops what the transport still buffers, and the promise is "N chunks,
        # then RST": let a slow reader take them first (bounded, in case it never reads).
        deadline = self._loop.time() + RESET_DRAIN_S
        while _buffered(transport) and self._loop.time() < deadline:
            await self.sleep(0.001)
        abort_transport(transport)
        await self.wait_closed()


def _buffered(transport: Transport) -> int:
    size = getattr(transport, "get_write_buffer_size", None)
    return int(size()) if callable(size) else 0


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _split(data: bytes, pattern: Literal["utf8", "byte"]) -> list[bytes]:
    if pattern == "byte":
        return [data[i : i + 1] for i in range(len(data))]
    pieces = []
    start = 0
    for match in _LEAD_BYTE.finditer(data):
        end = match.end()
        pieces.append(data[start:end])
        start = end
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]
