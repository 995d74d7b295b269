"""Hooks fed by the clients and the gateway, and a Prometheus adapter.

Imports core and errors; `prometheus_client` only lazily, inside `PrometheusHook`. Labels
stay low-cardinality (route, model, kind, phase): never a stream id, a user or a prompt.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from unbroken.core.breaker import BreakerState
from unbroken.core.records import quick_init

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics import MetricWrapperBase

__all__ = ["AnswerRecord", "AttemptRecord", "Hook", "Hooks", "PrometheusHook"]

logger = logging.getLogger(__name__)


@quick_init
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


@quick_init
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

    __slots__ = ("_answer", "_attempt", "_breaker", "_hooks", "_start", "on")

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self._hooks = tuple(hooks)
        # Any hook at all (what `bool()` says, without a call: asked several times an answer).
        self.on = bool(self._hooks)
        # Each event's methods, bound once (no attribute lookup per record, three records
        # or more per answer).
        self._start = self._bound("on_stream_start")
        self._attempt = self._bound("on_attempt")
        self._answer = self._bound("on_answer")
        self._breaker = self._bound("on_breaker")

    def _bound(self, name: str) -> tuple[tuple[Hook, Callable[..., object]], ...]:
        # A hook without the method fails (is logged) when the event comes, as before.
        return tuple(
            (hook, getattr(hook, name, None) or functools.partial(_missing, hook, name))
            for hook in self._hooks
        )

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def stream_start(self) -> None:
        """Fan out on_stream_start."""
        for hook, method in self._start:
            try:
                method()
            except Exception:
                logger.exception("instrumentation hook %r failed in %s", hook, "on_stream_start")

    def attempt(self, record: AttemptRecord) -> None:
        """Fan out on_attempt."""
        for hook, method in self._attempt:
            try:
                method(record)
            except Exception:
                logger.exception("instrumentation hook %r failed in %s", hook, "on_attempt")

    def answer(self, record: AnswerRecord) -> None:
        """Fan out on_answer."""
        for hook, method in self._answer:
            try:
                method(record)
            except Exception:
                logger.exception("instrumentation hook %r failed in %s", hook, "on_answer")

    def breaker(self, route: str, state: BreakerState) -> None:
        """Fan out on_breaker."""
        for hook, method in self._breaker:
            try:
                method(route, state)
            except Exception:
                logger.exception("instrumentation hook %r failed in %s", hook, "on_breaker")

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


def _missing(hook: Hook, name: str, *args: object) -> None:
    getattr(hook, name)(*args)  # raises AttributeError, unless the method appeared since


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

    What each answer and attempt adds is summed in the hook (under one lock) and added to
    the collectors when any of them is collected (a scrape, `get_sample_value`): a
    registry shows the same values as if each record went to the collectors at once.
    Why: an answer's record touched eleven locked values through prometheus_client
    (~3.7 us of the gateway's CPU per answer); summed here it costs one lock and a few
    additions.
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "unbroken") -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY
        p = prefix
        flush = self._flush
        self.requests = _flushed(
            Counter(
                f"{p}_requests_total",
                "Answers by outcome",
                ["route", "model", "outcome"],
                registry=reg,
            ),
            flush,
        )
        self.attempts = _flushed(
            Counter(
                f"{p}_attempts_total", "HTTP attempts", ["route", "kind", "outcome"], registry=reg
            ),
            flush,
        )
        self.retries = _flushed(
            Counter(f"{p}_retries_total", "Retries", ["route"], registry=reg), flush
        )
        self.resumes = _flushed(
            Counter(f"{p}_resumes_total", "Continuations", ["route"], registry=reg), flush
        )
        self.fallbacks = _flushed(
            Counter(f"{p}_fallbacks_total", "Fallbacks", ["route"], registry=reg), flush
        )
        self.errors = _flushed(
            Counter(
                f"{p}_errors_total", "Failed attempts by kind", ["route", "kind"], registry=reg
            ),
            flush,
        )
        self.circuit = Gauge(
            f"{p}_circuit_state", "0 closed, 1 half-open, 2 open", ["route"], registry=reg
        )
        self.ttft = _flushed(
            Histogram(
                f"{p}_time_to_first_token_seconds",
                "Time to the first token shown",
                ["route"],
                buckets=_TTFT_BUCKETS,
                registry=reg,
            ),
            flush,
        )
        self.duration = _flushed(
            Histogram(
                f"{p}_answer_duration_seconds",
                "Whole answer duration",
                ["route"],
                buckets=_DURATION_BUCKETS,
                registry=reg,
            ),
            flush,
        )
        self.tokens = _flushed(
            Counter(f"{p}_tokens_total", "Billed tokens", ["route", "model", "type"], registry=reg),
            flush,
        )
        self.cost = _flushed(
            Counter(f"{p}_cost_usd_total", "Billed cost (USD)", ["route", "model"], registry=reg),
            flush,
        )
        self.active = _flushed(
            Gauge(f"{p}_active_streams", "Answers in progress", registry=reg), flush
        )
        self.waits = Counter(
            f"{p}_retry_waits_total", "Waits before a retry", ["route", "reason"], registry=reg
        )
        self.wait_seconds = Counter(
            f"{p}_retry_wait_seconds_total",
            "Seconds waited before retries",
            ["route", "reason"],
            registry=reg,
        )
        # What the records added since the collectors were last brought up to date, by
        # label set (the series of each looked up once: `labels()` takes a lock and checks
        # its arguments on every call). A sync client's records may come from several
        # threads: the sums change under `_lock` only.
        self._lock = threading.Lock()
        self._started = 0  # answers started (those ended: the answers' sums, `n`)
        self._attempt_sums: dict[tuple[str, str, str], _AttemptSum] = {}
        self._answer_sums: dict[tuple[str, str, str], _AnswerSum] = {}
        self._ttft_sums: dict[str, _Observed] = {}

    def on_stream_start(self) -> None:
        """An answer started."""
        with self._lock:
            self._started += 1

    def on_attempt(self, record: AttemptRecord) -> None:
        """Count the attempt by kind and outcome."""
        key = (record.route, record.kind, record.outcome)
        with self._lock:
            sums = self._attempt_sums.get(key)
            if sums is None:
                sums = self._attempt_sums[key] = _AttemptSum(self._attempt_series(*key))
            sums.n += 1

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
        key = (record.route, record.model, record.outcome)
        with self._lock:
            sums = self._answer_sums.get(key)
            if sums is None:
                route, model, outcome = key
                sums = self._answer_sums[key] = _AnswerSum(
                    self.requests.labels(route, model, outcome),
                    _Observed(self.duration.labels(route), _DURATION_BUCKETS),
                    self.tokens.labels(route, model, "prompt"),
                    self.tokens.labels(route, model, "completion"),
                    self.cost.labels(route, model),
                )
            sums.n += 1
            sums.duration.observe(record.duration_s)
            sums.prompt_tokens += record.prompt_tokens
            sums.completion_tokens += record.completion_tokens
            sums.cost_usd += record.cost_usd
            ttft_s = record.ttft_s
            if ttft_s is not None:
                ttft = sums.ttft
                if ttft is None:
                    ttft = sums.ttft = self._ttft_of(record.route)
                ttft.observe(ttft_s)

    def _ttft_of(self, route: str) -> _Observed:
        """The time to first token of `route` (a route's series appears with its first
        observation; shared by the route's answers of every model and outcome)."""
        ttft = self._ttft_sums.get(route)
        if ttft is None:
            ttft = self._ttft_sums[route] = _Observed(self.ttft.labels(route), _TTFT_BUCKETS)
        return ttft

    def on_breaker(self, route: str, state: BreakerState) -> None:
        """Publish the breaker state."""
        self.circuit.labels(route).set(_BREAKER_VALUE[state])

    def on_wait(self, route: str, reason: str, seconds: float) -> None:
        """Count a wait before a retry (a budget wait is a paced retry)."""
        self.waits.labels(route, reason).inc()
        self.wait_seconds.labels(route, reason).inc(seconds)

    def _flush(self) -> None:
        """Add what the records summed to the collectors (before any of them is collected)."""
        with self._lock:
            moved = self._started - sum(answers.n for answers in self._answer_sums.values())
            if moved:
                self.active.inc(moved)
            self._started = 0
            for attempts in self._attempt_sums.values():
                if attempts.n:
                    for child in attempts.series:
                        child.inc(attempts.n)
                    attempts.n = 0
            for answers in self._answer_sums.values():
                if answers.n:
                    answers.requests.inc(answers.n)
                    answers.prompt.inc(answers.prompt_tokens)
                    answers.completion.inc(answers.completion_tokens)
                    answers.cost.inc(answers.cost_usd)
                    answers.duration.flush()
                    answers.n = answers.prompt_tokens = answers.completion_tokens = 0
                    answers.cost_usd = 0.0
            for ttft in self._ttft_sums.values():
                ttft.flush()


class _AttemptSum:
    """The attempts of one label set since the last flush, and the series they count in."""

    __slots__ = ("n", "series")

    def __init__(self, series: tuple[Counter, ...]) -> None:
        self.series = series
        self.n = 0


class _AnswerSum:
    """The answers of one (route, model, outcome) since the last flush, and their series."""

    __slots__ = (
        "completion",
        "completion_tokens",
        "cost",
        "cost_usd",
        "duration",
        "n",
        "prompt",
        "prompt_tokens",
        "requests",
        "ttft",
    )

    def __init__(
        self,
        requests: Counter,
        duration: _Observed,
        prompt: Counter,
        completion: Counter,
        cost: Counter,
    ) -> None:
        self.requests = requests
        self.duration = duration
        self.prompt = prompt
        self.completion = completion
        self.cost = cost
        self.n = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        # The route's time to first token (`PrometheusHook._ttft_of`), once one came.
        self.ttft: _Observed | None = None


class _Observed:
    """Observations of one histogram series since the last flush: their sum and their
    count per bucket (`Histogram.observe` puts a value in the first bucket whose upper
    bound is not below it; the last bound is +Inf)."""

    __slots__ = ("counts", "series", "sum", "upper")

    def __init__(self, series: Histogram, buckets: tuple[float, ...]) -> None:
        self.series = series
        self.upper = (*map(float, buckets), math.inf)
        self.counts = [0] * len(self.upper)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        if value == value:  # (NaN: in no bucket, as `observe` leaves it)
            self.counts[bisect_left(self.upper, value)] += 1

    def flush(self) -> None:
        counts = self.counts
        if not any(counts) and not self.sum:
            return
        # The histogram's own values, as `observe` changes them (prometheus_client keeps
        # a value per bucket and one for the sum): one addition per bucket and flush.
        series: Any = self.series
        series._sum.inc(self.sum)
        for i, n in enumerate(counts):
            if n:
                series._buckets[i].inc(n)
                counts[i] = 0
        self.sum = 0.0


_M = TypeVar("_M", bound="MetricWrapperBase")


def _flushed(metric: _M, flush: Callable[[], None]) -> _M:
    """`metric`, made to call `flush` before it is collected (the registry calls each
    collector's `collect`; a restricted registry too)."""
    collect = metric.collect

    def collect_flushed() -> Iterable[Any]:
        flush()
        return collect()

    metric.collect = collect_flushed  # type: ignore[method-assign]  # this instance's only
    return metric
