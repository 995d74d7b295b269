"""The gateway ASGI application: routing, request ids, CORS, keys and limits around the
SDK's `AsyncClient`, which does the upstream work (retries, resume, fallbacks).

    app = create_app(Settings.load("unbroken.toml"))

Raw ASGI, no framework: the chat path is one dict lookup, then `StreamRelay`. Imports
client, core, stores, instrumentation, settings and gateway siblings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

import httpx
from prometheus_client import CollectorRegistry

from unbroken.client import AsyncClient, AsyncStream
from unbroken.core.attempt import Timeouts
from unbroken.core.backoff import RetryBudget, RetryPolicy
from unbroken.core.pricing import PriceTable
from unbroken.core.routes import Route
from unbroken.core.wire import Answer, ChatCompletion
from unbroken.errors import StoreError, UnbrokenError
from unbroken.gateway.accesslog import (
    RequestRecord,
    current_request,
    new_request_id,
    write_access_line,
)
from unbroken.gateway.asgi import Exchange, Receive, Scope, Send
from unbroken.gateway.budget import Bookings
from unbroken.gateway.cache import AnswerCache, RecordingStream
from unbroken.gateway.cache_admin import CacheAdmin
from unbroken.gateway.detach import DETACH_EXTENSION, Detached, Parked
from unbroken.gateway.exposure import RequestPolicy
from unbroken.gateway.guard import Guard
from unbroken.gateway.keys import Caller, KeyRing
from unbroken.gateway.limits import Admission, Limiter
from unbroken.gateway.metrics import GatewayMetrics
from unbroken.gateway.openapi import allowed_methods, openapi
from unbroken.gateway.problems import GatewayError, Scrubber, from_unbroken
from unbroken.gateway.quota import has_rate_limits, level_headers, rate_limit_headers
from unbroken.gateway.relay import RelayResult, StreamRelay
from unbroken.gateway.request import ChatRequest, parse_chat_request
from unbroken.gateway.routing import ModelRouter, ServedModels, base_routes
from unbroken.gateway.scopes import shielded
from unbroken.gateway.serving import BreakerWatch
from unbroken.gateway.session_limits import SessionLimits
from unbroken.gateway.sessions import SESSIONS_PATH, SessionEndpoints, open_session_store
from unbroken.gateway.streams import (
    GATEWAY_HEADER,
    STREAM_ID_HEADER,
    STREAMS_PATH,
    Producer,
    StreamHub,
    open_stream_log,
)
from unbroken.gateway.telemetry import SpanHook, Telemetry
from unbroken.gateway.upstream import LeanTransport, pool_size
from unbroken.gateway.usage import UsageBook, day_of, parse_usage_query
from unbroken.gateway.web import WebUI
from unbroken.gateway.widget_tokens import WidgetTokens
from unbroken.gateway.ws import WS_PATH, ChatSocket
from unbroken.instrumentation import Hook, PrometheusHook
from unbroken.settings import Settings
from unbroken.stores import Store, open_store
from unbroken.stores.streamlog import StreamLog

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["Gateway", "build_upstream", "create_app", "upstream_transport"]

logger = logging.getLogger(__name__)

# A handler may return what is left of its work (the chat's relay), for `_http` to await
# in its place: the handler's own coroutine is then not held for an answer's life.
Handler = Callable[[Exchange], Awaitable[Awaitable[None] | None]]
# What closing the gateway (`Gateway.aclose`: stream hub, bookings, upstream client,
# sessions, cache, store) may take in all after the drain: past it the steps left are
# abandoned, so a store that stops answering cannot keep the process from exiting.
CLOSE_TIMEOUT_S = 10.0

_T = TypeVar("_T")

# A client's X-Request-ID is kept when it looks like an id; anything else is replaced, so
# no one can inject text into our logs or headers through it.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# The chat route's paths (`_http` takes them before the other routes).
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
# Request headers that are the gateway's or the connection's, never the upstream's.
_NEVER_FORWARDED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)
_ALLOWED_HEADERS = b"authorization, content-type, x-request-id, last-event-id, x-unbroken-resumable"


def build_upstream(
    settings: Settings,
    hooks: list[Hook],
    transport: httpx.AsyncBaseTransport | None = None,
    prices: PriceTable | None = None,
) -> AsyncClient:
    """The shared `AsyncClient` for the configured routes, on `transport` (default: a new
    `upstream_transport(settings)`); closing the AsyncClient closes the transport."""
    g = settings.gateway
    return AsyncClient(
        routes=base_routes(settings),
        prices=prices,
        timeouts=Timeouts(
            connect_s=g.connect_s,
            headers_s=g.headers_s,
            first_token_s=g.first_token_s,
            idle_s=g.idle_s,
            failover_s=g.failover_s,
        ),
        retry=RetryPolicy(
            attempts=g.retry_attempts,
            max_resumes=g.max_resumes,
            wait_initial_s=g.retry_wait_initial_s,
            wait_max_s=max(g.retry_wait_max_s, g.retry_wait_initial_s),
        ),
        retry_budget=RetryBudget(
            ratio=g.retry_budget_ratio,
            min_per_s=g.retry_budget_min_per_s,
            window_s=g.retry_budget_window_s,
        ),
        hooks=hooks,
        max_event_bytes=settings.max_event_bytes,
        transport=transport if transport is not None else upstream_transport(settings),
    )


def upstream_transport(settings: Settings) -> LeanTransport:
    """The transport of the upstream calls: a `LeanTransport` of `pool_size` connections
    whose read-ahead is the per-stream buffer bound, through the proxies of
    `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`."""
    g = settings.gateway
    return LeanTransport(
        max_connections=pool_size(g.upstream_connections, g.max_connections),
        high_water_bytes=g.stream_buffer_bytes,
        proxy_env=dict(settings.proxy_env),
    )


class Gateway:
    """The gateway application (an ASGI callable).

    Args:
        settings: the settings (`settings.gateway` above all).
        store: the state store; default from `settings.gateway.store`.
        upstream: the SDK client to use upstream; default `build_upstream(settings)`.
        registry: the Prometheus registry of `/metrics`; default a new one.
        stream_log: the log of streamed answers; default from `settings.gateway.store`.
        tracer_provider: an OpenTelemetry tracer provider for the request spans; default
            an OTLP exporter on `gateway.otel_endpoint` when set, else no tracing.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        upstream: AsyncClient | None = None,
        registry: CollectorRegistry | None = None,
        stream_log: StreamLog | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        g = settings.gateway
        self.settings = settings
        self.store: Store = store if store is not None else open_store(g.store)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.guard = Guard(g, self.metrics)
        self.router = ModelRouter(settings)
        self.telemetry = Telemetry(tracer_provider, g.otel_endpoint)
        # Follows the breakers the client reports (only on the client built here).
        self.breakers = BreakerWatch()
        if upstream is None:
            # The hooks register collectors: only for the client built here (a caller's own
            # client brings its own, on the registry it passed).
            hooks: list[Hook] = [PrometheusHook(self.registry), self.breakers]
            if self.telemetry.enabled:
                hooks.append(SpanHook())
            upstream = build_upstream(settings, hooks, prices=self.router.prices)
        self.client = upstream
        self.usage = UsageBook(self.store, self.router.prices)
        self.keys = KeyRing(g, self.store, WidgetTokens(g).caller if g.has_widget_tokens else None)
        self.policy = RequestPolicy(g, keys_required=self.keys.required)
        self.sessions = SessionEndpoints(
            self, open_session_store(g.sessions), SessionLimits(g, self.store)
        )
        self.streams = StreamHub(self, stream_log or open_stream_log(g))
        self.limiter = Limiter(self.store, g.slot_lease_s, fail_open=g.store_failure == "open")
        self.bookings = Bookings(self.limiter, self.registry)
        self.limiter.on_store_failure = self.bookings.count_failure
        self.cache = AnswerCache(g.cache, self.registry) if g.cache.enabled else None
        self.cache_admin = CacheAdmin(self)
        routes = settings.upstream_routes()
        self.scrub = Scrubber([settings.api_key, *(r.api_key for r in routes)])
        self.route_names = frozenset(r.name for r in routes)
        self.web = WebUI(frozenset(self.models), auth_required=self.keys.required)
        # DeepSeek answers with one choice; asking it for more would only be retried.
        self._max_choices = 1 if all(r.dialect == "deepseek" for r in routes) else 16
        self.draining = False
        self._relays: set[StreamRelay] = set()
        # The ASGI entry of `http` scopes, for a server that knows the scope's type before
        # it calls the app (gateway/guard.py): one coroutine less on every request's stack,
        # 256 bytes per live answer (bench/stream_memory.py).
        self.asgi_http: Callable[[Scope, Receive, Send], Awaitable[None]] = self._http
        self._origins = frozenset(g.cors_origins)
        self._exact = frozenset(h.lower() for h in g.forward_headers if not h.endswith("*"))
        self._prefixes = tuple(h.lower()[:-1] for h in g.forward_headers if h.endswith("*"))
        self._routes: dict[str, tuple[str, Handler]] = {
            # (Taken first by `_http`: _CHAT_PATHS.)
            "/v1/chat/completions": ("POST", self._chat),
            "/chat/completions": ("POST", self._chat),
            "/v1/models": ("GET", self._models),
            "/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/openapi.json": ("GET", self._openapi),
            "/v1/usage": ("GET", self._usage),
        }

    def __repr__(self) -> str:
        return f"Gateway(routes={sorted(self.route_names)}, store={self.store!r})"

    async def _upstream_models(self) -> list[Any]:
        # The first route's model list, as the router reads it ({"id": ...} items).
        return [{"id": getattr(model, "id", None)} for model in await self.client.models.list()]

    @property
    def models(self) -> ServedModels:
        """The model names served (see `gateway.routing`)."""
        return self.router.served

    # -- lifecycle ---------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop admitting chat requests (`/readyz` turns 503); in-flight ones go on."""
        self.draining = True
        self.metrics.draining.set(1)

    @property
    def n_active(self) -> int:
        """Chat requests in flight."""
        return len(self._relays)

    def abort_streams(self) -> None:
        """End every in-flight answer now with a `shutting_down` error (drain deadline)."""
        for relay in list(self._relays):
            relay.stop("shutdown")
        self.streams.abort()

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the stream hub (releasing its leases), bookings, the upstream client, the
        sessions, the cache and the store, in that order, within `timeout_s` in all.

        A step still running at the deadline is abandoned (cancelled, not awaited) and the
        steps after it are skipped: an error names them, so a store that stops answering
        cannot keep the process from exiting.
        """
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("stream hub", self.streams.aclose),
            ("bookings", self.bookings.aclose),
            ("upstream client", self.client.aclose),
            ("sessions", self.sessions.aclose),
        ]
        if self.cache is not None:
            steps.append(("answer cache", self.cache.aclose))
        steps.append(("store", self.store.aclose))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            for i, (name, close) in enumerate(steps):
                # Each step in a task waited with a timeout, rather than cancelled in place:
                # a step that swallows its cancellation cannot hold the rest either.
                task = asyncio.ensure_future(close())
                done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
                if not done:
                    task.cancel()
                    skipped = ", ".join(n for n, _ in steps[i + 1 :]) or "none"
                    logger.error(
                        "shutdown: closing the %s did not finish within %g s; abandoned "
                        "(steps skipped: %s)",
                        name,
                        timeout_s,
                        skipped,
                        extra={"request_id": "-"},
                    )
                    return
                task.result()
        finally:
            self.telemetry.shutdown()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.streams.start_ticker()  # leases, the orphan sweeper, retention
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            if scope["path"] == WS_PATH and self.policy.host_ok(scope):
                await ChatSocket(self, scope, receive, send).run()
            else:
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})

    def _common_headers(
        self, headers_in: dict[bytes, bytes]
    ) -> tuple[bytes, bytes | None, list[tuple[bytes, bytes]]]:
        request_id = headers_in.get(b"x-request-id")
        origin = headers_in.get(b"origin")
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = new_request_id()
        headers = [(b"x-request-id", request_id), GATEWAY_HEADER]
        if origin is not None and self._origin_allowed(origin):
            headers += [
                (b"access-control-allow-origin", origin),
                (b"vary", b"origin"),
                (
                    b"access-control-expose-headers",
                    b"x-request-id, retry-after, x-unbroken-stream-id, x-unbroken-gateway",
                ),
            ]
        return request_id, origin, headers

    def _origin_allowed(self, origin: bytes) -> bool:
        return "*" in self._origins or origin.decode("latin-1") in self._origins

    def origin_allowed_ws(self, origin: bytes, host: bytes | None) -> bool:
        """May a page from `origin` open a WebSocket to `host`? Browsers do not apply CORS
        to WebSockets, so the gateway checks: an allowed origin, or its own pages."""
        if self._origin_allowed(origin):
            return True
        return host is not None and origin.split(b"://", 1)[-1] == host

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        # The request's headers by name, made once: the lookups below and the handler's
        # (`Exchange.header`) read it, not the header list once each.
        headers_in = dict(scope.get("headers", ()))
        request_id, origin, headers = self._common_headers(headers_in)
        ex = Exchange(
            scope, receive, send, headers, self.settings.gateway.gzip_min_bytes, headers_in
        )
        record = RequestRecord.begin(request_id.decode(), method, path)
        parked = False
        try:
            self.policy.check(scope, headers_in)
            del headers_in  # the exchange's now (it lets it go before a live answer streams)
            if path in _CHAT_PATHS and method == "POST":
                # A chat request (most of them): none of the other routes' checks.
                await (await self._chat(ex))
                return
            if method == "OPTIONS":
                await self._preflight(ex, origin)
                return
            if path in ("/v1/models", "/models"):
                # Discovery mode: the upstream's model names, fetched when due.
                await self.router.refresh(self._upstream_models, time.monotonic())
            entry = self._routes.get(path)
            if entry is None and path.startswith(SESSIONS_PATH):
                await self.sessions.handle(ex, method, path)
                return
            if entry is None and path.startswith((STREAMS_PATH + "/", "/streams/")):
                await self.streams.handle(ex, method, path)
                return
            if entry is None and CacheAdmin.handles(path):
                await self.cache_admin.handle(ex, method, path)
                return
            if entry is None and self.web.handles(path):
                await self.web.handle(ex, method, path)
                return
            if entry is None:
                raise _no_such_endpoint(method, path)
            allowed, handler = entry
            if method != allowed:
                raise GatewayError(
                    405,
                    f"method {method} is not allowed on {path}; use {allowed}",
                    code="method_not_allowed",
                    headers=[(b"allow", allowed.encode())],
                )
            rest = await handler(ex)
            if rest is not None:
                await rest
        except Parked as exc:
            # The live answer's reader detached (gateway/detach.py): `_http_resume` ends it.
            parked = True
            detached = exc.detached
            detached.ex, detached.record = ex, record
            # Not the request id's bytes: the record has it (~70 bytes a live answer).
            detached.method, detached.path = method, path
            raise
        except (GatewayError, UnbrokenError) as exc:
            await self._http_failed(ex, record, exc)
        except Exception as exc:
            await self._http_crashed(ex, record, method, path, request_id, exc)
        finally:
            if not parked:
                self._http_done(ex, record, path)

    async def _http_resume(self, detached: Detached) -> None:
        """The rest of `_http` for a detached reader (gateway/detach.py)."""
        ex, record = detached.ex, detached.record
        parked = False
        try:
            if detached.writer is None:  # a GET /v1/streams/{id} (no answer of its own)
                await self.streams.sse_resume(detached)
            else:
                await self._chat_resume(detached)
        except Parked:
            parked = True
            raise
        except (GatewayError, UnbrokenError) as exc:
            await self._http_failed(ex, record, exc)
        except Exception as exc:
            request_id = record.request_id.encode()
            await self._http_crashed(ex, record, detached.method, detached.path, request_id, exc)
        finally:
            if not parked:
                self._http_done(ex, record, detached.path)

    async def _http_failed(
        self, ex: Exchange, record: RequestRecord, exc: GatewayError | UnbrokenError
    ) -> None:
        # UnbrokenError: a store failure (StoreError -> 503) or the like, outside a relay.
        error = exc if isinstance(exc, GatewayError) else from_unbroken(exc, self.scrub)
        record.error = error.code or str(error.status)
        if isinstance(exc, StoreError):
            self.metrics.store_errors.inc()
        if error.status in (401, 403, 413, 415, 429):
            self.metrics.rejections.labels(error.code or str(error.status)).inc()
        if not ex.started:
            await ex.respond_error(error)

    async def _http_crashed(
        self,
        ex: Exchange,
        record: RequestRecord,
        method: str,
        path: str,
        request_id: bytes,
        exc: Exception,
    ) -> None:
        # A bug must not kill the process, hang the client or show it a traceback.
        record.error = "internal_error"
        logger.error(
            "unexpected error on %s %s",
            method,
            path,
            exc_info=exc,
            extra={"request_id": request_id},
        )
        if not ex.started:
            await ex.respond_error(
                GatewayError(
                    500,
                    f"internal gateway error; quote request id {request_id.decode()}",
                    type="server_error",
                    code="internal_error",
                )
            )

    def _http_done(self, ex: Exchange, record: RequestRecord, path: str) -> None:
        ex.finished()
        self.metrics.request(path, ex.status)
        record.finish(ex.status)
        self.metrics.observe(path, record.outcome or "ok", record.duration_s)
        if self.settings.gateway.access_log:
            write_access_line(record)

    async def _preflight(self, ex: Exchange, origin: bytes | None) -> None:
        if origin is None:
            methods = allowed_methods(ex.scope["path"])
            if methods is None:
                raise _no_such_endpoint("OPTIONS", ex.scope["path"])
            await ex.start(204, [(b"allow", ", ".join((*methods, "OPTIONS")).encode())])
            await ex.send({"type": "http.response.body", "body": b""})
            return
        if not self._origin_allowed(origin):
            raise GatewayError(
                403,
                f"origin {origin.decode('latin-1')[:100]!r} is not in the gateway's CORS "
                "allow-list (gateway.cors_origins)",
                type="permission_error",
                code="origin_not_allowed",
            )
        requested = ex.header(b"access-control-request-headers") or _ALLOWED_HEADERS
        await ex.start(
            204,
            [
                (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                (b"access-control-allow-headers", requested),
                (b"access-control-max-age", b"600"),
            ],
        )
        await ex.send({"type": "http.response.body", "body": b""})

    # -- endpoints ---------------------------------------------------------------------------

    def _forwarded(self, ex: Exchange, request_id: bytes) -> dict[str, str]:
        return self.forwarded_headers(ex.scope, request_id, ex.request_headers())

    def forwarded_headers(
        self,
        scope: Scope,
        request_id: bytes | None,
        by_name: dict[bytes, bytes] | None = None,
    ) -> dict[str, str]:
        """The request headers passed upstream: the request id (a new one when None) and
        those `forward_headers` names, never Authorization, Host or hop-by-hop ones
        (`by_name`: the scope's headers by name, when made already)."""
        rid = request_id.decode("latin-1") if request_id is not None else uuid.uuid4().hex
        headers = {"X-Request-ID": rid}
        if not self.telemetry.enabled:
            # No span of ours: a client's trace context goes upstream as is (the last one).
            if by_name is None:
                by_name = dict(scope.get("headers", ()))
            traceparent = by_name.get(b"traceparent")
            if traceparent is not None:
                headers["traceparent"] = traceparent.decode("latin-1")
        if not self._exact and not self._prefixes:
            return headers
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1")
            if name in _NEVER_FORWARDED:
                continue
            if name in self._exact or name.startswith(self._prefixes):
                headers[name] = raw_value.decode("latin-1")
        return headers

    def serving_route(self) -> Route:
        """The route the next answer would start on: the first whose breaker is not open."""
        return self.breakers.first_allowed(self.client.routes)

    def check_draining(self) -> None:
        """Raise the 503 of a draining gateway."""
        if self.draining:
            raise GatewayError(
                503,
                "the gateway is shutting down; retry on another instance",
                type="server_error",
                code="shutting_down",
                retry_after_s=1.0,
            )

    async def _chat(self, ex: Exchange) -> Awaitable[None]:
        """Identify, read and parse a chat request; what is left (`serve_chat`) is returned
        for `_http` to await: one coroutine less (272 bytes) on a live answer's stack."""
        g = self.settings.gateway
        if self.draining:
            self.check_draining()
        caller = await self.keys.identify(ex.header(b"authorization"))
        raw = await ex.read_body(g.max_body_bytes)
        try:
            request = parse_chat_request(raw, self.models, self.route_names)
        except GatewayError as exc:
            if exc.code != "model_not_found" or not self.router.discovers:
                raise
            # A name not served yet: ask the upstream what it serves (when due), then check.
            await self.router.refresh(self._upstream_models, time.monotonic())
            request = parse_chat_request(raw, self.models, self.route_names)
        del raw  # parsed: not kept for the whole answer (its size again per live stream)
        return self.serve_chat(ex, caller, request, detachable=True)

    def check_models(self, caller: Caller, request: ChatRequest) -> None:
        """Refuse a request for a model the caller's key may not use.

        Raises:
            GatewayError: 403 naming the key and the model.
        """
        n = request.extra.get("n")
        if isinstance(n, int) and n > self._max_choices:
            raise GatewayError(
                400,
                f"n must be at most {self._max_choices} here: the upstream answers with "
                f"one choice, got {n}",
                code="invalid_value",
                param="n",
            )
        if caller.models is None:
            return
        for model in (request.model, *request.fallbacks):
            if model in self.models and model not in caller.models:
                raise GatewayError(
                    403,
                    f"key {caller.name!r} may not use the model {model!r}",
                    type="permission_error",
                    code="model_not_allowed",
                    param="model",
                )

    async def start_answer(
        self,
        caller: Caller,
        request: ChatRequest,
        headers: dict[str, str],
        *,
        resumable: bool,
        after: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        session_id: str | None = None,
        cache_key: str | None = None,
    ) -> Producer:
        """Admit a checked streamed request and start producing it into the stream log
        (SSE and WebSocket answers both start here); usage is booked when it ends, and a
        whole answer is stored under `cache_key` in the answer cache."""
        producer, _ = await self._start_answer(
            caller,
            request,
            headers,
            resumable=resumable,
            after=after,
            session_id=session_id,
            cache_key=cache_key,
        )
        return producer

    async def _start_answer(
        self,
        caller: Caller,
        request: ChatRequest,
        headers: dict[str, str],
        *,
        resumable: bool,
        after: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        session_id: str | None = None,
        cache_key: str | None = None,
        traceparent: bytes | None = None,
        start_now: bool = False,
    ) -> tuple[Producer, _Booking]:
        """`start_answer`'s work, and the booking; `start_now`: the producer's first step
        (to its upstream write) runs as soon as it exists (see `serve_chat`)."""
        booking = await _Booking.admit(self, caller, request, after)
        if self.telemetry.enabled:
            self._trace(booking, request, headers, traceparent)
        on_complete: Callable[[ChatCompletion], Awaitable[None]] | None = None
        wrap: Callable[[AsyncStream], AsyncStream] | None = None
        if cache_key is not None:
            # Only with the answer cache: its recorder and the completion that stores the
            # answer (closures made per request otherwise for nothing).
            on_complete, wrap = self._recorded(booking, request.model, cache_key)
        try:
            producer = await self.streams.start(
                caller,
                request,
                headers,
                resumable=resumable,
                on_complete=on_complete,
                booking=booking,
                renew_slot=booking.renew if booking.admission.lease is not None else None,
                wrap=wrap,
                start_now=start_now,
            )
        except BaseException:
            await booking.book(None)
            raise
        if session_id is not None:
            await self.streams.log.link_session(session_id, producer.stream_id, time.time())
        return producer, booking

    def _recorded(
        self, booking: _Booking, model: str, cache_key: str
    ) -> tuple[Callable[[ChatCompletion], Awaitable[None]], Callable[[AsyncStream], AsyncStream]]:
        """A producer's completion and stream wrapper that keep its answer in the cache."""
        recorded: list[RecordingStream] = []

        def record(stream: AsyncStream) -> AsyncStream:
            recorded.append(RecordingStream(stream))
            return recorded[-1]

        async def complete(completion: ChatCompletion) -> None:
            await booking.complete(completion)
            if recorded:
                # Kept from the producer, so an answer that finished detached is cached too.
                await self._remember(cache_key, recorded[-1].encoded(), completion, model)

        return complete, record

    def _trace(
        self,
        booking: _Booking,
        request: ChatRequest,
        headers: dict[str, str],
        traceparent: bytes | None,
    ) -> None:
        # The request's span (call when tracing): its traceparent goes upstream, and it
        # ends when the answer is booked, however and wherever it ends.
        routes = self.router.routes_for(request.model) or self.client.routes
        provider = "deepseek" if routes[0].dialect == "deepseek" else "openai"
        span = self.telemetry.start(request, traceparent, provider)
        self.telemetry.inject(span, headers)
        booking.on_booked = lambda completion, completed: self.telemetry.end(
            span, "complete" if completed else "error", completion
        )

    async def _admitted(
        self,
        ex: Exchange,
        caller: Caller,
        admit: Awaitable[_T],
        booking_of: Callable[[_T], _Booking],
    ) -> _T:
        # OpenAI's x-ratelimit-* headers on the answer, and on a 429 of our limits.
        try:
            admitted = await admit
        except GatewayError as exc:
            if exc.status == 429 and has_rate_limits(caller):
                ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
            raise
        if has_rate_limits(caller):
            await self._level_headers(ex, caller, booking_of(admitted).admission)
        return admitted

    async def _level_headers(self, ex: Exchange, caller: Caller, admission: Admission) -> None:
        """The x-ratelimit-* headers of an admitted request of a caller with rate limits."""
        if admission.unchecked:  # the store failed at admission: no levels from it
            ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
        else:  # the levels the admission's take returned: no store round trip
            ex.headers_out += level_headers(
                caller, admission.requests_level, admission.tokens_level
            )

    async def serve_chat(
        self,
        ex: Exchange,
        caller: Caller,
        request: ChatRequest,
        after: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        session_id: str | None = None,
        *,
        detachable: bool = False,
    ) -> None:
        """Admit, relay and book one checked chat request for `caller`; `after` runs with
        the whole answer before its last byte is written (session turns are stored there).
        A streamed answer goes through the stream log (gateway/streams.py); `session_id`
        links the session to it. `detachable`: called by `_http` directly, so a live
        answer's reader may detach (gateway/detach.py) when the server offers it."""
        g = self.settings.gateway
        self.check_models(caller, request)
        record = current_request()
        if record is not None:
            record.key, record.model = caller.name, request.model
        resumable = self.streams.is_resumable(ex, request)
        cache_key = None
        if self.cache is not None:
            cache_key = self.cache.key(request)
            if await self._from_cache(ex, caller, request, cache_key):
                return
        request_id = dict(ex.headers_out)[b"x-request-id"]
        headers = self._forwarded(ex, request_id)
        if request.stream:
            # (`_admitted` spelt out: no coroutine and no function made for it per answer.)
            try:
                producer, streamed = await self._start_answer(
                    caller,
                    request,
                    headers,
                    resumable=resumable,
                    after=after,
                    session_id=session_id,
                    cache_key=cache_key,
                    traceparent=ex.header(b"traceparent"),
                    # The producer's first step runs at once, to its upstream write: the
                    # first token waits for that write, and what is left here (the session
                    # link, the rate-limit headers, this reader's setup, which ends its
                    # task and hands it to the producer) has until the upstream's first
                    # bytes. At once, not in the producer task's own turn (gateway/eager.py):
                    # with the request's own first step run as its bytes arrive (gateway/
                    # guard.py), the upstream request is written in the loop turn the
                    # client's request arrived in.
                    start_now=True,
                )
            except GatewayError as exc:
                if exc.status == 429 and has_rate_limits(caller):
                    ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
                raise
            if has_rate_limits(caller):
                await self._level_headers(ex, caller, streamed.admission)
            # The producer's and the SDK's now: not held here for the answer's life (the
            # request's containers: ~330 bytes; bench/stream_memory.py).
            del headers, request
            ex.forget_headers()
            relay = StreamRelay(
                ex,
                self.scrub,
                keepalive_s=g.keepalive_s,
                send_timeout_s=g.send_timeout_s,
                headers=[(STREAM_ID_HEADER, producer.stream_id.encode())],
            )
            producer.attach()
            self.metrics.active.inc()
            self._relays.add(relay)
            result: RelayResult | None = None
            # A caught-up reader ends its task while the producer writes to the client
            # (gateway/detach.py): ~3 KB less per live answer (bench/stream_memory.py).
            detach = detachable and ex.scope.get("extensions", {}).get(DETACH_EXTENSION) is True
            parked = False
            try:
                result = await relay.events(
                    self.streams.follow_batches(
                        producer.stream_id,
                        0,
                        producer=producer,
                        sink=relay.sink(),
                        head=relay.head_sink(),
                        detach=detach and ex.hooks() is not None,
                    )
                )
            except Parked as exc:
                parked = True
                detached = exc.detached
                detached.gateway, detached.writer = self, producer
                detached.stream_id, detached.streamed = producer.stream_id, streamed
                detached.cache_key, detached.observed = cache_key, record
                raise
            except GatewayError as exc:
                if cache_key is None or not await self._degrade(ex, True, cache_key, exc):
                    raise
            finally:
                if not parked:
                    self._chat_done(relay, producer, result, record, streamed)
            return

        booking = await self._admitted(
            ex, caller, _Booking.admit(self, caller, request, after), lambda booked: booked
        )
        if self.telemetry.enabled:
            self._trace(booking, request, headers, ex.header(b"traceparent"))
        relay = StreamRelay(
            ex,
            self.scrub,
            keepalive_s=g.keepalive_s,
            send_timeout_s=g.send_timeout_s,
            renew=booking.renew if booking.admission.lease is not None else None,
            renew_every_s=g.slot_lease_s / 3,
            on_complete=booking.complete,
        )
        self.metrics.active.inc()
        self._relays.add(relay)
        result = None
        try:
            # Checked already (gateway/request.py): `stream_checked` takes it as it is.
            stream = self.client.stream_checked(
                request.model,
                request.messages,
                extra_body=request.extra or None,
                extra_headers=headers,
                fallbacks=self.router.fallback_routes(request.fallbacks) or None,
                routes=self.router.routes_for(request.model),
                budget_key=caller.id,  # each key recovers from its own share
            )
            if cache_key is not None:
                stream = RecordingStream(stream)
            try:
                result = await relay.json(stream)
            except GatewayError as exc:
                if cache_key is None or not await self._degrade(ex, request.stream, cache_key, exc):
                    raise
            else:
                if isinstance(stream, RecordingStream) and cache_key is not None:
                    await self._remember(
                        cache_key, stream.encoded(), result.completion, request.model
                    )
        finally:
            self._relays.discard(relay)
            self.metrics.active.dec()
            if result is None:
                result = relay.result
            await booking.book(result.completion if result is not None else None)
            self._count(result)
            _observe(record, result, booking.final)

    async def _chat_resume(self, detached: Detached) -> None:
        """The rest of `serve_chat`'s streamed answer for a detached reader: it takes over
        from the producer and relays on (and may detach again)."""
        relay: StreamRelay = detached.relay
        producer: Producer = detached.writer
        sink = detached.sink
        after = detached.producer.taken_back(sink)
        result: RelayResult | None = None
        parked = False
        try:
            result = await relay.events(
                self.streams.follow_batches(
                    detached.stream_id,
                    after,
                    producer=producer,
                    sink=sink,
                    detach=True,
                    resumed=True,
                ),
                resumed=True,
            )
        except Parked as exc:
            # Parked again: the same state goes on, with the new hand-off.
            parked = True
            exc.detached.carry(detached)
            raise
        except GatewayError as exc:
            cache_key = detached.cache_key
            if cache_key is None or not await self._degrade(detached.ex, True, cache_key, exc):
                raise
        finally:
            if not parked:
                self._chat_done(relay, producer, result, detached.observed, detached.streamed)

    def _chat_done(
        self,
        relay: StreamRelay,
        producer: Producer,
        result: RelayResult | None,
        record: RequestRecord | None,
        streamed: _Booking,
    ) -> None:
        self._relays.discard(relay)
        self.metrics.active.dec()
        producer.detach(time.time())
        self._count(result or relay.result)
        _observe(record, result or relay.result, streamed.final)

    def _count(self, result: RelayResult | None) -> None:
        if result is not None:
            self.metrics.stream_ended(result.reason)
            self.metrics.chunks.inc(result.n_chunks)
            if result.n_direct:
                self.metrics.chunks_direct.inc(result.n_direct)
            if result.n_keepalives:
                self.metrics.keepalives.inc(result.n_keepalives)

    async def live_stream(self, session_id: str) -> str | None:
        """The stream id of the answer a session is getting now (gateway/streams.py)."""
        return await self.streams.live_stream(session_id)

    # -- the answer cache (gateway/cache.py) ---------------------------------------------------

    async def _from_cache(
        self, ex: Exchange, caller: Caller, request: ChatRequest, key: str
    ) -> bool:
        """Answer from the cache when serve mode has a hit or the upstream is known to be
        down; True when the request was answered here."""
        cache = self.cache
        assert cache is not None  # noqa: S101 - called only with a cache
        serves, down = cache.serves(caller, request), cache.upstream_down()
        if not serves and not down:
            return False
        entry = await cache.get(key)
        if entry is None:
            cache.miss()
            if down:
                raise cache.unavailable()
            return False
        await cache.replay(ex, entry, "stale" if down else "hit", stream=request.stream)
        return True

    async def _degrade(self, ex: Exchange, stream: bool, key: str, error: GatewayError) -> bool:
        """After an answer failed before any output: count it and, when the failure is the
        upstream's, stand in with a stale entry; True when the request was answered.

        Raises:
            GatewayError: 503 with Retry-After when there is no entry to stand in.
        """
        cache = self.cache
        assert cache is not None  # noqa: S101 - called only with a cache
        if error.status not in (502, 503, 504) or not cache.settings.degrade:
            return False
        cache.record(failed_before_output=True)
        entry = await cache.get(key)
        if entry is None:
            cache.miss()
            raise cache.unavailable() from error
        await cache.replay(ex, entry, "stale", stream=stream)
        return True

    async def _remember(
        self, key: str, chunks: list[bytes], completion: ChatCompletion | None, model: str
    ) -> None:
        """After an answer was delivered whole: the upstream works; store the answer."""
        cache = self.cache
        if cache is None or not isinstance(completion, Answer):
            return
        cache.record(failed_before_output=False)
        await cache.remember(key, chunks, completion, model)

    async def _models(self, ex: Exchange) -> None:
        caller = await self.keys.identify(ex.header(b"authorization"))
        ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
        names = sorted(self.models if caller.models is None else self.models & set(caller.models))
        await ex.respond_json(
            200,
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "unbroken"}
                    for name in names
                ],
            },
        )

    async def _usage(self, ex: Exchange) -> None:
        caller = await self.keys.identify(ex.header(b"authorization"))
        ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
        query = dict(parse_qsl(ex.scope.get("query_string", b"").decode("latin-1")))
        report = await self.usage.report(
            parse_usage_query(query, caller, self.router.prices, time.time())
        )
        await ex.respond_json(200, report)

    async def _store_up(self) -> bool:
        up = await self.store.ping()
        self.metrics.store_up.set(1 if up else 0)
        return up

    async def _metrics(self, ex: Exchange) -> None:
        # Each scrape checks the store, so an alert on it needs no readiness prober.
        await self._store_up()
        await ex.respond(200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    async def _healthz(self, ex: Exchange) -> None:
        # The process id tells `--workers` processes apart (an operator's question).
        await ex.respond_json(200, {"status": "ok", "pid": os.getpid()})

    async def _readyz(self, ex: Exchange) -> None:
        if self.draining:
            await ex.respond_json(503, {"status": "draining"})
        elif not await self._store_up():
            await ex.respond_json(503, {"status": "store unavailable"})
        else:
            await ex.respond_json(200, {"status": "ready"})

    async def _openapi(self, ex: Exchange) -> None:
        await ex.respond_json(
            200,
            openapi(sorted(self.models), sorted(self.route_names), max_choices=self._max_choices),
        )


def _no_such_endpoint(method: str, path: str) -> GatewayError:
    return GatewayError(
        404,
        f"no such endpoint: {method} {path[:200]}; see GET /openapi.json",
        type="not_found_error",
        code="not_found",
    )


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    upstream: AsyncClient | None = None,
    registry: CollectorRegistry | None = None,
    stream_log: StreamLog | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Gateway:
    """Build the gateway ASGI app (see `Gateway`); settings default to `Settings.load()`."""
    return Gateway(
        settings if settings is not None else Settings.load(),
        store=store,
        upstream=upstream,
        registry=registry,
        stream_log=stream_log,
        tracer_provider=tracer_provider,
    )


def _observe(
    record: RequestRecord | None, result: RelayResult | None, completion: ChatCompletion | None
) -> None:
    # The access record takes the answer (or what arrived of it).
    if record is not None:
        if completion is None and result is not None:
            completion = result.completion
        record.answer(result.reason if result is not None else "error", completion)


class _Booking:
    """One admitted request's hold on its caller's limits: usage is booked (and the
    concurrency slot freed) exactly once, however the answer ends."""

    __slots__ = (
        "_after",
        "_bookings",
        "_limiter",
        "_model",
        "_usage",
        "admission",
        "booked",
        "completed",
        "final",
        "on_booked",
    )

    def __init__(
        self,
        gateway: Gateway,
        admission: Admission,
        after: Callable[[ChatCompletion], Awaitable[None]] | None,
        model: str = "",
    ) -> None:
        self._limiter = gateway.limiter
        self._bookings = gateway.bookings
        self._after = after
        self._usage: UsageBook | None = gateway.usage
        self._model = model
        self.admission = admission
        self.booked = False
        self.completed = False
        # What was booked: the whole answer, or what arrived of it.
        self.final: ChatCompletion | None = None
        self.on_booked: Callable[[ChatCompletion | None, bool], None] | None = None

    @classmethod
    async def admit(
        cls,
        gateway: Gateway,
        caller: Caller,
        request: ChatRequest,
        after: Callable[[ChatCompletion], Awaitable[None]] | None,
    ) -> _Booking:
        """Admit `request` (raises the limiter's 429) and hold its booking: it reserves
        its `max_tokens`, or `reserve_tokens` when it has none (gateway/limits.py)."""
        if caller.unlimited:
            # The limiter's admission of a caller without limits, spelt out (no store, no
            # refusal; gateway/limits.py `Limiter._admit`): two coroutines less an answer.
            return cls(gateway, Admission(caller, day_of(time.time())), after, request.model)
        limits = caller.limits
        reserve = 0
        if limits.daily_tokens is not None or limits.tokens_per_minute is not None:
            # Only token limits reserve tokens: the prompt is not estimated otherwise.
            reserve = request.estimated_tokens
            if not request.max_tokens:
                reserve += gateway.settings.gateway.reserve_tokens
        admission = await gateway.limiter.admit(caller, reserve, time.time())
        return cls(gateway, admission, after, request.model)

    async def complete(self, completion: ChatCompletion) -> None:
        """The whole answer: run `after` (session turns), then book it."""
        self.completed = True
        if self._after is not None:
            try:
                await self._after(completion)
            except UnbrokenError as exc:
                # The answer is whole and billed: deliver it even if keeping it failed.
                self._bookings.count_failure("session_turn_lost")
                logger.warning("answer delivered but not kept in its session: %s", exc)
        await self.book(completion)

    async def book(self, completion: ChatCompletion | None) -> None:
        """Book the answer's usage and cost (once) and free the slot."""
        if self.booked:
            return
        self.booked, self.final = True, completion
        tokens = cost = None
        if completion is not None and completion.usage is not None:
            tokens = completion.usage.total_tokens
        if isinstance(completion, Answer):
            cost = completion.unbroken.cost_usd
        # Books usage and frees the slot even when the server cancels us at shutdown; a
        # store failure queues the booking instead of failing a delivered answer.
        with shielded():
            now = time.time()
            await self._bookings.settle(self.admission, tokens, cost or 0.0)
            if self._usage is not None:
                usage = completion.usage if completion is not None else None
                caller = self.admission.caller.name
                try:
                    await self._usage.record(caller, self._model, usage, cost or 0.0, now)
                except StoreError as exc:
                    # The answer is delivered and its limits are settled (or queued);
                    # the usage report misses it rather than the client losing it.
                    self._bookings.count_failure("usage_not_recorded")
                    logger.warning("usage of a delivered answer not recorded: %s", exc)
        if self.on_booked is not None:
            self.on_booked(completion, self.completed)

    def renew(self) -> Awaitable[None]:
        """Extend the concurrency slot's lease."""
        return self._limiter.renew(self.admission, time.time())
