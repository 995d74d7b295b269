"""Retry policy, delay math, the retry budget and error classification; pure, no I/O.

Imports the standard library (`random` only to type an injected generator), `unbroken.errors`.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
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
    "RETRYABLE_STATUSES",
    "Decision",
    "RetryBudget",
    "RetryPolicy",
    "classify",
    "kind_of_status",
    "parse_retry_after",
]

# RFC 9110 §15 and DeepSeek's error table (protocol.md §1.9): these statuses are transient.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


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
    """

    attempts: int = 8
    max_resumes: int = 5
    wait_initial_s: float = 0.25
    wait_max_s: float = 8.0
    wait_exp_base: float = 2.0
    retry_after_max_s: float = 60.0
    deadline_s: float | None = None

    def __post_init__(self) -> None:
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
    """A budget that bounds retries to a share of requests (gRPC retry throttling, Finagle
    RetryBudget), so sustained failure does not multiply the load on an upstream.

    Every new request deposits `ratio` tokens (up to `cap`); every retry withdraws one, and
    is refused when fewer than one token is left. `min_per_s` tokens also trickle in per
    second so a quiet client can still retry. Over any long run,
    retries <= ratio * requests + min_per_s * seconds + cap.

    Defaults: up to 2 retries per request on average (load at most triples under sustained
    failure, where 8 attempts without a budget would multiply it by 8), which still lets a
    brown-out where most requests fail once or twice heal completely.

    Args:
        ratio: retries allowed per request on average.
        min_per_s: retries allowed per second regardless of traffic.
        cap: the most tokens saved up (the burst of retries after a quiet spell).
    """

    __slots__ = ("_tokens", "_updated", "cap", "min_per_s", "ratio")

    def __init__(self, ratio: float = 2.0, min_per_s: float = 1.0, cap: float = 50.0) -> None:
        if ratio < 0 or min_per_s < 0 or cap < 1:
            raise ConfigError(
                f"retry budget needs ratio >= 0, min_per_s >= 0, cap >= 1; got "
                f"{ratio}, {min_per_s}, {cap}"
            )
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = cap
        self._tokens = cap
        self._updated: float | None = None

    def _refill(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            self._tokens = min(self.cap, self._tokens + (now - self._updated) * self.min_per_s)
        self._updated = now if self._updated is None else max(self._updated, now)

    @property
    def tokens(self) -> float:
        """Tokens left (for metrics and tests)."""
        return self._tokens

    def on_request(self, now: float) -> None:
        """A new request (not a retry) started."""
        self._refill(now)
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def try_retry(self, now: float) -> bool:
        """Withdraw one token for a retry; False when the budget is spent."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


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


class Decision(enum.Enum):
    """What the flow may do about a failed attempt."""

    RETRY = "retry"  # transient: same route after a backoff (or resume if output was shown)
    FALLBACK = "fallback"  # this route cannot serve it, another one might (401, 402, 404...)
    FATAL = "fatal"  # the request itself is wrong; no route will serve it


def classify(error: UnbrokenError) -> Decision:
    """Decide whether an attempt's error is worth another attempt.

    Retry: connection errors and resets, timeouts, truncation, malformed data, 408, 409,
    429, 5xx, error events inside a stream (except those naming a bad request). Fall back
    only (never the same route again): 401, 402, 403, 404, a content filter, and a context
    overflow (another route may have a larger context). Fatal: other 400 and 422.
    """
    if isinstance(error, UpstreamStatusError):
        status = error.status_code or 0
        if status in RETRYABLE_STATUSES or status >= 500:
            return Decision.RETRY
        if error.kind in ("authentication", "insufficient_balance", "permission", "not_found"):
            return Decision.FALLBACK
        if error.kind in ("context_length_exceeded", "content_filter"):
            return Decision.FALLBACK
        return Decision.FATAL
    if isinstance(error, UpstreamStreamError):
        if error.kind == "context_length_exceeded":
            return Decision.FALLBACK
        return Decision.FATAL if error.kind == "bad_request" else Decision.RETRY
    # Connection errors, resets, timeouts, truncation, malformed data: all transient.
    if isinstance(error, UpstreamError | ProtocolError):
        return Decision.RETRY
    return Decision.FATAL
