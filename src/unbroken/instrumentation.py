"""Hooks fed by the clients and the gateway, and a Prometheus adapter.

Imports core and errors; `prometheus_client` only lazily, inside `PrometheusHook`. Labels
stay low-cardinality (route, model, kind, phase): never a stream id, a user or a prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from unbroken.core.breaker import BreakerState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["AnswerRecord", "AttemptRecord", "Hook", "Hooks", "PrometheusHook"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One HTTP attempt of an answer.

    Attributes:
        route: the route's name.
        model: the model asked for.
        kind: first, retry, resume, fallback, restart, param_dropped.
        status_code: the HTTP status (None when no response arrived).
        outcome: `complete`, or the failure (an error kind, a timeout phase, `truncated`...).
        duration_s: from sending the request to the end of the attempt.
        n_chunks: chunks received.
        prompt_tokens, completion_tokens: usage reported (or estimated) for the attempt.
        usage_estimated: the attempt reported no usage; tokens were estimated.
    """

    route: str
    model: str
    kind: str
    status_code: int | None
    outcome: str
    duration_s: float
    n_chunks: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """One whole answer (all its attempts).

    Attributes:
        route: the route that produced the end of the answer.
        model: the model that answered.
        outcome: `complete` or the error kind that ended it.
        attempts, resumes, fallbacks: counts.
        ttft_s: time to the first token shown (None if none).
        duration_s: total time.
        prompt_tokens, completion_tokens: billed, all attempts.
        cost_usd: billed cost.
    """

    route: str
    model: str
    outcome: str
    attempts: int
    resumes: int
    fallbacks: int
    ttft_s: float | None
    duration_s: float
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class Hook(Protocol):
    """Receives what the clients observe. Every method must be cheap and must not raise."""

    def on_stream_start(self) -> None:
        """An answer started (active streams + 1)."""

    def on_attempt(self, record: AttemptRecord) -> None:
        """An attempt ended."""

    def on_answer(self, record: AnswerRecord) -> None:
        """An answer ended (active streams - 1)."""

    def on_breaker(self, route: str, state: BreakerState) -> None:
        """A route's circuit breaker changed state."""

    # Optional: `on_wait(route, reason, seconds)` - a wait before a retry (`backoff`,
    # `retry_after` or `budget`); hooks written before it need not have it.


