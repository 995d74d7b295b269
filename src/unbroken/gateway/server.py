"""Running the gateway under uvicorn: a bound socket, the asyncio loop (see DEFAULT_LOOP)
with httptools, and SIGTERM handling that drains.

On SIGTERM (or the first Ctrl+C) the gateway stops admitting chat requests (`/readyz` turns
503) and uvicorn stops accepting connections; in-flight answers keep streaming for up to
`drain_timeout_s`; streams still open then get an SSE error event saying the gateway is
shutting down, and the process exits. Imports uvicorn and gateway siblings.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

import uvicorn

from unbroken.gateway.app import Gateway
from unbroken.gateway.asgi import TRANSPORT_EXTENSION

__all__ = ["bind", "serve"]

logger = logging.getLogger(__name__)

# Time left to uvicorn after our drain deadline to flush the shutdown error events.
ABORT_GRACE_S = 3.0
# The asyncio loop rather than uvloop: at 256 streams of 5 ms tokens uvloop fell behind the
# mock's pace where asyncio kept up (an earlier bench/gateway.py comparison; at 32 streams they
# tied). What the gateway does on this loop is in docs/gateway.md's table (bench/gateway.py).
# The mock made the same choice (mock/server.py).
DEFAULT_LOOP = "asyncio"


def _protocol_class() -> type[Any]:
    """uvicorn's httptools protocol exposing the transport in the scope (so a slow client
    can be cut at once); h11's when httptools is missing."""
    if importlib.util.find_spec("httptools") is None:  # pragma: no cover - a [gateway] dependency
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TransportExposingProtocol(HttpToolsProtocol):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            scope = cast("dict[str, Any]", self.scope)
            scope.setdefault("extensions", {})[TRANSPORT_EXTENSION] = self.transport

    return TransportExposingProtocol


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. With `reuse_port`,
    several processes listen on one port and the kernel spreads connections over them
    (`--workers`, gateway/workers.py).

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the
    # protocol number says TCP. Without it, Nagle holds the first chunk behind the headers
    # until the client's delayed ACK (~40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_s: float) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._gateway.draining:
            logger.info(
                "draining: no new requests; %d in flight get up to %g s",
                self._gateway.n_active,
                self._drain_s,
                # A signal handler runs inside whatever request was executing: not its line.
                extra={"request_id": "-"},
            )
            self._gateway.begin_drain()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(
                    self._loop.call_later, self._drain_s, self._gateway.abort_streams
                )
        super().handle_exit(sig, frame)


def serve(
    gateway: Gateway,
    sock: socket.socket,
    *,
    on_ready: Callable[[str], None] | None = None,
    loop: str = DEFAULT_LOOP,
) -> None:
    """Serve `gateway` on the bound `sock` until SIGTERM / Ctrl+C, then drain and return.

    Args:
        gateway: the app.
        sock: a listening socket (`bind`).
        on_ready: called with the base URL before serving.
        loop: `asyncio` (default) or `uvloop`.
    """
    settings = gateway.settings.gateway
    config = uvicorn.Config(
        gateway,
        loop=loop,
        http=_protocol_class(),
        # The websockets implementation: it pings, and its send waits when the client does
        # not read, which is what /v1/chat/ws's backpressure needs.
        ws="websockets-sansio",
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ws_max_size=settings.max_body_bytes,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s + ABORT_GRACE_S),
        timeout_keep_alive=30,
        backlog=4096,
    )
    server = _DrainingServer(config, gateway, settings.drain_timeout_s)
    host, port = sock.getsockname()[:2]
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{port}")
    server.run(sockets=[sock])
