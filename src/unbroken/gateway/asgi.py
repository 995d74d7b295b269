"""Raw-ASGI plumbing of the gateway: one `Exchange` per request (headers, bounded body
reading, JSON responses with optional gzip). Raw ASGI keeps the per-chunk path to one
function call into the server. Imports msgspec and gateway siblings.
"""

from __future__ import annotations

import gzip
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import msgspec

from unbroken.gateway.direct import DIRECT_EXTENSION, DirectBody
from unbroken.gateway.problems import GatewayError

__all__ = [
    "RESPONSE_EXTENSION",
    "TRANSPORT_EXTENSION",
    "Exchange",
    "Message",
    "Receive",
    "ResponseHooks",
    "Scope",
    "Send",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The scope extension under which our uvicorn protocol exposes the connection's transport
# (the mock's server uses the same name), so a slow client can be cut at once.
TRANSPORT_EXTENSION = "unbroken.transport"
# The scope extension under which the gateway's protocol offers `ResponseHooks`
# (gateway/guard.py `CycleHooks`).
RESPONSE_EXTENSION = "unbroken.response"
_JSON = b"application/json"


class LostWatcher(Protocol):
    """Who `ResponseHooks.watch` tells of a lost client: held as the object, not as a bound
    method (64 bytes per live answer; bench/stream_memory.py)."""

    def client_gone(self) -> None:
        """The client disconnected."""


class ResponseHooks(Protocol):
    """What the gateway's own server protocol offers a request beyond ASGI."""

    async def start_with(self, start: Message, body: Message) -> None:
        """Send the response's `start` and the first `body` part (more to come) in one
        write."""

    def start_now(self, start: Message, body: Message) -> bool:
        """`start_with` from synchronous code: False (nothing sent) when it cannot now."""

    def watch(self, watcher: LostWatcher) -> None:
        """Call `watcher.client_gone()` once when the client disconnects."""

    def unwatch(self) -> None:
        """Stop watching."""


class _Io:
    """An ASGI `receive` and `send` that are not one server object's own methods."""

    __slots__ = ("receive", "send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send


class Exchange:
    """One HTTP request and its response state.

    Args:
        scope, receive, send: the ASGI triple.
        headers_out: headers every response carries (request id, CORS).
        gzip_min_bytes: the smallest JSON body worth compressing.
    """

    __slots__ = (
        "_headers",
        "_io",
        "gzip_min_bytes",
        "headers_out",
        "scope",
        "started",
        "status",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers_out: list[tuple[bytes, bytes]],
        gzip_min_bytes: int,
        headers_in: dict[bytes, bytes] | None = None,
    ) -> None:
        self.scope = scope
        # The server's `receive` and `send` methods of one object (uvicorn's cycle): that
        # object, not the two bound methods held for the request's life (128 bytes per live
        # answer; bench/stream_memory.py).
        # (A bound method equals another of the same function and object.)
        server = getattr(send, "__self__", None)
        if (
            server is not None
            and receive == getattr(server, "receive", None)
            and send == getattr(server, "send", None)
        ):
            self._io: Any = server
        else:
            self._io = _Io(receive, send)
        self.headers_out = headers_out
        self.gzip_min_bytes = gzip_min_bytes
        self.started = False
        self.status = 0
        # The request's headers by name (`request_headers`): `headers_in` when the caller
        # made it already, else made when first asked for.
        self._headers: dict[bytes, bytes] | None = headers_in

    @property
    def receive(self) -> Receive:
        """The ASGI `receive`."""
        return self._io.receive  # type: ignore[no-any-return]  # the server's or `_Io`'s

    @property
    def send(self) -> Send:
        """The ASGI `send`."""
        return self._io.send  # type: ignore[no-any-return]  # the server's or `_Io`'s

    def header(self, name: bytes) -> bytes | None:
        """A request header (lowercase `name`); the last one wins when repeated."""
        headers = self._headers
        if headers is None:
            headers = self.request_headers()
        return headers.get(name)

    def request_headers(self) -> dict[bytes, bytes]:
        """The request's headers by lowercase name; the last one wins when repeated."""
        headers = self._headers
        if headers is None:
            headers = self._headers = dict(self.scope.get("headers", ()))
        return headers

    def forget_headers(self) -> None:
        """Let the request headers' dict go (`header` makes it again if asked): a live
        answer does not hold it (224 bytes; bench/stream_memory.py)."""
        self._headers = None

    def started_streaming(self) -> None:
        """The response has started (a streamed answer's head is out): nothing reads the
        request's headers any more, so they go, emptied in place from the scope's list
        (uvicorn's protocol holds it too): ~500 bytes per live answer
        (bench/stream_memory.py). Its own headers are out too: their tuples go (~70
        bytes; `respond_error` and the like answer only before the head)."""
        self._headers = None
        self.headers_out.clear()
        headers = self.scope.get("headers")
        if isinstance(headers, list):
            headers.clear()

    def finished(self) -> None:
        """The request is over (its app returned): the server's direct body and response
        hooks leave the scope. Each holds the server's request cycle, whose scope holds
        them: a reference cycle per request (with the connection's transport and flow
        control hanging off it) that waited for a garbage collection; broken, they go by
        refcount (~15 objects a request less for the young generation's collections)."""
        extensions = self.scope.get("extensions")
        if extensions is not None:
            extensions.pop(DIRECT_EXTENSION, None)
            extensions.pop(RESPONSE_EXTENSION, None)

    def transport(self) -> Any:
        """The connection's transport when the server exposes it, else None."""
        return self.scope.get("extensions", {}).get(TRANSPORT_EXTENSION)

    def direct_body(self) -> DirectBody | None:
        """The response's direct body writer (gateway/direct.py) when the server offers it."""
        return self.scope.get("extensions", {}).get(DIRECT_EXTENSION)  # type: ignore[no-any-return]  # set by gateway/guard.py

    async def read_body(self, limit: int) -> bytes:
        """The whole request body.

        Raises:
            GatewayError: 413 past `limit` bytes (checked on Content-Length first).
        """
        length = self.header(b"content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise self._too_large(limit)
        # The server's cycle gives a body all in at once (gateway/guard.py `take_body`).
        take = getattr(self._io, "take_body", None)
        if take is not None:
            whole: bytes | None = take()
            if whole is not None:
                if len(whole) > limit:
                    raise self._too_large(limit)
                return whole
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise GatewayError(499, "the client closed the connection", code="client_gone")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            if not message.get("more_body", False):
                # Mostly the whole body in one message: no list made and joined for it.
                if not parts:
                    return chunk
                parts.append(chunk)
                return b"".join(parts)
            parts.append(chunk)

    @staticmethod
    def _too_large(limit: int) -> GatewayError:
        return GatewayError(
            413,
            f"the request body exceeds the gateway's limit of {limit} bytes",
            code="request_too_large",
        )

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the status line and headers (plus the common ones)."""
        self.started = True
        self.status = status
        await self.send(
            {"type": "http.response.start", "status": status, "headers": headers + self.headers_out}
        )

    def hooks(self) -> ResponseHooks | None:
        """The server's `ResponseHooks` for this request, when it offers them."""
        return self.scope.get("extensions", {}).get(RESPONSE_EXTENSION)  # type: ignore[no-any-return]  # set by gateway/guard.py

    async def start_with(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """`start`, then `body` as the first part of a body with more to come: in one write
        when the server offers it (`ResponseHooks.start_with`)."""
        self.started = True
        self.status = status
        start = {
            "type": "http.response.start",
            "status": status,
            "headers": headers + self.headers_out,
        }
        part = {"type": "http.response.body", "body": body, "more_body": True}
        hooks = self.hooks()
        if hooks is not None:
            await hooks.start_with(start, part)
            return
        await self.send(start)
        await self.send(part)

    def start_now(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """`start_with` without awaiting, from a callback: False (nothing sent) when the
        server offers no `ResponseHooks` or cannot send both at once now."""
        hooks = self.hooks()
        if hooks is None or self.started:
            return False
        start = {
            "type": "http.response.start",
            "status": status,
            "headers": headers + self.headers_out,
        }
        if not hooks.start_now(
            start, {"type": "http.response.body", "body": body, "more_body": True}
        ):
            return False
        self.started = True
        self.status = status
        return True

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = _JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send a whole response; gzip it when the client accepts it and it is big enough."""
        extra = list(headers or [])
        if len(body) >= self.gzip_min_bytes and b"gzip" in (self.header(b"accept-encoding") or b""):
            body = gzip.compress(body, compresslevel=5)
            extra += [(b"content-encoding", b"gzip"), (b"vary", b"accept-encoding")]
        extra += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await self.start(status, extra)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def respond_json(self, status: int, data: Any) -> None:
        """Send `data` as JSON."""
        await self.respond(status, msgspec.json.encode(data))

    async def respond_error(self, error: GatewayError) -> None:
        """Send an OpenAI-shaped error."""
        await self.respond(error.status, error.body(), headers=error.headers())
