"""Running ASGI apps under uvicorn: `ServerThread` (any app, in a background thread, on a
free loopback port), `MockServer` (the mock DeepSeek in a thread) and `serve` (blocking).

uvicorn runs on the asyncio loop with httptools (when installed) and a protocol that exposes the
connection's transport to the app (`scope["extensions"]["unbroken.transport"]`) so that the
mock can reset a connection with a real TCP RST. Imports uvicorn and httpx (the `[gateway]`
and core dependencies) and mock siblings.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

import httpx
import uvicorn

from unbroken.mock.app import MockApp, create_app
from unbroken.mock.config import DEFAULT_PORT, MockConfig
from unbroken.mock.exchange import CHUNKED_WRITES_EXTENSION, TRANSPORT_EXTENSION

__all__ = ["MockServer", "ServerThread", "http_protocol_class", "serve"]

# gc thresholds of a standalone mock process (CPython's defaults are 700, 10, 10).
SERVER_GC_THRESHOLDS = (50_000, 20, 100)
# How long start() waits for uvicorn to come up before giving up.
START_TIMEOUT_S = 10.0
# How long stop() lets open responses finish before uvicorn cancels them; the mock ends its
# own open exchanges first, so this only bounds a misbehaving app.
GRACEFUL_SHUTDOWN_S = 2.0


def http_protocol_class() -> type[Any]:
    """uvicorn's httptools protocol, subclassed to expose the transport to the app; h11's
    when httptools is not installed."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:  # pragma: no cover - httptools is installed with the [gateway] extra
        # Either class serves as the base; mypy types `Base` by the first import only.
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class TransportExposingProtocol(Base):
        """Adds `scope["extensions"]["unbroken.transport"]` to every HTTP scope, and turns
        Nagle's algorithm off.

        Also `"unbroken.chunked_writes"`: uvicorn sends a response without a length in
        chunked coding (HTTP/1.1 and 1.0 alike, HEAD and 204/304 aside) and keeps no count of
        a chunked body, so the app may write body chunks, framed the same way, straight to the
        transport between its `http.response.start` and its last `http.response.body`
        (mock.pacer does)."""

        def connection_made(self, transport: Any) -> None:
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, which a
            # socket accepted from a plain socket(AF_INET, SOCK_STREAM) listener is not.
            # With Nagle on, a chunk written right after the headers waits for their ACK
            # (up to 40 ms of delayed ACK), and a reset then discards it.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # uvicorn types the scope as a TypedDict without "extensions"; it is a dict.
            scope = cast("dict[str, Any]", self.scope)
            extensions = scope.setdefault("extensions", {})
            extensions[TRANSPORT_EXTENSION] = self.transport
            extensions[CHUNKED_WRITES_EXTENSION] = True

    if Base.__name__ == "H11Protocol":  # pragma: no cover - the h11 path has no such hook
        return Base
    return TransportExposingProtocol


