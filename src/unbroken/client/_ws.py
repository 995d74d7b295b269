"""The WebSocket transport of Client and AsyncClient (`transport="websocket"`): shared
connections to an unbroken gateway's `/v1/chat/ws` and the attempt drivers over them.

One connection per route and header set carries every answer of the client; a reader (a
thread for Client, a task for AsyncClient) routes each frame to its answer's queue by id.
When a connection drops, each answer on it reconnects (the first one opens the new
connection, the others join it) and sends `resume` after the last event it holds. The
decisions are `_wsproto.WsAttempt`'s; here is only I/O. Needs the `websockets` package
(`pip install 'unbroken[websocket]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from typing import TYPE_CHECKING

import anyio
import httpx
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect

from unbroken.client._common import AnswerRun
from unbroken.client._driver import MAX_ERROR_BODY_BYTES, status_error
from unbroken.client._wsproto import (
    Frame,
    Lost,
    WsAttempt,
    decode_frame,
    socket_headers,
    socket_key,
    socket_url,
)
from unbroken.core.attempt import Attempt
from unbroken.core.flow import AttemptOutcome
from unbroken.core.routes import Route
from unbroken.core.wire import ChatCompletionChunk
from unbroken.errors import TimeoutPhase, UnbrokenError, UpstreamConnectError

if TYPE_CHECKING:
    from unbroken.core.attempt import Timeouts

__all__ = ["AsyncSockets", "SyncSockets"]

logger = logging.getLogger(__name__)

Item = Frame | Lost
# Answers one connection carries at once: the gateway's limit per connection
# (gateway/ws.py MAX_ACTIVE); more answers open another connection.
MAX_ANSWERS_PER_SOCKET = 32
_SocketKey = tuple[str, tuple[tuple[str, str], ...]]


class _Closed(Exception):
    """The connection is closed: the answer must move to a new one."""


def _open_error(exc: Exception, route: Route, url: str) -> UnbrokenError:
    """Our error for a failed WebSocket handshake (as `map_transport_error` for HTTP)."""
    if isinstance(exc, InvalidStatus):
        response = exc.response
        body = bytes(response.body or b"")[:MAX_ERROR_BODY_BYTES]
        fake = httpx.Response(
            response.status_code,
            headers=list(response.headers.raw_items()),
            request=httpx.Request("GET", url.replace("ws", "http", 1)),
        )
        error = status_error(route, fake, body)
        if response.status_code in (404, 405):
            error.message += (
                f" (transport='websocket' needs an unbroken gateway at route {route.name!r})"
            )
            error.args = (error.message,)
        return error
    reason = str(exc) or type(exc).__name__
    return UpstreamConnectError(
        f"cannot open the WebSocket to route {route.name!r}: {reason[:200]}",
        kind="server_error",
        route=route.name,
    )


def _remaining(attempt: Attempt) -> tuple[float | None, TimeoutPhase | None]:
    expiry = attempt.expiry()
    if expiry is None:
        return None, None
    return max(0.0, expiry[0] - time.monotonic()), expiry[1]


def _open_s(timeouts: Timeouts, wait: float | None) -> float | None:
    # The handshake is the TCP connect and the upgrade's response: the connect timer alone
    # would cut a busy gateway's answer, which the HTTP path waits for under the headers
    # timer (`wait`, the attempt's next expiry). Without timers, the connect limit.
    if wait is not None:
        return max(0.001, wait)
    return timeouts.connect_s


# -- blocking ---------------------------------------------------------------------------------


class _SyncSocket:
    """One connection and the thread that reads it."""

    def __init__(
        self, url: str, headers: Mapping[str, str], open_s: float | None, max_size: int
    ) -> None:
        # Entered as its own context manager: websockets >= 17.1 wants that of a connection
        # kept open across calls (closed by `close()`), and older versions accept it.
        self.ws: SyncConnection = connect(
            url,
            additional_headers=dict(headers),
            user_agent_header=None,
            open_timeout=open_s,
            compression=None,  # small JSON frames: deflate costs more CPU than it saves
            max_size=max_size,
        ).__enter__()
        self.closed = False
        # An error frame without an id: the gateway refused the connection (a bad key).
        self.refusal: Frame | None = None
        self._lock = threading.Lock()
        self._queues: dict[str, queue.SimpleQueue[Item]] = {}
        self._thread = threading.Thread(target=self._read, name="unbroken-ws", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self.ws:
                frame = decode_frame(message)
                if frame is None:
                    continue
                if frame.id is None:
                    if frame.type == "error":
                        with self._lock:
                            self.refusal = frame
                            queues = list(self._queues.values())
                        for each in queues:
                            each.put(frame)
                    continue
                q = self._queues.get(frame.id)
                if q is not None:
                    q.put(frame)
        except (WebSocketException, OSError) as exc:
            logger.debug("websocket closed: %s", type(exc).__name__)
        finally:
            with self._lock:
                self.closed = True
                queues = list(self._queues.values())
            for q in queues:
                q.put(Lost(self))

    def register(self, rid: str, q: queue.SimpleQueue[Item]) -> None:
        # Joining a connection that was refused or closed meanwhile: the answer reads that
        # from its queue, as if it had been there.
        with self._lock:
            self._queues[rid] = q
            if self.refusal is not None:
                q.put(self.refusal)
            if self.closed:
                q.put(Lost(self))

    def unregister(self, rid: str) -> None:
        with self._lock:
            self._queues.pop(rid, None)

    @property
    def n_answers(self) -> int:
        return len(self._queues)

    def send(self, frame: bytes) -> None:
        try:
            self.ws.send(frame.decode())
        except (WebSocketException, OSError) as exc:
            raise _Closed from exc

    def close(self) -> None:
        with contextlib.suppress(WebSocketException, OSError):
            self.ws.close()
        self._thread.join(5.0)


class SyncSockets:
    """The connections of one Client, and the attempt driver over them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[_SocketKey, list[_SyncSocket]] = {}
        self._closed = False

    def _join(
        self,
        key: _SocketKey,
        headers: Mapping[str, str],
        open_s: float | None,
        max_size: int,
        rid: str,
        q: queue.SimpleQueue[Item],
    ) -> _SyncSocket:
        """Register answer `rid` on an open connection with room, opening one if none."""
        with self._lock:
            if self._closed:
                # Not a new connection behind the caller's back (a resume after close()).
                raise ConnectionError("the client is closed")
            sockets = self._sockets[key] = [s for s in self._sockets.get(key, ()) if not s.closed]
            sock = next((s for s in sockets if s.n_answers < MAX_ANSWERS_PER_SOCKET), None)
            if sock is None:
                # Opened under the lock: the other answers of a dropped connection wait
                # for this one instead of opening one each.
                sock = _SyncSocket(key[0], headers, open_s, max_size)
                sockets.append(sock)
            sock.register(rid, q)
            return sock

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            self._closed = True
            sockets = [s for group in self._sockets.values() for s in group]
            self._sockets.clear()
        for sock in sockets:
            sock.close()

    def attempt(
        self, run: AnswerRun, attempt: Attempt
    ) -> Generator[ChatCompletionChunk, None, AttemptOutcome]:
        """One attempt over the route's shared connection (see `_wsproto.WsAttempt`)."""
        wx = WsAttempt(run, attempt)
        url = socket_url(run, wx.route)
        headers = socket_headers(run, wx.route)
        key = socket_key(url, headers)
        max_size = run.config.max_event_bytes
        q: queue.SimpleQueue[Item] = queue.SimpleQueue()
        sock: _SyncSocket | None = None

        def join() -> _SyncSocket:
            wait, _ = _remaining(attempt)
            return self._join(key, headers, _open_s(run.timeouts, wait), max_size, wx.rid, q)

        try:
            try:
                sock = join()
            except (WebSocketException, OSError) as exc:
                return self._open_failed(wx, exc, url)
            with contextlib.suppress(_Closed):  # a closed connection says so in the queue
                sock.send(wx.create_frame())
            fired: TimeoutPhase | None = None
            while not wx.over:
                wait, phase = _remaining(attempt)
                try:
                    item = q.get(timeout=wait)
                except queue.Empty:
                    fired = phase
                    break
                if isinstance(item, Lost):
                    if item.socket is not sock:
                        continue  # a late notice from a connection this answer left
                    if not wx.lost(time.monotonic()):
                        break
                    sock = self._resume(wx, join, sock)
                    if sock is None:
                        break
                    continue
                chunks = wx.on_frame(item, time.monotonic())
                if chunks:
                    yield from chunks
            if wx.outcome is not None:
                return wx.outcome
            chunks, outcome = wx.ended(fired, time.monotonic())
            yield from chunks
            return outcome
        finally:
            if sock is not None:
                frame = wx.cancel_frame()
                if frame is not None:
                    with contextlib.suppress(_Closed):
                        sock.send(frame)  # stopped early or timed out: stop the gateway too
                sock.unregister(wx.rid)

    @staticmethod
    def _resume(
        wx: WsAttempt, join: Callable[[], _SyncSocket], old: _SyncSocket
    ) -> _SyncSocket | None:
        old.unregister(wx.rid)
        while (delay := wx.next_delay()) is not None:
            if delay:
                time.sleep(delay)  # backing off while the gateway comes back
            try:
                sock = join()
            except (WebSocketException, OSError):
                continue
            with contextlib.suppress(_Closed):  # then a Lost notice follows in the queue
                sock.send(wx.resume_frame())
            return sock
        logger.debug("answer %s: every reconnect failed; continuing upstream", wx.rid)
        wx.over = True  # the log is out of reach: the flow continues the answer upstream
        return None

    @staticmethod
    def _open_failed(wx: WsAttempt, exc: Exception, url: str) -> AttemptOutcome:
        logger.debug("opening the websocket to route %s failed: %r", wx.route.name, exc)
        now = time.monotonic()
        if isinstance(exc, TimeoutError):
            expiry = wx.attempt.expiry()
            phase: TimeoutPhase = "connect" if expiry is None else expiry[1]
            return wx.failed(wx.attempt.timeout_error(phase), now)
        return wx.failed(_open_error(exc, wx.route, url), now)


