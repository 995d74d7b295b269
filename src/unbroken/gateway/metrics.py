"""The gateway's own Prometheus metrics, beside the SDK's (`PrometheusHook`) on the same
registry. Counted once per request or stream, never per chunk. Labels stay low-cardinality:
endpoint, status, reason; never a key, a user or a prompt. Imports prometheus_client.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ENDPOINTS", "GatewayMetrics"]

# The endpoints counted by name; anything else is `other`, so scanners cannot grow labels.
ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/models",
        "/models",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/v1/usage",
    }
)
# Labelled children kept for reuse (the label sets are small and fixed; this only bounds).
_MAX_CHILDREN = 1000
# Request durations: from a health check's microseconds to a reasoner's many minutes.
_DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class GatewayMetrics:
    """Collectors `unbroken_gateway_*` on `registry`.

    Metrics: `unbroken_gateway_requests_total{endpoint,status}`,
    `unbroken_gateway_rejections_total{reason}` (limits, auth, bad input),
    `unbroken_gateway_streams_total{outcome}` (complete, error, client_gone, slow_client),
    `unbroken_gateway_active_requests`, `unbroken_gateway_chunks_total`,
    `unbroken_gateway_chunks_direct_total` (of those, written by the live fast path),
    `unbroken_gateway_keepalives_total`, `unbroken_gateway_draining`,
    `unbroken_gateway_request_duration_seconds{endpoint,outcome}` (outcome: ok, rejected,
    failed, or how an answer ended: complete, error, client_gone, slow_client, shutdown),
    `unbroken_gateway_store_up`, `unbroken_gateway_store_errors_total`,
    `unbroken_gateway_stream_writers`, `unbroken_gateway_stream_takeovers_total`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "unbroken_gateway_requests_total",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.rejections = Counter(
            "unbroken_gateway_rejections_total",
            "Requests refused before any upstream call, by reason",
            ["reason"],
            registry=registry,
        )
        self.streams = Counter(
            "unbroken_gateway_streams_total",
            "Answers relayed, by how they ended",
            ["outcome"],
            registry=registry,
        )
        self.active = Gauge(
            "unbroken_gateway_active_requests", "Chat requests in flight", registry=registry
        )
        self.chunks = Counter(
            "unbroken_gateway_chunks_total", "Chunks relayed downstream", registry=registry
        )
        self.chunks_direct = Counter(
            "unbroken_gateway_chunks_direct_total",
            "Chunks written straight to the connection by the live fast path",
            registry=registry,
        )
        self.keepalives = Counter(
            "unbroken_gateway_keepalives_total",
            "Keep-alive comments sent downstream",
            registry=registry,
        )
        self.draining = Gauge(
            "unbroken_gateway_draining", "1 while shutting down", registry=registry
        )
        self.store_up = Gauge(
            "unbroken_gateway_store_up",
            "1 when the state store answered the last readiness check, else 0",
            registry=registry,
        )
        self.store_errors = Counter(
            "unbroken_gateway_store_errors_total",
            "Requests failed because the state store did not answer",
            registry=registry,
        )
        self.duration = Histogram(
            "unbroken_gateway_request_duration_seconds",
            "HTTP request duration, from arrival to the last byte, by endpoint and outcome",
            ["endpoint", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.stream_writers = Gauge(
            "unbroken_gateway_stream_writers",
            "Answers this instance is writing into the stream log",
            registry=registry,
        )
        self.stream_takeovers = Counter(
            "unbroken_gateway_stream_takeovers_total",
            "Answers this instance took over from a writer that died or gave up",
            registry=registry,
        )

        # The labelled children used on every request, looked up once (`labels()` takes a
        # lock and builds a tuple of strings: ~1.5 us, three times a request). The label
        # values come from fixed sets (endpoints, HTTP statuses, outcomes); bounded anyway.
        self._children: dict[tuple[str, str, str | int], Any] = {}

    def _keep(self, key: tuple[str, str, str | int], child: Any) -> Any:
        if len(self._children) < _MAX_CHILDREN:
            self._children[key] = child
        return child

    def request(self, path: str, status: int) -> None:
        """Count one finished HTTP request."""
        endpoint = path if path in ENDPOINTS else "other"
        key = ("requests", endpoint, status)
        child = self._children.get(key)
        if child is None:
            child = self._keep(key, self.requests.labels(endpoint, str(status)))
        child.inc()

    def observe(self, path: str, outcome: str, duration_s: float) -> None:
        """Observe one finished request's duration (`outcome` from a fixed set)."""
        endpoint = path if path in ENDPOINTS else "other"
        key = ("duration", endpoint, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._keep(key, self.duration.labels(endpoint, outcome))
        child.observe(duration_s)

    def stream_ended(self, outcome: str) -> None:
        """Count one relayed answer by how it ended (`outcome` from a fixed set)."""
        key = ("streams", outcome, "")
        child = self._children.get(key)
        if child is None:
            child = self._keep(key, self.streams.labels(outcome))
        child.inc()

    def render(self) -> bytes:
        """The text exposition of the registry."""
        return generate_latest(self.registry)
