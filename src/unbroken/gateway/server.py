"""Running the gateway under uvicorn: a bound socket, uvloop (see DEFAULT_LOOP) with
httptools, and SIGTERM handling that drains.

On SIGTERM (or the first Ctrl+C) the gateway stops admitting chat requests (`/readyz` turns
503 at once); after SIGTERM the listener keeps accepting for `drain_grace_s` (new chats get
503 with Retry-After) before uvicorn stops accepting connections; in-flight answers keep
streaming for up to `drain_timeout_s`; streams still open then get an SSE error event saying
the gateway is shutting down, and the process exits. Closing the gateway after that
(`Gateway.aclose`: stream hub, store...) is bounded by `CLOSE_TIMEOUT_S`, and a watchdog
thread ends the process `EXIT_MARGIN_S` past all these bounds whatever still runs; a second
SIGTERM or Ctrl+C during the shutdown (a second apart from the first, at least) ends it at
once. Imports uvicorn and gateway siblings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from unbroken.gateway.accept import Acceptor
from unbroken.gateway.app import CLOSE_TIMEOUT_S, Gateway
from unbroken.gateway.guard import Guard, guarded_protocol, install_log_limits

__all__ = ["bind", "serve"]

logger = logging.getLogger(__name__)

# uvicorn's exit status when the app's lifespan startup fails (uvicorn.server's own).
STARTUP_FAILURE = 3
# Time left to uvicorn after our drain deadline to flush the shutdown error events.
ABORT_GRACE_S = 3.0
# Time after the drain, its abort grace and the close bound, for uvicorn's and the
# interpreter's last steps, before the watchdog ends the process.
EXIT_MARGIN_S = 5.0
# A signal this soon after the first is the same one delivered twice (to the process group
# and by the supervisor), not a second request.
SAME_SIGNAL_S = 1.0
# The exit status of a shutdown cut short (watchdog or second signal).
FORCED_EXIT = 1
# uvloop (uvicorn's "auto" picks it when installed; it comes with the [gateway] extra): at 32
# streams of 5 ms tokens the asyncio loop cost the gateway 101 us of CPU per relayed chunk,
# uvloop 75 us (bench/gateway.py, one run each). An earlier comparison had uvloop fall behind
# at 256 streams; that was the per-chunk task switches and ASGI sends of the relay, since gone
# (gateway/relay.py `LiveSink`).
DEFAULT_LOOP = "auto"


# Young-generation threshold and the older generations' multipliers (CPython's default:
# 700, 10, 10). Chunks are short-lived bytes and structs, freed by reference counting; what
# the collector must find is cycles of finished requests, which can wait that long. A young
# collection's pause grows with the threshold (~0.2 us per tracked object): at 50,000 the one
# collection of a 256-stream bench run stopped every stream for 10.4 ms; at 10,000 the five
# to six of the same run took 1.1-2.4 ms each, for the same total (gc.callbacks timings).
GC_THRESHOLDS = (10_000, 20, 100)
# File descriptors kept free beyond the connection cap: upstream connections, the store,
# the listener and logs. A process out of descriptors cannot even refuse politely.
SPARE_FDS = 256


def _fit_connection_cap(guard: Guard) -> None:
    """Raise the open-files limit to its hard maximum and keep the connection cap below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    room = max(16, soft - SPARE_FDS)
    if guard.max_connections > room:
        logger.warning(
            "max_connections %d lowered to %d to fit the open-files limit %d",
            guard.max_connections,
            room,
            soft,
        )
        guard.max_connections = room


def tune_gc() -> None:
    """Move what startup allocated (modules, settings, the app) out of the collector's
    sight and collect the young generation less often: the gateway allocates a few objects
    per relayed chunk, and with the default thresholds (700, 10, 10) each full collection
    walked every object of the process again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


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
    def __init__(
        self, config: uvicorn.Config, gateway: Gateway, drain_s: float, grace_s: float
    ) -> None:
        super().__init__(config)
        self._gateway = gateway
        self._drain_s = drain_s
        self._grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited = threading.Event()
        self._signalled_at: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's startup for the sockets `serve` passes, but with the listener an
        # `Acceptor` (gateway/accept.py: a batch of connections per readiness, where
        # uvloop's server takes one per turn of the loop).
        self._loop = loop = asyncio.get_running_loop()
        if sockets is None:  # pragma: no cover - `serve` always binds its socket first
            await super().startup(sockets)
            tune_gc()
            return
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]  # uvicorn's protocols take these
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                # This process's running loop: the protocol need not look it up.
                _loop=loop,
            )
            return protocol

        self.servers = [Acceptor(loop, sock, create_protocol) for sock in sockets]  # type: ignore[misc]  # uvicorn uses close() and wait_closed() of each
        self.started = True
        tune_gc()

    def _exit_now(self, why: str) -> None:
        """End the process at once: a shutdown cut short."""
        logger.error("shutdown: %s; exiting now", why, extra={"request_id": "-"})
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(FORCED_EXIT)

    def _start_watchdog(self, grace: float) -> None:
        """A thread that ends the process if it still runs past every shutdown bound: the
        listener's grace, the drain, its abort grace, the close bound and a margin. A
        thread, not a loop timer: it fires even when the loop is blocked or its last
        steps wait on a task that ignores cancellation."""
        limit = grace + self._drain_s + ABORT_GRACE_S + CLOSE_TIMEOUT_S + EXIT_MARGIN_S

        def watch() -> None:
            if not self._exited.wait(limit):
                self._exit_now(f"still running {limit:g} s after the signal")

        threading.Thread(target=watch, name="shutdown-watchdog", daemon=True).start()

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets)
        finally:
            self._exited.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._signalled_at is not None:
            # A second SIGTERM or Ctrl+C: the operator wants out now (uvicorn would only
            # stop waiting for connections, and a second SIGTERM not even that). One that
            # follows the first closely is the same request delivered twice: to the whole
            # process group (Ctrl+C, systemd) and forwarded by `--workers`' supervisor.
            if now - self._signalled_at >= SAME_SIGNAL_S:
                self._exit_now(f"second {signal.Signals(sig).name} during shutdown")
            return
        self._signalled_at = now
        if not self._gateway.draining:
            # SIGTERM comes from an orchestrator: keep the listener open for the grace
            # period so its probes see /readyz 503 and new chats get 503 + Retry-After
            # instead of a refused connection. Ctrl+C (SIGINT) skips the grace.
            grace = self._grace_s if sig == signal.SIGTERM else 0.0
            logger.info(
                "draining: no new chats; listener closes in %g s; %d in flight get up to %g s",
                grace,
                self._gateway.n_active,
                self._drain_s,
                # A signal handler runs inside whatever request was executing: not its line.
                extra={"request_id": "-"},
            )
            self._gateway.begin_drain()
            self._start_watchdog(grace)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(
                    self._loop.call_later, grace + self._drain_s, self._gateway.abort_streams
                )
                if grace > 0:
                    stop = functools.partial(super().handle_exit, sig, frame)
                    self._loop.call_soon_threadsafe(self._loop.call_later, grace, stop)
                    return
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
        loop: `auto` (uvloop when installed, the default), `asyncio` or `uvloop`.
    """
    settings = gateway.settings.gateway
    _fit_connection_cap(gateway.guard)
    install_log_limits()
    config = uvicorn.Config(
        gateway,
        loop=loop,
        http=guarded_protocol(gateway.guard),
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
    server = _DrainingServer(config, gateway, settings.drain_timeout_s, settings.drain_grace_s)
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_unspecified:
        gateway.guard.local_address = (host, port)
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{port}")
    server.run(sockets=[sock])
