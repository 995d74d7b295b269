"""The gateway's own Prometheus metrics, beside the SDK's (`PrometheusHook`) on the same
registry. Counted once per request or stream, never per chunk. Labels stay low-cardinality:
endpoint, status, reason; never a key, a user or a prompt. Imports prometheus_client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from unbroken.instrumentation import _flushed, _Observed

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
        # What requests and answers add is summed here and added to the collectors when
        # one of them is collected (a scrape; `_flushed`): a scrape shows what it would
        # have shown with each added at once. Why: an answer touched ~10 locked values
        # through prometheus_client (~190 bytecodes of its and a lock each, per answer).
        # Only the event loop's thread adds (the gateway's handlers and relays).
        flush = self._flush
        self.requests = _flushed(
            Counter(
                "unbroken_gateway_requests_total",
                "HTTP requests by endpoint and status",
                ["endpoint", "status"],
                registry=registry,
            ),
            flush,
        )
        self.rejections = Counter(
            "unbroken_gateway_rejections_total",
            "Requests refused before any upstream call, by reason",
            ["reason"],
            registry=registry,
        )
        self.streams = _flushed(
            Counter(
                "unbroken_gateway_streams_total",
                "Answers relayed, by how they ended",
                ["outcome"],
                registry=registry,
            ),
            flush,
        )
        self.active = _Summed(
            _flushed(
                Gauge(
                    "unbroken_gateway_active_requests",
                    "Chat requests in flight",
                    registry=registry,
                ),
                flush,
            )
        )
        self.chunks = _Summed(
            _flushed(
                Counter(
                    "unbroken_gateway_chunks_total",
                    "Chunks relayed downstream",
                    registry=registry,
                ),
                flush,
            )
        )
        self.chunks_direct = _Summed(
            _flushed(
                Counter(
                    "unbroken_gateway_chunks_direct_total",
                    "Chunks written straight to the connection by the live fast path",
                    registry=registry,
                ),
                flush,
            )
        )
        self.keepalives = _Summed(
            _flushed(
                Counter(
                    "unbroken_gateway_keepalives_total",
                    "Keep-alive comments sent downstream",
                    registry=registry,
                ),
                flush,
            )
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
        self.duration = _flushed(
            Histogram(
                "unbroken_gateway_request_duration_seconds",
                "HTTP request duration, from arrival to the last byte, by endpoint and outcome",
                ["endpoint", "outcome"],
                buckets=_DURATION_BUCKETS,
                registry=registry,
            ),
            flush,
        )
        self.stream_writers = _Summed(
            _flushed(
                Gauge(
                    "unbroken_gateway_stream_writers",
                    "Answers this instance is writing into the stream log",
                    registry=registry,
                ),
                flush,
            )
        )
        self.stream_takeovers = Counter(
            "unbroken_gateway_stream_takeovers_total",
            "Answers this instance took over from a writer that died or gave up",
            registry=registry,
        )
        # The sums of the labelled series used on every request, by label set (their
        # series looked up once: `labels()` takes a lock and builds a tuple of strings).
        # The label values come from fixed sets (endpoints, HTTP statuses, outcomes);
        # bounded anyway: past the bound a series is added to at once.
        self._children: dict[tuple[str, str, str | int], _Summed] = {}
        self._durations: dict[tuple[str, str], _Observed] = {}
        self._sums = [
            self.active,
            self.chunks,
            self.chunks_direct,
            self.keepalives,
            self.stream_writers,
        ]

    def _flush(self) -> None:
        """Add the sums to the collectors (before any of them is collected)."""
        for summed in self._sums:
            if summed.n:
                summed.flush()
        for observed in self._durations.values():
            observed.flush()

    def _counted(self, key: tuple[str, str, str | int], series: Counter) -> _Summed | None:
        """A new sum of `series`, kept under `key`; None past the bound."""
        if len(self._children) >= _MAX_CHILDREN:
            return None
        summed = self._children[key] = _Summed(series)
        self._sums.append(summed)
        return summed

    def request(self, path: str, status: int) -> None:
        """Count one finished HTTP request."""
        endpoint = path if path in ENDPOINTS else "other"
        key = ("requests", endpoint, status)
        child = self._children.get(key)
        if child is None:
            series = self.requests.labels(endpoint, str(status))
            child = self._counted(key, series)
            if child is None:
                series.inc()
                return
        child.n += 1

    def observe(self, path: str, outcome: str, duration_s: float) -> None:
        """Observe one finished request's duration (`outcome` from a fixed set)."""
        endpoint = path if path in ENDPOINTS else "other"
        key = (endpoint, outcome)
        observed = self._durations.get(key)
        if observed is None:
            series = self.duration.labels(endpoint, outcome)
            if len(self._durations) >= _MAX_CHILDREN:
                series.observe(duration_s)
                return
            observed = self._durations[key] = _Observed(series, _DURATION_BUCKETS)
        observed.observe(duration_s)

    def stream_ended(self, outcome: str) -> None:
        """Count one relayed answer by how it ended (`outcome` from a fixed set)."""
        key = ("streams", outcome, "")
        child = self._children.get(key)
        if child is None:
            series = self.streams.labels(outcome)
            child = self._counted(key, series)
            if child is None:
                series.inc()
                return
        child.n += 1

    def render(self) -> bytes:
        """The text exposition of the registry."""
        return generate_latest(self.registry)


class _Summed:
    """What was added to one counter or gauge (`series`) since it was last collected
    (`inc`, `dec`: a gauge's changes, a counter's increments)."""

    __slots__ = ("n", "series")

    def __init__(self, series: Counter | Gauge) -> None:
        self.series = series
        self.n: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add `amount`."""
        self.n += amount

    def dec(self, amount: float = 1) -> None:
        """Take `amount` off (a gauge's)."""
        self.n -= amount

    def flush(self) -> None:
        """Add the sum to the series."""
        n, self.n = self.n, 0
        self.series.inc(n)