def uvicorn_config(app: Callable[..., Any], **overrides: Any) -> uvicorn.Config:
    """A quiet uvicorn config for `app`: the asyncio loop, transport-exposing httptools, no
    lifespan, no websockets, no access log, a bounded graceful shutdown.

    The asyncio loop rather than uvloop: measured here (bench/mock.py), a uvloop server whose
    loop is busy with thousands of timed streams leaves new connections waiting for seconds
    (first byte p99 7-16 s for 2,000 streams opened over 1 s, against under 1 s with
    asyncio), while both stream ~1M chunks per CPU-second. Pass `loop="uvloop"` to override.
    """
    options: dict[str, Any] = {
        "loop": "asyncio",
        "http": http_protocol_class(),
        "ws": "none",
        "lifespan": "off",
        "access_log": False,
        "proxy_headers": False,
        "log_config": None,
        "log_level": "warning",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "timeout_keep_alive": 30,
        "backlog": 4096,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class ServerThread:
    """Run an ASGI app under uvicorn in a background thread on a loopback port.

    The socket is bound and listening before the thread starts, so `url` is valid at once
    and connections made before uvicorn is up wait in the backlog.

    Args:
        app: the ASGI application.
        host: the address to bind (loopback by default).
        port: the port; 0 picks a free one.
        on_stop: called (from the caller's thread) before uvicorn is told to exit.
        **uvicorn_options: overrides of `uvicorn_config`.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_stop: Callable[[], None] | None = None,
        **uvicorn_options: Any,
    ) -> None:
        self._config = uvicorn_config(app, **uvicorn_options)
        self._server = uvicorn.Server(self._config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(self._config.backlog)
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._on_stop = on_stop
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:54321`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self) -> None:
        """Start serving; returns once uvicorn is up.

        Raises:
            RuntimeError: uvicorn failed or did not start within START_TIMEOUT_S.
        """
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start: {self._error!r}")
            time.sleep(0.002)

    def serve_forever(self) -> None:
        """Serve in the calling thread until SIGINT or SIGTERM.

        uvicorn shuts down gracefully on either, then re-raises the signal: SIGTERM ends
        the process as signals do, Ctrl+C returns here quietly.
        """
        with contextlib.suppress(KeyboardInterrupt):
            self._server.run(sockets=[self._socket])

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        if self._on_stop is not None:
            self._on_stop()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S + GRACEFUL_SHUTDOWN_S + 5)
            self._thread = None
        with contextlib.suppress(OSError):
            self._socket.close()

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class MockServer:
    """The mock DeepSeek served by uvicorn in a background thread.

    Use as a context manager::

        with MockServer(MockConfig(seed=7)) as mock:
            client = openai.OpenAI(base_url=mock.url, api_key="sk-test")
            ...
            assert mock.stats()["streams"]["cancelled"] == 0

    Args:
        config: the mock's configuration (defaults: no delays, no faults, any key).
        host: the address to bind.
        port: the port; 0 (default) picks a free one.
    """

    def __init__(
        self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.app: MockApp = create_app(config)
        self._thread = ServerThread(self.app, host, port, on_stop=self.app.shutdown_threadsafe)

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:54321` (append `/beta` for prefix resume)."""
        return self._thread.url

    @property
    def port(self) -> int:
        """The port served."""
        return self._thread.port

    def start(self) -> None:
        """Start serving (the context manager calls it)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, ending open streams first (the context manager calls it)."""
        self._thread.stop()

    def _call(self, method: str, path: str) -> dict[str, Any]:
        response = httpx.request(method, self.url + path, timeout=10.0)
        response.raise_for_status()
        data: dict[str, Any] = json.loads(response.content)
        return data

    def stats(self) -> dict[str, Any]:
        """The counters of `GET /_mock/stats`."""
        return self._call("GET", "/_mock/stats")

    def log(self, limit: int = 100) -> list[dict[str, Any]]:
        """The recent requests of `GET /_mock/log`, oldest first."""
        entries: list[dict[str, Any]] = self._call("GET", f"/_mock/log?limit={limit}")["entries"]
        return entries

    def reset(self) -> None:
        """`POST /_mock/reset`: zero counters and log, forget fault keys and the cache."""
        self._call("POST", "/_mock/reset")

    def __enter__(self) -> MockServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    config: MockConfig | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    on_ready: Callable[[str], None] | None = None,
    loop: str = "asyncio",
) -> None:
    """Serve the mock DeepSeek in the foreground until interrupted (Ctrl+C / SIGTERM).

    Args:
        config: the configuration.
        host: the address to bind.
        port: the port (0 picks a free one; `on_ready` gets the URL).
        on_ready: called with the base URL once the socket listens.
        loop: the event loop, `asyncio` (default; see `uvicorn_config`) or `uvloop`.
    """
    # A dedicated process: tune its collector. With thousands of live streams a full (gen 2)
    # collection paused every stream at once for ~150 ms (bench/mock.py); the mock makes
    # few reference cycles, so collections can be rare. Startup objects are frozen out.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
    app = create_app(config)
    server = ServerThread(app, host, port, on_stop=app.shutdown_threadsafe, loop=loop)
    if on_ready is not None:
        on_ready(server.url)
    server.serve_forever()