# -- async ------------------------------------------------------------------------------------


class _AsyncSocket:
    """One connection and the task that reads it (asyncio only: websockets' client)."""

    def __init__(self, ws: AsyncConnection) -> None:
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.refusal: Frame | None = None
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                frame = decode_frame(message)
                if frame is None:
                    continue
                if frame.id is None:
                    if frame.type == "error":
                        self.refusal = frame
                        for each in self._queues.values():
                            each.put_nowait(frame)
                    continue
                q = self._queues.get(frame.id)
                if q is not None:
                    q.put_nowait(frame)
        except (WebSocketException, OSError) as exc:
            logger.debug("websocket closed: %s", type(exc).__name__)
        finally:
            self.closed = True
            for q in self._queues.values():
                q.put_nowait(Lost(self))

    def register(self, rid: str, q: asyncio.Queue[Item]) -> None:
        self._queues[rid] = q
        if self.refusal is not None:
            q.put_nowait(self.refusal)
        if self.closed:
            q.put_nowait(Lost(self))

    def unregister(self, rid: str) -> None:
        self._queues.pop(rid, None)

    @property
    def n_answers(self) -> int:
        return len(self._queues)

    async def send(self, frame: bytes) -> None:
        try:
            await self.ws.send(frame.decode())
        except (WebSocketException, OSError) as exc:
            raise _Closed from exc

    async def aclose(self) -> None:
        with contextlib.suppress(WebSocketException, OSError):
            await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class AsyncSockets:
    """The connections of one AsyncClient, and the attempt driver over them."""

    def __init__(self) -> None:
        self._sockets: dict[_SocketKey, list[_AsyncSocket]] = {}
        # A lock serves one loop: a client used from several loops (asyncio.run twice)
        # gets a lock, and connections, per loop.
        self._locks: dict[_SocketKey, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}
        self._closed = False

    async def _join(
        self,
        key: _SocketKey,
        headers: Mapping[str, str],
        open_s: float | None,
        max_size: int,
        rid: str,
        q: asyncio.Queue[Item],
    ) -> _AsyncSocket:
        """Register answer `rid` on an open connection with room, opening one if none."""
        if self._closed:
            raise ConnectionError("the client is closed")
        loop = asyncio.get_running_loop()
        held = self._locks.get(key)
        if held is None or held[0] is not loop:
            held = self._locks[key] = (loop, asyncio.Lock())
        async with held[1]:
            sockets = self._sockets[key] = [
                s for s in self._sockets.get(key, ()) if not s.closed and s.loop is loop
            ]
            sock = next((s for s in sockets if s.n_answers < MAX_ANSWERS_PER_SOCKET), None)
            if sock is None:
                with anyio.fail_after(open_s):
                    ws = await aconnect(
                        key[0],
                        additional_headers=dict(headers),
                        user_agent_header=None,
                        open_timeout=None,  # the fail_after above bounds it
                        compression=None,
                        max_size=max_size,
                    )
                sock = _AsyncSocket(ws)
                sockets.append(sock)
            sock.register(rid, q)
            return sock

    async def aclose(self) -> None:
        """Close the connections made on the running loop (others died with their loop)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        sockets = [s for group in self._sockets.values() for s in group]
        self._sockets.clear()
        for sock in sockets:
            if sock.loop is loop:
                await sock.aclose()

    async def attempt(
        self, run: AnswerRun, attempt: Attempt, outcome: list[AttemptOutcome]
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """One attempt over the route's shared connection; appends its outcome."""
        wx = WsAttempt(run, attempt)
        url = socket_url(run, wx.route)
        headers = socket_headers(run, wx.route)
        key = socket_key(url, headers)
        max_size = run.config.max_event_bytes
        q: asyncio.Queue[Item] = asyncio.Queue()
        sock: _AsyncSocket | None = None

        async def join() -> _AsyncSocket:
            wait, _ = _remaining(attempt)
            return await self._join(key, headers, _open_s(run.timeouts, wait), max_size, wx.rid, q)

        try:
            try:
                sock = await join()
            except (WebSocketException, OSError, TimeoutError) as exc:
                outcome.append(SyncSockets._open_failed(wx, exc, url))
                return
            with contextlib.suppress(_Closed):  # a closed connection says so in the queue
                await sock.send(wx.create_frame())
            fired: TimeoutPhase | None = None
            while not wx.over:
                wait, phase = _remaining(attempt)
                item: Item | None = None
                with anyio.move_on_after(wait):
                    item = await q.get()
                if item is None:
                    fired = phase
                    break
                if isinstance(item, Lost):
                    if item.socket is not sock:
                        continue
                    if not wx.lost(time.monotonic()):
                        break
                    sock.unregister(wx.rid)
                    sock = await self._resume(wx, join, sock)
                    if sock is None:
                        break
                    continue
                for chunk in wx.on_frame(item, time.monotonic()):
                    yield chunk
            if wx.outcome is not None:
                outcome.append(wx.outcome)
                return
            chunks, result = wx.ended(fired, time.monotonic())
            for chunk in chunks:
                yield chunk
            outcome.append(result)
        finally:
            if sock is not None:
                frame = wx.cancel_frame()
                if frame is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(_Closed):
                        await sock.send(frame)
                sock.unregister(wx.rid)

    @staticmethod
    async def _resume(
        wx: WsAttempt,
        join: Callable[[], Awaitable[_AsyncSocket]],
        old: _AsyncSocket,
    ) -> _AsyncSocket | None:
        while (delay := wx.next_delay()) is not None:
            if delay:
                await anyio.sleep(delay)
            try:
                sock = await join()
            except (WebSocketException, OSError, TimeoutError):
                continue
            with contextlib.suppress(_Closed):
                await sock.send(wx.resume_frame())
            return sock
        logger.debug("answer %s: every reconnect failed; continuing upstream", wx.rid)
        wx.over = True
        return None
