"""Retry policy, delay math, the retry budget and error classification; pure, no I/O.

Imports the standard library (`random` only to type an injected generator), `unbroken.errors`.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import heapq
import math
import random
from dataclasses import dataclass

from unbroken.errors import (
    ConfigError,
    ErrorKind,
    ProtocolError,
    UnbrokenError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamStreamError,
)

__all__ = [
    "MIN_BUDGET_WAIT_S",
    "RETRYABLE_STATUSES",
    "Failure",
    "RetryBudget",
    "RetryPolicy",
    "failure_class",
    "kind_of_status",
    "parse_retry_after",
]

# RFC 9110 §15 and DeepSeek's error table (protocol.md §1.9): these statuses are transient.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
# The shortest wait a caller refused by the retry budget is given, so a crowd of refused
# callers never spins (a token refills in 1 / min_per_s s; 50 ms is well below that).
MIN_BUDGET_WAIT_S = 0.05


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry. Defaults are chosen for LLM streams, not short calls.

    Delay before retry n (n >= 1) is *full jitter* (AWS architecture blog, "Exponential
    Backoff And Jitter")::

        delay(n) = U(0, min(wait_max_s, wait_initial_s * wait_exp_base ** (n - 1)))

    clamped to wait_max_s also when the power overflows. A server's `Retry-After` replaces
    the delay (capped at `retry_after_max_s`) but still obeys the deadline: a wait that would
    end past the deadline is not taken. The deadline itself is optional (`deadline_s`): a
    stream that keeps making progress may run for many minutes; stalls are bounded by the
    first-token and idle timeouts instead.

    Failover conduct: a 429 without `Retry-After` waits `rate_limit_wait_s` plus the
    backoff (so at most 4 attempts fit in the first 3 s) and, when a fallback route exists,
    moves there after `rate_limit_retries` retries; a 5xx is retried `server_error_retries`
    times on its route before the fallback. Without a fallback, both keep retrying with
    backoff up to `attempts`.

    Attributes:
        attempts: most attempts per answer counting the first, retries, continuations and
            fallbacks (each is one HTTP request).
        max_resumes: most continuations of one broken answer before giving up with the
            partial answer.
        wait_initial_s: base of the exponential backoff.
        wait_max_s: cap of one backoff delay.
        wait_exp_base: growth factor.
        retry_after_max_s: the longest `Retry-After` honoured; longer ones fail at once
            (or fall back) rather than hold the caller.
        deadline_s: total time allowed for one answer, or None.
        rate_limit_wait_s: the least wait after a 429 without `Retry-After`.
        rate_limit_retries: retries of a 429 on its route before a fallback route.
        server_error_retries: quick retries of a 5xx on its route before a fallback route.
    """

    attempts: int = 8
    max_resumes: int = 5
    wait_initial_s: float = 0.25
    wait_max_s: float = 8.0
    wait_exp_base: float = 2.0
    retry_after_max_s: float = 60.0
    deadline_s: float | None = None
    rate_limit_wait_s: float = 1.0
    rate_limit_retries: int = 2
    server_error_retries: int = 1

    def __post_init__(self) -> None:
        if self.rate_limit_wait_s < 0 or self.rate_limit_retries < 0:
            raise ConfigError(
                f"retry rate_limit_wait_s and rate_limit_retries must be >= 0, got "
                f"{self.rate_limit_wait_s} and {self.rate_limit_retries}"
            )
        if self.server_error_retries < 0:
            raise ConfigError(
                f"retry server_error_retries must be >= 0, got {self.server_error_retries}"
            )
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.max_resumes < 0:
            raise ConfigError(f"retry max_resumes must be >= 0, got {self.max_resumes}")
        if self.wait_initial_s < 0 or self.wait_max_s < self.wait_initial_s:
            raise ConfigError(
                f"retry waits need 0 <= wait_initial_s <= wait_max_s, got "
                f"{self.wait_initial_s} and {self.wait_max_s}"
            )
        if self.wait_exp_base < 1:
            raise ConfigError(f"retry wait_exp_base must be >= 1, got {self.wait_exp_base}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError(f"retry deadline_s must be > 0, got {self.deadline_s}")

    def delay(self, n: int, rng: random.Random) -> float:
        """The backoff before retry `n` (1-based), in seconds; always in [0, wait_max_s]."""
        try:
            ceiling = self.wait_initial_s * self.wait_exp_base ** (n - 1)
        except OverflowError:
            ceiling = math.inf if self.wait_initial_s > 0 else 0.0
        return rng.uniform(0.0, min(self.wait_max_s, ceiling))


class RetryBudget:
    """Bounds retries to a share of recent requests (gRPC retry throttling, Finagle
    RetryBudget), so a failing upstream is not hit harder, and *paces* the retries over the
    budget instead of failing them.

    Tokens: every new request deposits `ratio`; every retry or continuation takes one. Saved
    tokens fade with time constant `window_s` (the budget reflects recent traffic), while
    `min_per_s` tokens per second flow in regardless of traffic, so the balance of a quiet
    client settles at `min_per_s * window_s`. At most `cap` are held. Over any run,
    retries <= tokens at the start + ratio * requests + min_per_s * seconds.

    Pacing: `acquire` grants a token or returns how long to wait before asking again: full
    jitter over a window that grows with the number already waiting,
    ``U(0, (waiting + 1) / max(min_per_s, 1))`` (at least 50 ms), so a crowd that finds
    the budget spent comes back spread out at about the refill rate instead of at once.

    Defaults: up to 2 retries per request (load at most triples under sustained failure,
    where 8 attempts without a budget would multiply it by 8), which lets a correlated break
    of every in-flight stream heal at once.

    Args:
        ratio: retries allowed per request.
        min_per_s: retries allowed per second regardless of traffic.
        cap: the most tokens held.
        window_s: how long deposits last (time constant of their fading).
    """

    __slots__ = ("_tokens", "_updated", "_wakeups", "cap", "min_per_s", "ratio", "window_s")

    def __init__(
        self,
        ratio: float = 2.0,
        min_per_s: float = 1.0,
        cap: float = 100_000.0,
        window_s: float = 60.0,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or cap < 1 or window_s <= 0:
            raise ConfigError(
                f"retry budget needs ratio >= 0, min_per_s >= 0, cap >= 1, window_s > 0; got "
                f"{ratio}, {min_per_s}, {cap}, {window_s}"
            )
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = cap
        self.window_s = window_s
        self._tokens = min(cap, min_per_s * window_s)
        self._updated: float | None = None
        self._wakeups: list[float] = []  # when refused callers said they would ask again

    def clone(self) -> RetryBudget:
        """A fresh budget with the same settings (one per route, or per route and key)."""
        return RetryBudget(self.ratio, self.min_per_s, self.cap, self.window_s)

    def _refill(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            # dT/dt = min_per_s - T / window_s, solved over the elapsed time.
            floor = self.min_per_s * self.window_s
            fade = math.exp(-(now - self._updated) / self.window_s)
            self._tokens = min(self.cap, floor + (self._tokens - floor) * fade)
        self._updated = now if self._updated is None else max(self._updated, now)

    @property
    def tokens(self) -> float:
        """Tokens left (for metrics and tests)."""
        return self._tokens

    def waiting(self, now: float) -> int:
        """How many refused callers are still waiting to ask again."""
        while self._wakeups and self._wakeups[0] <= now:
            heapq.heappop(self._wakeups)
        return len(self._wakeups)

    def on_request(self, now: float) -> None:
        """A new request (not a retry) started."""
        # `_refill`, inlined (once per answer: one call and a `max` less).
        updated = self._updated
        tokens = self._tokens
        if updated is None:
            self._updated = now
        elif now > updated:
            floor = self.min_per_s * self.window_s
            fade = math.exp(-(now - updated) / self.window_s)
            tokens = min(self.cap, floor + (tokens - floor) * fade)
            self._updated = now
        tokens += self.ratio
        self._tokens = tokens if tokens < self.cap else self.cap  # (`min` without a call)

    def try_retry(self, now: float) -> bool:
        """Withdraw one token for a retry; False when the budget is spent."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def acquire(self, now: float, rng: random.Random) -> float:
        """Take a token for a retry (returns 0.0), or return the seconds to wait before
        asking again (see the class docstring); the wait is counted as waiting until then."""
        if self.try_retry(now):
            return 0.0
        window = (self.waiting(now) + 1) / max(self.min_per_s, 1.0)
        wait = max(MIN_BUDGET_WAIT_S, rng.uniform(0.0, window))
        heapq.heappush(self._wakeups, now + wait)
        return wait


def parse_retry_after(
    retry_after: str | None, retry_after_ms: str | None = None, *, now_epoch: float = 0.0
) -> float | None:
    """Seconds to wait from `Retry-After` (delta-seconds or HTTP-date, RFC 9110 §10.2.3) or
    `retry-after-ms` (OpenAI's extension, preferred when both are valid). None when absent
    or unparseable; never negative.

    Args:
        retry_after: the `Retry-After` header value.
        retry_after_ms: the `retry-after-ms` header value.
        now_epoch: the current wall-clock time (for HTTP-dates), passed in by the shell.
    """
    if retry_after_ms:
        try:
            value = float(retry_after_ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000.0
    if not retry_after:
        return None
    text = retry_after.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # asctime dates carry no zone; HTTP-dates are GMT (§5.6.7)
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, when.timestamp() - now_epoch)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def kind_of_status(
    status: int, message: str = "", error_code: str | int | None = None
) -> ErrorKind:
    """Classify an HTTP error status (and the provider's message) for the retry policy."""
    text = f"{message} {error_code}".lower()
    if status in (400, 404) and "model" in text and ("not exist" in text or "not found" in text):
        return "not_found"  # DeepSeek: 400 "Model Not Exist"; another route may have it
    if status == 400:
        if (
            "context_length" in text
            or "context length" in text
            or "maximum context" in text
            or "context size" in text  # llama.cpp: "exceeds the available context size"
        ):
            return "context_length_exceeded"
        if "content" in text and ("filter" in text or "risk" in text or "safety" in text):
            return "content_filter"
        return "bad_request"
    by_status: dict[int, ErrorKind] = {
        401: "authentication",
        402: "insufficient_balance",
        403: "permission",
        404: "not_found",
        422: "invalid_parameters",
        429: "rate_limited",
        503: "overloaded",
        529: "overloaded",
    }
    return by_status.get(status, "server_error" if status >= 500 else "unknown")


class Failure(enum.Enum):
    """The class of a failed attempt; the flow has one decision per class."""

    BAD_REQUEST = "bad_request"  # the request itself is wrong: no route will serve it
    REFUSAL = "refusal"  # a content-policy or safety refusal: an answer, not a fault
    CONTEXT = "context"  # the prompt overflows this route's context window
    ROUTE = "route"  # this route cannot serve it (401, 402, 403, 404): another might
    UNREACHABLE = "unreachable"  # permanent transport error (certificate, unknown host)
    RATE_LIMITED = "rate_limited"  # 429
    SERVER = "server"  # 5xx and other transient statuses (408, 409, 425)
    BROKEN = "broken"  # reset, timeout, truncation, malformed data, an error mid-stream


def failure_class(error: UnbrokenError) -> Failure:
    """Classify an attempt's error (see `Failure`)."""
    if isinstance(error, UpstreamStatusError):
        status = error.status_code or 0
        if status == 429:
            return Failure.RATE_LIMITED
        if status in RETRYABLE_STATUSES or status >= 500:
            return Failure.SERVER
        return _by_kind.get(error.kind, Failure.BAD_REQUEST)
    if isinstance(error, UpstreamStreamError):
        # An error event inside a 200 stream: the stream broke, unless it names the request.
        found = _by_kind.get(error.kind, Failure.BROKEN)
        return found if found in _IN_STREAM else Failure.BROKEN
    if isinstance(error, UpstreamError) and error.kind == "unreachable":
        return Failure.UNREACHABLE
    # Connection errors, resets, timeouts, truncation, malformed data: all transient.
    if isinstance(error, UpstreamError | ProtocolError):
        return Failure.BROKEN
    return Failure.BAD_REQUEST


_by_kind: dict[str, Failure] = {
    "bad_request": Failure.BAD_REQUEST,
    "invalid_parameters": Failure.BAD_REQUEST,
    "content_filter": Failure.REFUSAL,
    "context_length_exceeded": Failure.CONTEXT,
    "authentication": Failure.ROUTE,
    "insufficient_balance": Failure.ROUTE,
    "permission": Failure.ROUTE,
    "not_found": Failure.ROUTE,
}
_IN_STREAM = frozenset({Failure.BAD_REQUEST, Failure.REFUSAL, Failure.CONTEXT})
