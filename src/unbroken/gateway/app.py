"""The gateway ASGI application: routing, request ids, CORS, keys and limits around the
SDK's `AsyncClient`, which does the upstream work (retries, resume, fallbacks).

    app = create_app(Settings.load("unbroken.toml"))

Raw ASGI, no framework: the chat path is one dict lookup, then `StreamRelay`. Imports
client, core, stores, instrumentation, settings and gateway siblings.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import anyio
import httpx
from prometheus_client import CollectorRegistry

from unbroken.client import AsyncClient
from unbroken.core.attempt import Timeouts
from unbroken.core.backoff import RetryPolicy
from unbroken.core.pricing import PriceTable
from unbroken.core.routes import Route
from unbroken.core.wire import Answer, ChatCompletion
from unbroken.errors import StoreError, UnbrokenError
from unbroken.gateway.accesslog import RequestRecord, current_request, write_access_line
from unbroken.gateway.asgi import Exchange, Receive, Scope, Send
from unbroken.gateway.cache import AnswerCache, RecordingStream
from unbroken.gateway.keys import Caller, KeyRing
from unbroken.gateway.limits import Limiter
from unbroken.gateway.metrics import GatewayMetrics
from unbroken.gateway.openapi import openapi
from unbroken.gateway.problems import GatewayError, Scrubber, from_unbroken
from unbroken.gateway.quota import rate_limit_headers
from unbroken.gateway.relay import RelayResult, StreamRelay
from unbroken.gateway.request import ChatRequest, parse_chat_request
from unbroken.gateway.routing import ModelRouter, ServedModels, base_routes
from unbroken.gateway.serving import BreakerWatch
from unbroken.gateway.sessions import SESSIONS_PATH, SessionEndpoints, open_session_store
from unbroken.gateway.streams import (
    GATEWAY_HEADER,
    STREAM_ID_HEADER,
    STREAMS_PATH,
    StreamHub,
    open_stream_log,
)
from unbroken.gateway.telemetry import SpanHook, Telemetry
from unbroken.gateway.upstream import LeanTransport
from unbroken.gateway.usage import UsageBook, parse_usage_query
from unbroken.instrumentation import Hook, PrometheusHook
from unbroken.settings import Settings
from unbroken.stores import Store, open_store
from unbroken.stores.streamlog import StreamLog

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["Gateway", "build_upstream", "create_app", "upstream_transport"]

logger = logging.getLogger(__name__)

Handler = Callable[[Exchange], Awaitable[None]]

# A client's X-Request-ID is kept when it looks like an id; anything else is replaced, so
# no one can inject text into our logs or headers through it.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
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
# Paths whose requests name or list models (so model discovery must be current).
_MODEL_USERS = ("/v1/chat/", "/chat/", "/v1/models", "/models", "/v1/sessions")


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
        ),
        retry=RetryPolicy(
            attempts=g.retry_attempts,
            max_resumes=g.max_resumes,
            wait_initial_s=g.retry_wait_initial_s,
            wait_max_s=max(g.retry_wait_max_s, g.retry_wait_initial_s),
        ),
        hooks=hooks,
        max_event_bytes=settings.max_event_bytes,
        transport=transport if transport is not None else upstream_transport(settings),
    )


def upstream_transport(settings: Settings) -> LeanTransport:
    """The transport of the upstream calls: a `LeanTransport` whose read-ahead is the
    per-stream buffer bound, through the proxies of `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`."""
    return LeanTransport(
        high_water_bytes=settings.gateway.stream_buffer_bytes, proxy_env=dict(settings.proxy_env)
    )


class Gateway:
    """The gateway application (an ASGI callable).

    Args:
        settings: the settings (`settings.gateway` above all).
        store: the state store; default from `settings.gateway.store`.
        upstream: the SDK client to use upstream; default `build_upstream(settings)`.
        registry: the Prometheus registry of `/metrics`; default a new one.
        tracer_provider: an OpenTelemetry tracer provider for the request spans; default
            an OTLP exporter on `gateway.otel_endpoint` when set, else no tracing.
        stream_log: the log of streamed answers; default from `settings.gateway.store`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        upstream: AsyncClient | None = None,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
        stream_log: StreamLog | None = None,
    ) -> None:
        g = settings.gateway
        self.settings = settings
        self.store: Store = store if store is not None else open_store(g.store)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.router = ModelRouter(settings)
        self.telemetry = Telemetry(tracer_provider, g.otel_endpoint)
        # Follows the breakers the client reports (only on the client built here).
        self.breakers = BreakerWatch()
        hooks: list[Hook] = [PrometheusHook(self.registry), self.breakers]
        if self.telemetry.enabled:
            hooks.append(SpanHook())
        self.client = upstream or build_upstream(settings, hooks, prices=self.router.prices)
        self.usage = UsageBook(self.store, self.router.prices)
        self.keys = KeyRing(g, self.store)
        self.sessions = SessionEndpoints(self, open_session_store(g.sessions))
        self.streams = StreamHub(self, stream_log or open_stream_log(g))
        self.limiter = Limiter(self.store, g.slot_lease_s)
        self.cache = AnswerCache(g.cache, self.registry) if g.cache.enabled else None
        routes = settings.upstream_routes()
        self.scrub = Scrubber([settings.api_key, *(r.api_key for r in routes)])
        self.route_names = frozenset(r.name for r in routes)
        self.draining = False
        self._relays: set[StreamRelay] = set()
        self._origins = frozenset(g.cors_origins)
        self._exact = frozenset(h.lower() for h in g.forward_headers if not h.endswith("*"))
        self._prefixes = tuple(h.lower()[:-1] for h in g.forward_headers if h.endswith("*"))
        self._routes: dict[str, tuple[str, Handler]] = {
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

    async def aclose(self) -> None:
        """Close the stream hub (releasing its leases), the upstream client and the store."""
        await self.streams.aclose()
        await self.client.aclose()
        await self.sessions.aclose()
        if self.cache is not None:
            await self.cache.aclose()
        await self.store.aclose()
        self.telemetry.shutdown()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
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

    def _common_headers(
        self, scope: Scope
    ) -> tuple[bytes, bytes | None, list[tuple[bytes, bytes]]]:
        request_id = origin = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                request_id = value
            elif name == b"origin":
                origin = value
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex.encode()
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

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        request_id, origin, headers = self._common_headers(scope)
        ex = Exchange(scope, receive, send, headers, self.settings.gateway.gzip_min_bytes)
        record = RequestRecord.begin(request_id.decode(), method, path)
        try:
            if method == "OPTIONS":
                await self._preflight(ex, origin)
                return
            if path.startswith(_MODEL_USERS):
                # Discovery mode: the upstream's model names, fetched when due.
                await self.router.refresh(self.client.models.list, time.monotonic())
            entry = self._routes.get(path)
            if entry is None and path.startswith(SESSIONS_PATH):
                await self.sessions.handle(ex, method, path)
                return
            if entry is None and path.startswith(STREAMS_PATH + "/"):
                await self.streams.handle(ex, method, path)
                return
            if entry is None:
                raise GatewayError(
                    404,
                    f"no such endpoint: {method} {path[:200]}; see GET /openapi.json",
                    type="not_found_error",
                    code="not_found",
                )
            allowed, handler = entry
            if method != allowed:
                raise GatewayError(
                    405,
                    f"method {method} is not allowed on {path}; use {allowed}",
                    code="method_not_allowed",
                    headers=[(b"allow", allowed.encode())],
                )
            await handler(ex)
        except (GatewayError, UnbrokenError) as exc:
            # UnbrokenError: a store failure (StoreError -> 503) or the like, outside a relay.
            error = exc if isinstance(exc, GatewayError) else from_unbroken(exc, self.scrub)
            record.error = error.code or str(error.status)
            if isinstance(exc, StoreError):
                self.metrics.store_errors.inc()
            if error.status in (401, 403, 413, 429):
                self.metrics.rejections.labels(error.code or str(error.status)).inc()
            if not ex.started:
                await ex.respond_error(error)
        except Exception:
            # A bug must not kill the process, hang the client or show it a traceback.
            record.error = "internal_error"
            logger.exception(
                "unexpected error on %s %s", method, path, extra={"request_id": request_id}
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
        finally:
            self.metrics.request(path, ex.status)
            record.finish(ex.status)
            self.metrics.observe(path, record.outcome or "ok", record.duration_s)
            if self.settings.gateway.access_log:
                write_access_line(record)

    async def _preflight(self, ex: Exchange, origin: bytes | None) -> None:
        if origin is None:
            await ex.start(204, [(b"allow", b"GET, POST, DELETE, OPTIONS")])
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
        headers = {"X-Request-ID": request_id.decode("latin-1")}
        traceparent = ex.header(b"traceparent")
        if traceparent is not None and not self.telemetry.enabled:
            # No span of ours: the client's trace context goes upstream as is.
            headers["traceparent"] = traceparent.decode("latin-1")
        if not self._exact and not self._prefixes:
            return headers
        for raw_name, raw_value in ex.scope.get("headers", ()):
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

    async def _chat(self, ex: Exchange) -> None:
        g = self.settings.gateway
        self.check_draining()
        caller = await self.keys.identify(ex.header(b"authorization"))
        request = parse_chat_request(
            await ex.read_body(g.max_body_bytes), self.models, self.route_names
        )
        await self.serve_chat(ex, caller, request)

    async def serve_chat(
        self,
        ex: Exchange,
        caller: Caller,
        request: ChatRequest,
        after: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        session_id: str | None = None,
    ) -> None:
        """Admit, relay and book one checked chat request for `caller`; `after` runs with
        the whole answer before its last byte is written (session turns are stored there).
        A streamed answer goes through the stream log (gateway/streams.py); `session_id`
        links the session to it."""
        g = self.settings.gateway
        if caller.models is not None:
            for model in (request.model, *request.fallbacks):
                if model in self.models and model not in caller.models:
                    raise GatewayError(
                        403,
                        f"key {caller.name!r} may not use the model {model!r}",
                        type="permission_error",
                        code="model_not_allowed",
                        param="model",
                    )
        record = current_request()
        if record is not None:
            record.key, record.model = caller.name, request.model
        resumable = self.streams.is_resumable(ex, request)
        cache_key = None
        if self.cache is not None:
            cache_key = self.cache.key(request)
            if await self._from_cache(ex, caller, request, cache_key):
                return
        try:
            admission = await self.limiter.admit(caller, request.estimated_tokens, time.time())
        except GatewayError as exc:
            if exc.status == 429:
                ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
            raise
        ex.headers_out += await rate_limit_headers(self.store, caller, time.time())
        request_id = dict(ex.headers_out)[b"x-request-id"]
        booked = False
        final: ChatCompletion | None = None
        upstream_headers = self._forwarded(ex, request_id)
        span = None
        if self.telemetry.enabled:
            routes = self.router.routes_for(request.model) or self.client.routes
            provider = "deepseek" if routes[0].dialect == "deepseek" else "openai"
            span = self.telemetry.start(request, ex.header(b"traceparent"), provider)
            self.telemetry.inject(span, upstream_headers)

        answered: ChatCompletion | None = None

        async def complete(completion: ChatCompletion) -> None:
            nonlocal answered
            answered = completion
            if after is not None:
                await after(completion)
            await book(completion)

        async def book(completion: ChatCompletion | None) -> None:
            nonlocal booked, final
            if booked:
                return
            booked, final = True, completion
            tokens = cost = None
            if completion is not None and completion.usage is not None:
                tokens = completion.usage.total_tokens
            if isinstance(completion, Answer):
                cost = completion.unbroken.cost_usd
            # Books usage and frees the slot even when uvicorn cancels us at shutdown.
            with anyio.CancelScope(shield=True):
                now = time.time()
                await self.limiter.finish(admission, tokens, cost or 0.0, now)
                usage = completion.usage if completion is not None else None
                await self.usage.record(caller.name, request.model, usage, cost or 0.0, now)

        def renew() -> Awaitable[None]:
            return self.limiter.renew(admission, time.time())

        if request.stream:
            try:
                producer = await self.streams.start(
                    caller,
                    request,
                    upstream_headers,
                    resumable=resumable,
                    on_complete=complete,
                    on_end=book,
                    renew_slot=renew if admission.lease is not None else None,
                )
            except BaseException:
                await book(None)
                raise
            if session_id is not None:
                await self.streams.log.link_session(session_id, producer.stream_id, time.time())
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
            try:
                result = await relay.events(
                    self.streams.follow(producer.stream_id, 0, producer=producer)
                )
            except GatewayError as exc:
                if cache_key is None or not await self._degrade(ex, request, cache_key, exc):
                    raise
            else:
                if cache_key is not None and result.reason == "complete":
                    chunks = await self.streams.chunks(producer.stream_id)
                    await self._remember(cache_key, chunks, answered)
            finally:
                self._relays.discard(relay)
                self.metrics.active.dec()
                producer.detach(time.time())
                if result is None:
                    result = relay.result
                self._observe_answer(record, span, result, final or answered)
                if result is not None:
                    self.metrics.streams.labels(result.reason).inc()
                    self.metrics.chunks.inc(result.n_chunks)
                    if result.n_keepalives:
                        self.metrics.keepalives.inc(result.n_keepalives)
            return

        relay = StreamRelay(
            ex,
            self.scrub,
            keepalive_s=g.keepalive_s,
            send_timeout_s=g.send_timeout_s,
            renew=renew if admission.lease is not None else None,
            renew_every_s=g.slot_lease_s / 3,
            on_complete=complete,
        )
        self.metrics.active.inc()
        self._relays.add(relay)
        result = None
        try:
            stream = await self.client.chat.completions.create(
                model=request.model,
                messages=request.messages,
                stream=True,
                extra_body=request.extra or None,
                extra_headers=upstream_headers,
                fallbacks=self.router.fallback_routes(request.fallbacks) or None,
                routes=self.router.routes_for(request.model),
            )
            if cache_key is not None:
                stream = RecordingStream(stream)
            try:
                result = await relay.json(stream)
            except GatewayError as exc:
                if cache_key is None or not await self._degrade(ex, request, cache_key, exc):
                    raise
            else:
                if isinstance(stream, RecordingStream) and cache_key is not None:
                    await self._remember(cache_key, stream.encoded(), answered)
        finally:
            self._relays.discard(relay)
            self.metrics.active.dec()
            if result is None:
                result = relay.result
            await book(result.completion if result is not None else None)
            self._observe_answer(record, span, result, final)
            if result is not None:
                self.metrics.streams.labels(result.reason).inc()
                self.metrics.chunks.inc(result.n_chunks)
                if result.n_keepalives:
                    self.metrics.keepalives.inc(result.n_keepalives)

    def _observe_answer(
        self,
        record: RequestRecord | None,
        span: Span | None,
        result: RelayResult | None,
        completion: ChatCompletion | None,
    ) -> None:
        # The access record and the span take the answer (or what arrived of it).
        if record is None:
            return
        if completion is None and result is not None:
            completion = result.completion
        record.answer(result.reason if result is not None else "error", completion)
        if span is not None:
            self.telemetry.end(span, record, completion)

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

    async def _degrade(
        self, ex: Exchange, request: ChatRequest, key: str, error: GatewayError
    ) -> bool:
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
        await cache.replay(ex, entry, "stale", stream=request.stream)
        return True

    async def _remember(
        self, key: str, chunks: list[bytes], completion: ChatCompletion | None
    ) -> None:
        """After an answer was delivered whole: the upstream works; store the answer."""
        cache = self.cache
        if cache is None or not isinstance(completion, Answer):
            return
        cache.record(failed_before_output=False)
        await cache.remember(key, chunks, completion)

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

    async def _metrics(self, ex: Exchange) -> None:
        # Each scrape checks the store, so an alert on it needs no readiness prober.
        await self._store_up()
        await ex.respond(200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    async def _healthz(self, ex: Exchange) -> None:
        await ex.respond_json(200, {"status": "ok"})

    async def _store_up(self) -> bool:
        up = await self.store.ping()
        self.metrics.store_up.set(1 if up else 0)
        return up

    async def _readyz(self, ex: Exchange) -> None:
        if self.draining:
            await ex.respond_json(503, {"status": "draining"})
        elif not await self._store_up():
            await ex.respond_json(503, {"status": "store unavailable"})
        else:
            await ex.respond_json(200, {"status": "ready"})

    async def _openapi(self, ex: Exchange) -> None:
        await ex.respond_json(200, openapi(sorted(self.models)))


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    upstream: AsyncClient | None = None,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
    stream_log: StreamLog | None = None,
) -> Gateway:
    """Build the gateway ASGI app (see `Gateway`); settings default to `Settings.load()`."""
    return Gateway(
        settings if settings is not None else Settings.load(),
        store=store,
        upstream=upstream,
        registry=registry,
        tracer_provider=tracer_provider,
        stream_log=stream_log,
    )
