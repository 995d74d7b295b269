"""Unit tests of core.backoff: policy validation, delay bounds, the retry budget, Retry-After
parsing and error classification."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from unbroken.core.backoff import (
    MIN_BUDGET_WAIT_S,
    Failure,
    RetryBudget,
    RetryPolicy,
    failure_class,
    kind_of_status,
    parse_retry_after,
)
from unbroken.errors import (
    ConfigError,
    ErrorKind,
    ProtocolError,
    RateLimited,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTruncated,
)

# -- RetryPolicy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"attempts": 0}, "attempts must be >= 1, got 0"),
        ({"max_resumes": -1}, "max_resumes must be >= 0, got -1"),
        ({"wait_initial_s": -0.1}, "0 <= wait_initial_s <= wait_max_s"),
        ({"wait_initial_s": 2.0, "wait_max_s": 1.0}, "got 2.0 and 1.0"),
        ({"wait_exp_base": 0.5}, "wait_exp_base must be >= 1, got 0.5"),
        ({"deadline_s": 0.0}, "deadline_s must be > 0, got 0.0"),
        ({"rate_limit_wait_s": -1.0}, "rate_limit_wait_s and rate_limit_retries must be >= 0"),
        ({"rate_limit_retries": -1}, "rate_limit_wait_s and rate_limit_retries must be >= 0"),
        ({"server_error_retries": -1}, "server_error_retries must be >= 0, got -1"),
    ],
)
def test_policy_rejects_out_of_range_values(kwargs: dict[str, float], fragment: str) -> None:
    """Each out-of-range policy field raises ConfigError naming the value."""
    with pytest.raises(ConfigError, match="retry") as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]  # ints and floats mixed on purpose
    assert fragment in info.value.message


def test_policy_defaults_are_valid() -> None:
    """The defaults build, and a positive deadline is accepted."""
    policy = RetryPolicy(deadline_s=30.0)
    assert (policy.attempts, policy.max_resumes, policy.deadline_s) == (8, 5, 30.0)


def test_delay_grows_then_is_capped() -> None:
    """The ceiling of delay n is wait_initial_s * base**(n-1), capped at wait_max_s."""
    policy = RetryPolicy(wait_initial_s=1.0, wait_max_s=5.0, wait_exp_base=2.0)

    class Top(random.Random):
        """A generator whose uniform() returns the upper bound."""

        def uniform(self, a: float, b: float) -> float:
            return b

    assert [policy.delay(n, Top()) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_delay_overflow_is_clamped() -> None:
    """A power that overflows a float still gives a delay within [0, wait_max_s]."""
    policy = RetryPolicy(wait_initial_s=1.0, wait_max_s=3.0, wait_exp_base=10.0)
    delays = [policy.delay(10**6, random.Random(seed)) for seed in range(50)]
    assert all(0.0 <= d <= 3.0 for d in delays)
    assert max(delays) > 1.0  # the ceiling is wait_max_s, not 0 or wait_initial_s


def test_zero_initial_wait_never_waits_even_on_overflow() -> None:
    """wait_initial_s == 0 means no backoff at all, also when the power overflows."""
    policy = RetryPolicy(wait_initial_s=0.0, wait_max_s=3.0, wait_exp_base=10.0)
    assert {policy.delay(n, random.Random(n)) for n in (1, 5, 10**6)} == {0.0}


@given(
    initial=st.floats(0.0, 100.0),
    extra=st.floats(0.0, 100.0),
    base=st.floats(1.0, 1000.0),
    n=st.integers(-5, 10**9),
    seed=st.integers(0, 2**32),
)
def test_every_delay_lies_within_zero_and_wait_max(
    initial: float, extra: float, base: float, n: int, seed: int
) -> None:
    """Property: for any valid policy and any n (huge ones included), 0 <= delay <= wait_max_s."""
    policy = RetryPolicy(wait_initial_s=initial, wait_max_s=initial + extra, wait_exp_base=base)
    delay = policy.delay(n, random.Random(seed))
    assert 0.0 <= delay <= policy.wait_max_s


# -- RetryBudget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "min_per_s", "cap", "window_s"),
    [(-0.1, 1.0, 20.0, 60.0), (1.0, -1.0, 20.0, 60.0), (1.0, 1.0, 0.5, 60.0), (1, 1, 20, 0)],
)
def test_budget_rejects_out_of_range_values(
    ratio: float, min_per_s: float, cap: float, window_s: float
) -> None:
    """A negative ratio or trickle, a cap below one retry or an empty window raises."""
    with pytest.raises(ConfigError, match="retry budget needs"):
        RetryBudget(ratio, min_per_s, cap, window_s)


def test_budget_starts_at_its_quiet_level_and_refuses_when_spent() -> None:
    """A budget starts with min_per_s * window_s tokens (at most cap); retries take one
    each and are refused below one."""
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, cap=100.0, window_s=20.0)
    assert budget.tokens == 2.0
    assert budget.try_retry(0.0)
    assert budget.try_retry(0.0)
    assert not budget.try_retry(0.0)
    assert budget.tokens == 0.0
    assert RetryBudget(ratio=0.0, min_per_s=10.0, cap=5.0).tokens == 5.0


def test_budget_requests_deposit_ratio_up_to_cap() -> None:
    """Each request deposits `ratio` tokens, never above `cap`."""
    budget = RetryBudget(ratio=0.5, min_per_s=0.0, cap=2.0)
    assert budget.tokens == 0.0
    budget.on_request(0.0)
    assert budget.tokens == 0.5
    assert not budget.try_retry(0.0)
    budget.on_request(0.0)
    assert budget.try_retry(0.0)
    for _ in range(10):
        budget.on_request(0.0)
    assert budget.tokens == 2.0


def test_budget_deposits_fade_and_trickle_refills() -> None:
    """Deposits fade with time constant window_s; min_per_s refills toward its quiet level;
    a clock that goes back changes nothing."""
    budget = RetryBudget(ratio=10.0, min_per_s=0.0, window_s=10.0)
    budget.on_request(0.0)
    budget.on_request(10.0)
    assert budget.tokens == pytest.approx(10.0 / math.e + 10.0)
    budget.on_request(5.0)  # earlier time: no fading, just the deposit
    assert budget.tokens == pytest.approx(10.0 / math.e + 20.0)
    quiet = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=10.0)
    for _ in range(10):
        assert quiet.try_retry(0.0)
    assert not quiet.try_retry(0.0)
    assert quiet.try_retry(1.1)  # about one token back after a second
    assert quiet.tokens < 1.0


def test_budget_paces_a_crowd_instead_of_refusing() -> None:
    """A spent budget answers with a wait; the window grows with the number waiting, and
    a wait that has passed no longer counts."""
    budget = RetryBudget(ratio=0.0, min_per_s=2.0, window_s=1.0)
    rng = random.Random(1)
    assert budget.acquire(0.0, rng) == 0.0
    assert budget.acquire(0.0, rng) == 0.0
    waits = [budget.acquire(0.0, rng) for _ in range(50)]
    assert all(w >= MIN_BUDGET_WAIT_S for w in waits)
    assert budget.waiting(0.0) == 50
    # Full jitter over (waiting + 1) / min_per_s: the later ones may wait longer.
    assert max(waits[25:]) > max(waits[:5])
    assert all(w <= (i + 1) / 2.0 for i, w in enumerate(waits))
    assert budget.waiting(max(waits)) == 0
    assert budget.acquire(max(waits) + 10.0, rng) == 0.0


# The clock read first at -1: the budget counts its seconds from there, not from 0.
@example(ratio=0.0, min_per_s=1.0, cap=1.0, steps=[("retry", -1.0), ("retry", 1.5)])
@given(
    ratio=st.floats(0.0, 3.0),
    min_per_s=st.floats(0.0, 3.0),
    cap=st.floats(1.0, 50.0),
    steps=st.lists(
        st.tuples(st.sampled_from(["request", "retry"]), st.floats(-1.0, 10.0)), max_size=200
    ),
)
def test_budget_bounds_retries(
    ratio: float, min_per_s: float, cap: float, steps: list[tuple[str, float]]
) -> None:
    """Property: retries <= start + ratio*requests + min_per_s*seconds, whatever the
    sequence, and tokens stay within [0, cap]. The seconds run from the budget's first
    reading of the clock (which may be before 0: the steps go back as well as forward)."""
    budget = RetryBudget(ratio, min_per_s, cap, window_s=30.0)
    start_tokens = budget.tokens
    now = latest = 0.0
    start: float | None = None
    requests = retries = 0
    rng = random.Random(0)
    for what, step in steps:
        now += step
        latest = max(latest, now)
        if start is None:
            start = now
        if what == "request":
            budget.on_request(now)
            requests += 1
        elif budget.acquire(now, rng) == 0.0:
            retries += 1
        assert 0.0 <= budget.tokens <= cap
    seconds = 0.0 if start is None else latest - start
    assert retries <= start_tokens + ratio * requests + min_per_s * seconds + 1e-9


def test_budget_clone_has_the_settings_and_a_fresh_balance() -> None:
    """clone() copies the settings, not the state."""
    budget = RetryBudget(ratio=1.0, min_per_s=0.5, cap=9.0, window_s=4.0)
    budget.try_retry(0.0)
    twin = budget.clone()
    assert (twin.ratio, twin.min_per_s, twin.cap, twin.window_s) == (1.0, 0.5, 9.0, 4.0)
    assert twin.tokens == 2.0 != budget.tokens


# -- Retry-After ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "retry_after_ms", "expected"),
    [
        (None, None, None),
        ("", None, None),
        ("2", None, 2.0),
        (" 1.5 ", None, 1.5),
        ("0", None, 0.0),
        ("-1", None, None),
        ("nan", None, None),
        ("1e999", None, None),
        ("soon", None, None),
        ("2", "1500", 1.5),  # the millisecond header wins when valid
        ("2", "junk", 2.0),
        ("2", "-5", 2.0),
        ("2", "inf", 2.0),
        (None, "250", 0.25),
        (None, "", None),
    ],
)
def test_parse_retry_after(
    retry_after: str | None, retry_after_ms: str | None, expected: float | None
) -> None:
    """delta-seconds and retry-after-ms parse; negative, non-finite and junk values are None."""
    assert parse_retry_after(retry_after, retry_after_ms) == expected


def test_parse_retry_after_http_date() -> None:
    """An HTTP-date gives the seconds from now_epoch; a date in the past gives 0."""
    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # 1445412480 in epoch seconds
    assert parse_retry_after(date, now_epoch=1445412470.0) == 10.0
    assert parse_retry_after(date, now_epoch=1445412490.0) == 0.0
    assert parse_retry_after("Wed, 32 Oct 2015 07:28:00 GMT", now_epoch=0.0) is None


@pytest.mark.parametrize(
    "date",
    ["Wednesday, 21-Oct-15 07:28:00 GMT", "Wed Oct 21 07:28:00 2015"],
    ids=["rfc850", "asctime"],
)
def test_obsolete_http_dates_are_gmt(date: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 850 and asctime HTTP-dates are GMT whatever the local zone (RFC 9110 §5.6.7)."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(date, now_epoch=1445412470.0) == 10.0
    finally:
        monkeypatch.undo()
        time.tzset()


# -- kind_of_status and classify ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "code", "kind"),
    [
        (400, "Model Not Exist", None, "not_found"),
        (404, "The model `x` does not exist", "model_not_found", "not_found"),
        (404, "no such route", None, "not_found"),
        (
            400,
            "This model's maximum context length is 65536 tokens",
            None,
            "context_length_exceeded",
        ),
        (400, "bad", "context_length_exceeded", "context_length_exceeded"),
        (400, "the request exceeds the available context size", None, "context_length_exceeded"),
        (400, "Content Exists Risk", None, "content_filter"),
        (400, "content management policy: filtered", None, "content_filter"),
        (400, "content is fine", None, "bad_request"),
        (400, "Invalid max_tokens value", 400, "bad_request"),
        (401, "Authentication Fails", None, "authentication"),
        (402, "Insufficient Balance", None, "insufficient_balance"),
        (403, "forbidden", None, "permission"),
        (422, "Invalid Parameters", None, "invalid_parameters"),
        (429, "Rate Limit Reached", None, "rate_limited"),
        (500, "Server Error", None, "server_error"),
        (503, "Server Overloaded", None, "overloaded"),
        (529, "overloaded", None, "overloaded"),
        (520, "", None, "server_error"),
        (418, "teapot", None, "unknown"),
        (409, "conflict", None, "unknown"),
    ],
)
def test_kind_of_status(status: int, message: str, code: str | int | None, kind: ErrorKind) -> None:
    """Statuses (and DeepSeek's / OpenAI's messages) map to the documented error kinds."""
    assert kind_of_status(status, message, code) == kind


def status_error(status: int, message: str = "") -> UpstreamStatusError:
    return UpstreamStatusError(message, status_code=status, kind=kind_of_status(status, message))


# A literal list, not the code's own set: a status dropped from the code must fail here.
@pytest.mark.parametrize("status", [408, 409, 425, 429, *range(500, 600)])
def test_transient_statuses(status: int) -> None:
    """429 is rate limiting; 408, 409, 425 and every 5xx are server trouble."""
    expected = Failure.RATE_LIMITED if status == 429 else Failure.SERVER
    assert failure_class(status_error(status)) is expected


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (401, "", Failure.ROUTE),
        (402, "", Failure.ROUTE),
        (403, "", Failure.ROUTE),
        (404, "", Failure.ROUTE),
        (400, "Model Not Exist", Failure.ROUTE),
        (400, "maximum context length exceeded", Failure.CONTEXT),
        (400, "Content Exists Risk", Failure.REFUSAL),
        (400, "Invalid request", Failure.BAD_REQUEST),
        (422, "Invalid Parameters", Failure.BAD_REQUEST),
        (418, "", Failure.BAD_REQUEST),
    ],
)
def test_status_error_classes(status: int, message: str, expected: Failure) -> None:
    """Route-specific statuses, overflows, refusals and bad requests each have a class."""
    assert failure_class(status_error(status, message)) is expected


def test_status_error_without_status_code_is_a_bad_request() -> None:
    """A status error that lost its code (0) is not retried blindly."""
    assert failure_class(UpstreamStatusError("?", status_code=None)) is Failure.BAD_REQUEST


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("server_error", Failure.BROKEN),
        ("overloaded", Failure.BROKEN),
        ("rate_limited", Failure.BROKEN),
        ("authentication", Failure.BROKEN),
        ("context_length_exceeded", Failure.CONTEXT),
        ("content_filter", Failure.REFUSAL),
        ("bad_request", Failure.BAD_REQUEST),
    ],
)
def test_stream_errors(kind: ErrorKind, expected: Failure) -> None:
    """Errors inside a stream break it, unless they name the request, an overflow or a
    refusal."""
    assert failure_class(UpstreamStreamError("x", status_code=200, kind=kind)) is expected


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("reset"),
        UpstreamTruncated("cut"),
        UpstreamTimeout("slow", phase="idle", timeout_s=1.0),
        UpstreamError("other"),
        ProtocolError("bad frame"),
    ],
    ids=["connect", "truncated", "timeout", "upstream", "protocol"],
)
def test_transport_and_protocol_errors_are_breaks(error: UnbrokenError) -> None:
    """Connection errors, truncation, timeouts and malformed data are transient."""
    assert failure_class(error) is Failure.BROKEN


def test_permanent_transport_errors_are_unreachable() -> None:
    """A certificate or host-name failure is its own class (never retried on its route)."""
    error = UpstreamConnectError("cannot connect: certificate verify failed", kind="unreachable")
    assert failure_class(error) is Failure.UNREACHABLE


@pytest.mark.parametrize(
    "error", [UnbrokenError("x"), ConfigError("y"), RateLimited("z", retry_after_s=1.0)]
)
def test_other_errors_are_not_retried(error: UnbrokenError) -> None:
    """Errors that are not about the upstream (config, local limits) are never retried."""
    assert failure_class(error) is Failure.BAD_REQUEST
