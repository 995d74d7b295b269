"""CircuitBreaker: takes a failing route out of rotation and probes it back in; pure.

Imports the standard library and `unbroken.errors` only; time is passed in.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from unbroken.errors import ConfigError

__all__ = ["BreakerEvent", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"  # traffic flows; consecutive failures are counted
    OPEN = "open"  # traffic skips the route until the cooldown ends
    HALF_OPEN = "half_open"  # one probe request is let through


class BreakerEvent(enum.Enum):
    """Inputs of the breaker state machine."""

    SUCCESS = "success"
    FAILURE = "failure"
    TRIP = "trip"  # failures reached the threshold
    COOLDOWN_OVER = "cooldown_over"
    PROBE = "probe"  # a request was let through while half-open


# Theory of operation
# -------------------
# CLOSED --failure x threshold (TRIP)--> OPEN --cooldown over--> HALF_OPEN
# HALF_OPEN --probe succeeds--> CLOSED;  HALF_OPEN --probe fails--> OPEN (cooldown restarts)
# While HALF_OPEN only one probe is in flight; other requests treat the route as open.
# A pair missing from the table raises, so no invalid transition slips by (h11 _state.py).
_TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.FAILURE): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLDOWN_OVER): BreakerState.HALF_OPEN,
    (BreakerState.OPEN, BreakerEvent.SUCCESS): BreakerState.CLOSED,  # a late in-flight success
    (BreakerState.OPEN, BreakerEvent.FAILURE): BreakerState.OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBE): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.FAILURE): BreakerState.OPEN,
}


def transition(state: BreakerState, event: BreakerEvent) -> BreakerState:
    """The next state; raises KeyError for a pair the table does not allow."""
    return _TRANSITIONS[(state, event)]


class CircuitBreaker:
    """Per-route breaker: opens after `failure_threshold` consecutive failures, lets one probe
    through after `cooldown_s`, closes again on success.

    Args:
        failure_threshold: consecutive failures that open the circuit.
        cooldown_s: how long an open circuit rejects traffic before a probe.
    """

    __slots__ = ("_failures", "_opened_at", "_probing", "cooldown_s", "failure_threshold", "state")

    # Breakers made and state changes of all of them, counted: a reader of the states that
    # saw none since its last look knows them unchanged without looking at each
    # (`ClientConfig.report_breakers`).
    changes: ClassVar[int] = 0

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0) -> None:
        if failure_threshold < 1 or cooldown_s < 0:
            raise ConfigError(
                f"circuit breaker needs failure_threshold >= 1 and cooldown_s >= 0, got "
                f"{failure_threshold} and {cooldown_s}"
            )
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        CircuitBreaker.changes += 1

    def _fire(self, event: BreakerEvent, now: float) -> None:
        new = transition(self.state, event)
        if new is not self.state:
            CircuitBreaker.changes += 1
            if new is BreakerState.OPEN:
                self._opened_at = now
        self.state = new

    def allow(self, now: float) -> bool:
        """May a request use the route now? Claims the probe slot when half-open."""
        if self.state is BreakerState.OPEN and now - self._opened_at >= self.cooldown_s:
            self._fire(BreakerEvent.COOLDOWN_OVER, now)
            self._probing = False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._fire(BreakerEvent.PROBE, now)
            self._probing = True
            return True
        return False

    def record_success(self, now: float) -> None:
        """The route answered."""
        self._failures = 0
        self._probing = False
        if self.state is not BreakerState.CLOSED:  # (a closed one stays closed: no lookup)
            self._fire(BreakerEvent.SUCCESS, now)

    def record_failure(self, now: float) -> None:
        """The route failed (a retryable failure: 5xx, reset, timeout, 429)."""
        self._failures += 1
        self._probing = False
        if self.state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._fire(BreakerEvent.TRIP, now)
        else:  # a failed probe re-opens (and restarts the cooldown) in _fire
            self._fire(BreakerEvent.FAILURE, now)
