"""Unit tests of core.breaker: the transition table and the CircuitBreaker object."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.breaker import (
    _TRANSITIONS,
    BreakerEvent,
    BreakerState,
    CircuitBreaker,
    transition,
)
from unbroken.errors import ConfigError

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@pytest.mark.parametrize(("state", "event"), list(itertools.product(BreakerState, BreakerEvent)))
def test_every_pair_transitions_or_raises(state: BreakerState, event: BreakerEvent) -> None:
    """Every (state, event) pair either has a next state in the table or raises KeyError."""
    if (state, event) in _TRANSITIONS:
        assert transition(state, event) is _TRANSITIONS[(state, event)]
        assert isinstance(transition(state, event), BreakerState)
    else:
        with pytest.raises(KeyError):
            transition(state, event)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (CLOSED, BreakerEvent.COOLDOWN_OVER),
        (CLOSED, BreakerEvent.PROBE),
        (OPEN, BreakerEvent.TRIP),
        (OPEN, BreakerEvent.PROBE),
        (HALF_OPEN, BreakerEvent.TRIP),
        (HALF_OPEN, BreakerEvent.COOLDOWN_OVER),
    ],
)
def test_invalid_transitions_raise(state: BreakerState, event: BreakerEvent) -> None:
    """Probing a closed circuit, tripping an open one or cooling a half-open one is invalid."""
    with pytest.raises(KeyError):
        transition(state, event)


def test_documented_transitions() -> None:
    """The theory of operation: trip opens, cooldown half-opens, probe result closes or opens."""
    assert transition(CLOSED, BreakerEvent.TRIP) is OPEN
    assert transition(OPEN, BreakerEvent.COOLDOWN_OVER) is HALF_OPEN
    assert transition(HALF_OPEN, BreakerEvent.SUCCESS) is CLOSED
    assert transition(HALF_OPEN, BreakerEvent.FAILURE) is OPEN
    assert transition(OPEN, BreakerEvent.SUCCESS) is CLOSED


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_breaker_rejects_out_of_range_values(threshold: int, cooldown: float) -> None:
    """A threshold below one or a negative cooldown raises ConfigError."""
    with pytest.raises(ConfigError, match="circuit breaker needs"):
        CircuitBreaker(threshold, cooldown)


def test_closed_open_half_open_closed() -> None:
    """Failures open the circuit; after the cooldown one probe passes; its success closes it."""
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    assert breaker.allow(0.0)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state is CLOSED
    assert breaker.allow(2.0)
    breaker.record_failure(3.0)
    assert breaker.state is OPEN
    assert not breaker.allow(12.9)  # cooldown counts from the trip at 3.0
    assert breaker.allow(13.0)
    assert breaker.state is HALF_OPEN
    assert not breaker.allow(13.0)  # only one probe in flight
    assert not breaker.allow(50.0)
    breaker.record_success(14.0)
    assert breaker.state is CLOSED
    assert breaker.allow(14.0)
    assert breaker.allow(14.0)


def test_success_resets_the_failure_count() -> None:
    """Only consecutive failures count toward the threshold."""
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=1.0)
    breaker.record_failure(0.0)
    breaker.record_success(0.0)
    breaker.record_failure(0.0)
    assert breaker.state is CLOSED
    breaker.record_failure(0.0)
    assert breaker.state is OPEN


def test_failed_probe_reopens_and_restarts_the_cooldown() -> None:
    """A failing probe opens the circuit again, with the cooldown counted from the probe."""
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10.0)
    breaker.record_failure(0.0)
    assert breaker.allow(10.0)
    assert breaker.state is HALF_OPEN
    breaker.record_failure(15.0)
    assert breaker.state is OPEN
    assert not breaker.allow(24.0)
    assert breaker.allow(25.0)
    assert breaker.state is HALF_OPEN


def test_late_results_while_open() -> None:
    """A late failure keeps an open circuit's cooldown; a late success closes it."""
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10.0)
    breaker.record_failure(0.0)
    breaker.record_failure(5.0)
    assert breaker.state is OPEN
    assert breaker.allow(10.0)  # cooldown still counted from 0.0
    breaker.record_failure(11.0)
    breaker.record_success(12.0)
    assert breaker.state is CLOSED


def test_zero_cooldown_probes_at_once() -> None:
    """With no cooldown an open circuit lets a probe through on the next request."""
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=0.0)
    breaker.record_failure(0.0)
    assert breaker.state is OPEN
    assert breaker.allow(0.0)
    assert breaker.state is HALF_OPEN


Op = tuple[str, float]


@given(
    threshold=st.integers(1, 4),
    cooldown=st.floats(0.0, 20.0),
    ops=st.lists(
        st.tuples(st.sampled_from(["allow", "success", "failure"]), st.floats(0.0, 8.0)),
        max_size=80,
    ),
)
def test_breaker_follows_its_state_machine(threshold: int, cooldown: float, ops: list[Op]) -> None:
    """Property: the breaker follows its table, rejects while cooling and lets one probe through."""
    breaker = CircuitBreaker(threshold, cooldown)
    now = 0.0
    consecutive = 0
    opened_at: float | None = None
    probe_in_flight = False
    for what, step in ops:
        now += step
        before = breaker.state
        if what == "allow":
            allowed = breaker.allow(now)
            if before is CLOSED:
                assert allowed
                assert breaker.state is CLOSED
            elif before is OPEN:
                assert opened_at is not None
                cooled = now - opened_at >= cooldown
                assert allowed == cooled
                assert breaker.state is (HALF_OPEN if cooled else OPEN)
                probe_in_flight = allowed
            else:
                assert allowed == (not probe_in_flight)
                probe_in_flight = True
        elif what == "success":
            breaker.record_success(now)
            consecutive = 0
            probe_in_flight = False
            assert breaker.state is CLOSED
        else:
            breaker.record_failure(now)
            consecutive += 1
            probe_in_flight = False
            if before is CLOSED:
                assert breaker.state is (OPEN if consecutive >= threshold else CLOSED)
            else:
                assert breaker.state is OPEN
            if breaker.state is OPEN and before is not OPEN:
                opened_at = now
        if breaker.state is not before:
            assert any(_TRANSITIONS.get((before, e)) is breaker.state for e in BreakerEvent)
