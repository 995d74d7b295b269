"""Unit tests of core.ratelimit: token-bucket arithmetic."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.ratelimit import BucketState, TokenBucket
from unbroken.errors import ConfigError


@pytest.mark.parametrize(("capacity", "refill"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_bucket_rejects_out_of_range_values(capacity: float, refill: float) -> None:
    """A bucket needs a positive capacity and refill rate."""
    with pytest.raises(ConfigError, match="a rate limit needs capacity > 0"):
        TokenBucket(capacity, refill)


def test_per_minute() -> None:
    """per_minute(n) holds n tokens and refills n per 60 s."""
    bucket = TokenBucket.per_minute(120)
    assert (bucket.capacity, bucket.refill_per_s) == (120, 2.0)


def test_initial_is_full() -> None:
    """A new bucket is full at the given time."""
    assert TokenBucket(5.0, 1.0).initial(7.0) == BucketState(5.0, 7.0)


def test_level_refills_up_to_capacity_and_ignores_the_past() -> None:
    """The level refills per second up to capacity; an earlier `now` removes nothing."""
    bucket = TokenBucket(10.0, 2.0)
    state = BucketState(1.0, 100.0)
    assert bucket.level(state, 101.5) == 4.0
    assert bucket.level(state, 200.0) == 10.0
    assert bucket.level(state, 50.0) == 1.0


def test_take_when_available() -> None:
    """A cost that fits is taken at once (wait 0) and the state is stamped with `now`."""
    bucket = TokenBucket(10.0, 1.0)
    state, wait = bucket.take(bucket.initial(0.0), 4.0, 3.0)
    assert (state, wait) == (BucketState(6.0, 3.0), 0.0)


def test_take_waits_for_missing_tokens() -> None:
    """A cost that does not fit leaves the bucket and returns the time until it fits."""
    bucket = TokenBucket(10.0, 2.0)
    state, wait = bucket.take(BucketState(1.0, 0.0), 7.0, 1.0)
    assert (state, wait) == (BucketState(3.0, 1.0), 2.0)
    state, wait = bucket.take(state, 7.0, 3.0)
    assert (state, wait) == (BucketState(0.0, 3.0), 0.0)


def test_take_above_capacity_never_fits() -> None:
    """A cost above capacity waits forever (math.inf) and takes nothing."""
    bucket = TokenBucket(10.0, 2.0)
    state, wait = bucket.take(bucket.initial(0.0), 10.5, 0.0)
    assert wait == math.inf
    assert state == BucketState(10.0, 0.0)


def test_stamp_never_goes_back() -> None:
    """A `now` earlier than the state's stamp keeps the later stamp (no double refill)."""
    bucket = TokenBucket(10.0, 1.0)
    state, _ = bucket.take(BucketState(5.0, 100.0), 1.0, 90.0)
    assert state == BucketState(4.0, 100.0)
    assert bucket.refund(state, 1.0, 90.0).updated_s == 100.0
    assert bucket.charge(state, 1.0, 90.0).updated_s == 100.0


def test_refund_is_capped_at_capacity() -> None:
    """Refunded tokens are added back, never above capacity."""
    bucket = TokenBucket(10.0, 1.0)
    assert bucket.refund(BucketState(3.0, 0.0), 4.0, 0.0) == BucketState(7.0, 0.0)
    assert bucket.refund(BucketState(8.0, 0.0), 4.0, 1.0) == BucketState(10.0, 1.0)


def test_charge_floors_at_zero() -> None:
    """Charged tokens are taken after the fact, never below zero."""
    bucket = TokenBucket(10.0, 1.0)
    assert bucket.charge(BucketState(5.0, 0.0), 2.0, 0.0) == BucketState(3.0, 0.0)
    assert bucket.charge(BucketState(5.0, 0.0), 20.0, 1.0) == BucketState(0.0, 1.0)


amounts = st.floats(0.0, 50.0)


@given(
    capacity=st.floats(0.5, 40.0),
    refill=st.floats(0.01, 10.0),
    ops=st.lists(
        st.tuples(st.sampled_from(["take", "refund", "charge"]), amounts, st.floats(-5.0, 30.0)),
        max_size=60,
    ),
)
def test_tokens_stay_within_zero_and_capacity(
    capacity: float, refill: float, ops: list[tuple[str, float, float]]
) -> None:
    """Property: tokens stay in [0, capacity] and take/refund/charge do what they say."""
    bucket = TokenBucket(capacity, refill)
    now = 0.0
    state = bucket.initial(now)
    for what, amount, step in ops:
        now += step
        level = bucket.level(state, now)
        if what == "take":
            new, wait = bucket.take(state, amount, now)
            if amount <= level:
                assert wait == 0.0
                assert new.tokens == pytest.approx(level - amount)
            else:
                assert new.tokens == level
                if amount > capacity:
                    assert wait == math.inf
                else:
                    assert wait > 0.0
                    # The wait is at least 1e-9 s, so it may bring a hair more than needed:
                    # up to refill * 1e-9 tokens (1e-8 at this test's fastest refill), and
                    # the rounding of that sum.
                    after = bucket.level(new, new.updated_s + wait)
                    assert after >= amount or after == pytest.approx(amount)
                    assert after == pytest.approx(amount, abs=refill * 1e-9 * (1 + 1e-6) + 1e-12)
        elif what == "refund":
            new = bucket.refund(state, amount, now)
            assert new.tokens == min(capacity, level + amount)
        else:
            new = bucket.charge(state, amount, now)
            assert new.tokens == max(0.0, level - amount)
        assert 0.0 <= new.tokens <= capacity
        assert new.updated_s == max(now, state.updated_s)
        state = new


def test_negative_amounts_are_refused() -> None:
    """A negative cost, refund or charge is a programming error, never a silent overflow."""
    bucket = TokenBucket(10, 1)
    state = bucket.initial(0.0)
    for call in (
        lambda: bucket.take(state, -1, 0.0),
        lambda: bucket.refund(state, -1, 0.0),
        lambda: bucket.charge(state, -1, 0.0),
    ):
        with pytest.raises(ValueError, match=">= 0"):
            call()