class Hooks:
    """Fans records out to several hooks; a hook that raises is logged and skipped."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self._hooks = tuple(hooks)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def _each(self, name: str, *args: object) -> None:
        for hook in self._hooks:
            try:
                getattr(hook, name)(*args)
            except Exception:
                logger.exception("instrumentation hook %r failed in %s", hook, name)

    def stream_start(self) -> None:
        """Fan out on_stream_start."""
        self._each("on_stream_start")

    def attempt(self, record: AttemptRecord) -> None:
        """Fan out on_attempt."""
        self._each("on_attempt", record)

    def answer(self, record: AnswerRecord) -> None:
        """Fan out on_answer."""
        self._each("on_answer", record)

    def breaker(self, route: str, state: BreakerState) -> None:
        """Fan out on_breaker."""
        self._each("on_breaker", route, state)

    def wait(self, route: str, reason: str, seconds: float) -> None:
        """Fan out on_wait to the hooks that have it (it came after the others)."""
        for hook in self._hooks:
            method = getattr(hook, "on_wait", None)
            if method is None:
                continue
            try:
                method(route, reason, seconds)
            except Exception:
                logger.exception("instrumentation hook %r failed in on_wait", hook)


_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class PrometheusHook:
    """Prometheus collectors for unbroken, created on `registry` (default: the global one).

    Metrics: `unbroken_requests_total{route,model,outcome}`,
    `unbroken_attempts_total{route,kind,outcome}`, `unbroken_retries_total{route}`,
    `unbroken_resumes_total{route}`, `unbroken_fallbacks_total{route}`,
    `unbroken_errors_total{route,kind}`, `unbroken_circuit_state{route}` (0 closed,
    1 half-open, 2 open), `unbroken_time_to_first_token_seconds{route}`,
    `unbroken_answer_duration_seconds{route}`, `unbroken_tokens_total{route,model,type}`,
    `unbroken_cost_usd_total{route,model}`, `unbroken_active_streams`,
    `unbroken_retry_waits_total{route,reason}` and
    `unbroken_retry_wait_seconds_total{route,reason}` (waits before a retry: `backoff`,
    `retry_after`, or `budget` when the route's retry budget paced it).
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "unbroken") -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY
        p = prefix
        self.requests = Counter(
            f"{p}_requests_total", "Answers by outcome", ["route", "model", "outcome"], registry=reg
        )
        self.attempts = Counter(
            f"{p}_attempts_total", "HTTP attempts", ["route", "kind", "outcome"], registry=reg
        )
        self.retries = Counter(f"{p}_retries_total", "Retries", ["route"], registry=reg)
        self.resumes = Counter(f"{p}_resumes_total", "Continuations", ["route"], registry=reg)
        self.fallbacks = Counter(f"{p}_fallbacks_total", "Fallbacks", ["route"], registry=reg)
        self.errors = Counter(
            f"{p}_errors_total", "Failed attempts by kind", ["route", "kind"], registry=reg
        )
        self.circuit = Gauge(
            f"{p}_circuit_state", "0 closed, 1 half-open, 2 open", ["route"], registry=reg
        )
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time to the first token shown",
            ["route"],
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            f"{p}_answer_duration_seconds",
            "Whole answer duration",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=reg,
        )
        self.tokens = Counter(
            f"{p}_tokens_total", "Billed tokens", ["route", "model", "type"], registry=reg
        )
        self.cost = Counter(
            f"{p}_cost_usd_total", "Billed cost (USD)", ["route", "model"], registry=reg
        )
        self.active = Gauge(f"{p}_active_streams", "Answers in progress", registry=reg)
        self.waits = Counter(
            f"{p}_retry_waits_total", "Waits before a retry", ["route", "reason"], registry=reg
        )
        self.wait_seconds = Counter(
            f"{p}_retry_wait_seconds_total",
            "Seconds waited before retries",
            ["route", "reason"],
            registry=reg,
        )
        # The labelled series of each label set, looked up once: `labels()` takes a lock
        # and checks its arguments on every call, ~1 us each, 7-8 times per answer (the
        # collectors are this hook's own; the series live as long as they do).
        self._attempt_children: dict[tuple[str, str, str], tuple[Counter, ...]] = {}
        self._answer_children: dict[tuple[str, str, str], _AnswerSeries] = {}
        self._ttft_children: dict[str, Histogram] = {}

    def on_stream_start(self) -> None:
        """An answer started."""
        self.active.inc()

    def on_attempt(self, record: AttemptRecord) -> None:
        """Count the attempt by kind and outcome."""
        key = (record.route, record.kind, record.outcome)
        children = self._attempt_children.get(key)
        if children is None:
            children = self._attempt_children[key] = self._attempt_series(*key)
        for child in children:
            child.inc()

    def _attempt_series(self, route: str, kind: str, outcome: str) -> tuple[Counter, ...]:
        series = [self.attempts.labels(route, kind, outcome)]
        if kind == "retry":
            series.append(self.retries.labels(route))
        elif kind == "resume":
            series.append(self.resumes.labels(route))
        elif kind == "fallback":
            series.append(self.fallbacks.labels(route))
        if outcome != "complete":
            series.append(self.errors.labels(route, outcome))
        return tuple(series)

    def on_answer(self, record: AnswerRecord) -> None:
        """Count the answer, its tokens, cost and timings."""
        self.active.dec()
        key = (record.route, record.model, record.outcome)
        children = self._answer_children.get(key)
        if children is None:
            route, model, outcome = key
            children = self._answer_children[key] = _AnswerSeries(
                self.requests.labels(route, model, outcome),
                self.duration.labels(route),
                self.tokens.labels(route, model, "prompt"),
                self.tokens.labels(route, model, "completion"),
                self.cost.labels(route, model),
            )
        children.requests.inc()
        if record.ttft_s is not None:
            ttft = self._ttft_children.get(record.route)
            if ttft is None:  # a route's series appears with its first time to first token
                ttft = self._ttft_children[record.route] = self.ttft.labels(record.route)
            ttft.observe(record.ttft_s)
        children.duration.observe(record.duration_s)
        children.prompt_tokens.inc(record.prompt_tokens)
        children.completion_tokens.inc(record.completion_tokens)
        children.cost.inc(record.cost_usd)

    def on_breaker(self, route: str, state: BreakerState) -> None:
        """Publish the breaker state."""
        self.circuit.labels(route).set(_BREAKER_VALUE[state])

    def on_wait(self, route: str, reason: str, seconds: float) -> None:
        """Count a wait before a retry (a budget wait is a paced retry)."""
        self.waits.labels(route, reason).inc()
        self.wait_seconds.labels(route, reason).inc(seconds)


@dataclass(frozen=True, slots=True)
class _AnswerSeries:
    """The series one answer's record updates, for one (route, model, outcome)."""

    requests: Counter
    duration: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    cost: Counter
