"""`GET /v1/chat/ws`: chat completions over a WebSocket, through the stream log.

Theory of operation
-------------------
One connection carries any number of answers, each named by the client's request `id`.
Frames are JSON text.

    client -> server   {"type": "auth", "token": "<gateway key>"}          (browsers)
                       {"type": "create", "id": "r1", "body": {<chat request>}}
                       {"type": "create", "id": "r1", "session_id": "...",
                        "body": {"content": "..."}}                        (a session turn)
                       {"type": "cancel", "id": "r1"}
                       {"type": "resume", "id": "r2", "stream_id": "...", "after": "17"}
    server -> client   {"type": "started", "id": "r1", "stream_id": "..."}
                       {"type": "chunk", "id": "r1", "event": "18", "data": {<chunk>}}
                       {"type": "done", "id": "r1"}
                       {"type": "error", "id": "r1", "error": {<OpenAI error>}}

An answer started here is produced into the stream log exactly like a streamed POST
(`Gateway.start_answer`), so a client whose connection broke reconnects and sends `resume`
with the last `event` it holds: the log replays the rest and then follows live, with no
gap and no repeat, on this instance or another. `create` answers are resumable (detached
generation) unless the body says `"unbroken": {"resumable": false}`.

Auth: the upgrade request's `Authorization` header, or - for browsers, which cannot set
headers on a WebSocket - a first `auth` frame within `AUTH_TIMEOUT_S`.

Heartbeat: the server pings every `ws_ping_interval_s` and closes the connection when a
pong is late by `ws_ping_timeout_s` (the WebSocket implementation does it; see
gateway/server.py).

Backpressure: one writer task drains a bounded queue of frames per connection. A client
that stops reading fills the socket buffers, then the queue; a frame that cannot be queued
within `send_timeout_s` closes the connection with code 4008 and stops every answer the
connection started (their upstream calls are cancelled at once). Imports core, gateway
siblings and msgspec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from unbroken.errors import UnbrokenError
from unbroken.gateway.asgi import Receive, Scope, Send
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError, from_unbroken
from unbroken.gateway.request import parse_chat_request
from unbroken.gateway.streams import DONE, Producer

if TYPE_CHECKING:
    from unbroken.gateway.app import Gateway

__all__ = ["CLOSE_NOT_READING", "WS_PATH", "ChatSocket"]

logger = logging.getLogger(__name__)

WS_PATH = "/v1/chat/ws"
# Close codes: 1008 (RFC 6455 policy violation) for auth; 4008 (application range) for a
# client that stopped reading, so it can tell that apart from a network failure.
CLOSE_POLICY = 1008
CLOSE_NOT_READING = 4008
# How long a browser has to send its `auth` frame.
AUTH_TIMEOUT_S = 10.0
# Requests one connection may run at once (each is an upstream answer).
MAX_ACTIVE = 32
_MAX_ID = 128
_encode = msgspec.json.encode


class _Closed(Exception):
    """The connection is closing; stop reading it."""


class ChatSocket:
    """One WebSocket connection (see the theory of operation above).

    Args:
        gateway: the gateway.
        scope, receive, send: the ASGI websocket triple.
    """

    def __init__(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
        self.gateway = gateway
        self.scope = scope
        self._receive = receive
        self._send = send
        g = gateway.settings.gateway
        self._send_timeout_s = g.send_timeout_s
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue(g.ws_queue_frames)
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._producers: dict[str, Producer] = {}
        self._closing = False
        self._close_code = 1000
        self._headers = dict(scope.get("headers", ()))

    # -- the connection ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return
        origin = self._headers.get(b"origin")
        if origin is not None and not self.gateway.origin_allowed_ws(
            origin, self._headers.get(b"host")
        ):
            # Before the accept: the handshake fails with 403, as for a CORS refusal.
            await self._send({"type": "websocket.close", "code": CLOSE_POLICY})
            return
        await self._send({"type": "websocket.accept"})
        writer = asyncio.get_running_loop().create_task(self._writer())
        try:
            caller = await self._authenticate()
            if caller is not None:
                await self._read(caller)
        except _Closed:
            pass
        finally:
            await self._shutdown(writer)

    async def _authenticate(self) -> Caller | None:
        keys = self.gateway.keys
        header = self._headers.get(b"authorization")
        if header is None and keys.required:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(AUTH_TIMEOUT_S):
                    frame = await self._next_frame()
                    token = frame.get("token") if frame.get("type") == "auth" else None
                    if isinstance(token, str):
                        header = b"Bearer " + token.encode("latin-1", "replace")
        try:
            return await keys.identify(header)
        except GatewayError as exc:
            await self._error(None, exc)
            self._close(CLOSE_POLICY)
            return None

    async def _next_frame(self) -> dict[str, Any]:
        """The next JSON object frame; malformed ones are answered with an error frame."""
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                raise _Closed
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            try:
                frame = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                await self._error(None, _bad("a frame is not JSON"))
                continue
            if not isinstance(frame, dict):
                await self._error(None, _bad("a frame must be a JSON object"))
                continue
            return frame

    async def _read(self, caller: Caller) -> None:
        while not self._closing:
            frame = await self._next_frame()
            kind, rid = frame.get("type"), frame.get("id")
            if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= _MAX_ID):
                await self._error(None, _bad(f"id must be a string of 1-{_MAX_ID} characters"))
                continue
            try:
                if kind == "create":
                    await self._create(caller, rid, frame.get("body"), frame.get("session_id"))
                elif kind == "resume":
                    await self._resume(caller, rid, frame.get("stream_id"), frame.get("after"))
                elif kind == "cancel":
                    await self._cancel(caller, rid)
                elif kind == "auth":
                    continue  # already authenticated (header), nothing to do
                else:
                    raise _bad(
                        f"unknown frame type {str(kind)[:40]!r}; use create, resume or cancel"
                    )
            except GatewayError as exc:
                await self._error(rid, exc)
            except UnbrokenError as exc:
                await self._error(rid, from_unbroken(exc, self.gateway.scrub))

    async def _shutdown(self, writer: asyncio.Task[None]) -> None:
        self._closing = True
        for rid, producer in list(self._producers.items()):
            # A connection that went away leaves resumable answers generating (a reconnect
            # resumes them); the producer's own rules decide, as for a dropped SSE reader.
            producer.detach(time.time())
            del self._producers[rid]
        for task in list(self._pumps.values()):
            task.cancel()
        for task in list(self._pumps.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not writer.done():
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(None)
            try:
                await asyncio.wait_for(writer, self._send_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                writer.cancel()

    # -- requests ----------------------------------------------------------------------------

    async def _create(
        self, caller: Caller, rid: str | None, body: object, session_id: object = None
    ) -> None:
        gateway = self.gateway
        if rid is None:
            raise _bad("create needs an id")
        if rid in self._pumps:
            raise _bad(f"id {rid!r} is already running on this connection")
        if len(self._pumps) >= MAX_ACTIVE:
            raise GatewayError(
                429,
                f"at most {MAX_ACTIVE} answers may run on one connection at once",
                type="rate_limit_error",
                code="too_many_requests",
            )
        if not isinstance(body, dict):
            raise _bad("create needs a body: the chat completion request object")
        gateway.check_draining()
        after = None
        if session_id is None:
            request = parse_chat_request(_encode(body), gateway.models, gateway.route_names)
        elif isinstance(session_id, str) and 0 < len(session_id) <= _MAX_ID:
            # A session turn, as POST /v1/sessions/{id}/messages: the body is the message
            # ({"content": ...}); both turns are stored when the answer is whole.
            request, after = await gateway.sessions.prepare_message(caller, session_id, body)
        else:
            raise _bad(f"session_id must be a string of 1-{_MAX_ID} characters")
        gateway.check_models(caller, request)
        resumable = True
        options = request.extra.pop("unbroken", None)
        if isinstance(options, dict) and isinstance(options.get("resumable"), bool):
            resumable = options["resumable"]
        producer = await gateway.start_answer(
            caller,
            request,
            self._forwarded(),
            resumable=resumable,
            after=after,
            session_id=session_id if after is not None else None,
        )
        producer.attach()
        self._producers[rid] = producer
        await self._put(_encode({"type": "started", "id": rid, "stream_id": producer.stream_id}))
        self._spawn(rid, producer.stream_id, 0, producer)

    async def _resume(
        self, caller: Caller, rid: str | None, stream_id: object, after: object
    ) -> None:
        from unbroken.core.streamlog import check_stream_id, parse_event_id

        if not isinstance(stream_id, str):
            raise _bad("resume needs a stream_id")
        try:
            stream_id = check_stream_id(stream_id)
            cursor = parse_event_id(None if after is None else str(after))
        except UnbrokenError as exc:
            raise _bad(exc.message) from None
        rid = rid or stream_id
        if rid in self._pumps:
            raise _bad(f"id {rid!r} is already running on this connection")
        hub = self.gateway.streams
        await hub.check(caller, stream_id, cursor)
        writer = await hub.writer(stream_id)
        if writer is not None:
            writer.attach()
            self._producers[rid] = writer
        self._spawn(rid, stream_id, cursor, None)

    async def _cancel(self, caller: Caller, rid: str | None) -> None:
        if rid is None or rid not in self._pumps:
            raise _bad(f"no answer {rid!r} runs on this connection")
        producer = self._producers.get(rid)
        if producer is not None:
            await self.gateway.streams.stop_stream(caller, producer.stream_id)

    def _spawn(self, rid: str, stream_id: str, after: int, producer: Producer | None) -> None:
        task = asyncio.get_running_loop().create_task(self._pump(rid, stream_id, after, producer))
        self._pumps[rid] = task

    async def _pump(self, rid: str, stream_id: str, after: int, producer: Producer | None) -> None:
        """Follow one answer's log into the outbox."""
        head = b'{"type":"chunk","id":' + _encode(rid) + b',"event":"'
        try:
            async for seq, payload in self.gateway.streams.follow(stream_id, after, producer):
                if payload == DONE:
                    await self._put(_encode({"type": "done", "id": rid}))
                    return
                if payload.startswith(b'{"error"'):
                    await self._put(b'{"type":"error","id":' + _encode(rid) + b"," + payload[1:])
                    continue
                await self._put(head + str(seq).encode() + b'","data":' + payload + b"}")
        except GatewayError as exc:
            await self._error(rid, exc)
        except _Closed:
            pass
        finally:
            self._pumps.pop(rid, None)
            attached = self._producers.pop(rid, None)
            if attached is not None:
                attached.detach(time.time())

    # -- writing -----------------------------------------------------------------------------

    async def _put(self, frame: bytes) -> None:
        if self._closing:
            raise _Closed
        try:
            self._outbox.put_nowait(frame)
            return
        except asyncio.QueueFull:
            pass
        try:
            await asyncio.wait_for(self._outbox.put(frame), self._send_timeout_s)
        except TimeoutError:
            self._not_reading()
            raise _Closed from None

    def _not_reading(self) -> None:
        if self._closing:
            return
        logger.info("websocket client stopped reading; closing it and stopping its answers")
        for producer in self._producers.values():
            producer.stop("stopped")
        self._close(CLOSE_NOT_READING)

    def _close(self, code: int) -> None:
        """Close after what is queued (or at once when the queue is full)."""
        self._closing = True
        self._close_code = code
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(None)
        if self._outbox.full():
            # The client is not reading: nothing queued will reach it anyway.
            while not self._outbox.empty():
                self._outbox.get_nowait()
            self._outbox.put_nowait(None)

    async def _writer(self) -> None:
        send = self._send
        try:
            while True:
                frame = await self._outbox.get()
                if frame is None:
                    break
                await send({"type": "websocket.send", "text": frame.decode()})
                if not self._outbox.empty():
                    # Let the loop deliver a lost connection before the next write: a send
                    # that finds the socket writable never yields, and writes to a dead
                    # socket are only counted (and logged) by asyncio.
                    await asyncio.sleep(0)
            await send({"type": "websocket.close", "code": self._close_code})
        except OSError:
            pass  # the connection is gone; the reader sees the disconnect

    async def _error(self, rid: str | None, error: GatewayError) -> None:
        frame = b'{"type":"error","id":' + _encode(rid) + b"," + error.body()[1:]
        with contextlib.suppress(_Closed):
            await self._put(frame)

    def _forwarded(self) -> dict[str, str]:
        return self.gateway.forwarded_headers(self.scope, None)


def _bad(message: str) -> GatewayError:
    return GatewayError(400, message, code="invalid_request")
