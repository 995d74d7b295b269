"""Token-bucket arithmetic for client-side and per-key rate limits; pure.

Imports the standard library and `unbroken.errors` only; time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unbroken.errors import ConfigError

__all__ = ["BucketState", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class BucketState:
    """A bucket's level at a moment: `tokens` available at time `updated_s`."""

    tokens: float
    updated_s: float


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A token bucket: holds at most `capacity` tokens, refills `refill_per_s` per second.

    `take(state, cost, now)` returns the new state and how long to wait (0 when the cost is
    available now). A cost above capacity can never fit and waits `math.inf`. Tokens always
    stay within [0, capacity]. The same math runs in the Redis store's Lua script; one shared
    table of cases tests both.

    Attributes:
        capacity: burst size (for "N per minute": N).
        refill_per_s: steady rate (for "N per minute": N / 60).
    """

    capacity: float
    refill_per_s: float

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.refill_per_s <= 0:
            raise ConfigError(
                f"a rate limit needs capacity > 0 and refill_per_s > 0, got "
                f"{self.capacity} and {self.refill_per_s}"
            )

    @classmethod
    def per_minute(cls, n: float) -> TokenBucket:
        """A bucket allowing `n` per minute, in bursts of up to `n`."""
        return cls(capacity=n, refill_per_s=n / 60.0)

    def initial(self, now: float) -> BucketState:
        """A full bucket at time `now`."""
        return BucketState(self.capacity, now)

    def level(self, state: BucketState, now: float) -> float:
        """Tokens available at `now`."""
        elapsed = max(0.0, now - state.updated_s)
        return min(self.capacity, state.tokens + elapsed * self.refill_per_s)

    def take(self, state: BucketState, cost: float, now: float) -> tuple[BucketState, float]:
        """Take `cost` tokens if available; else leave the bucket and return the wait.

        Returns:
            (new state, wait_s): wait_s is 0.0 when the tokens were taken, otherwise the
            seconds until they will be available (math.inf if cost > capacity).
        """
        if cost < 0:
            raise ValueError(f"a rate-limit cost must be >= 0, got {cost}")
        available = self.level(state, now)
        stamp = max(now, state.updated_s)
        if cost <= available:
            return BucketState(available - cost, stamp), 0.0
        if cost > self.capacity:
            return BucketState(available, stamp), math.inf
        # Never 0.0 when nothing was taken (a float shortfall can underflow), or a caller
        # that waits `wait_s` and tries again would spin.
        return BucketState(available, stamp), max((cost - available) / self.refill_per_s, 1e-9)

    def refund(self, state: BucketState, amount: float, now: float) -> BucketState:
        """Give back `amount` tokens (an estimate turned out too high); capped at capacity."""
        if amount < 0:
            raise ValueError(f"a refund must be >= 0, got {amount}")
        return BucketState(
            min(self.capacity, self.level(state, now) + amount), max(now, state.updated_s)
        )

    def charge(self, state: BucketState, amount: float, now: float) -> BucketState:
        """Take `amount` more tokens after the fact (an estimate was too low); floor at 0."""
        if amount < 0:
            raise ValueError(f"a charge must be >= 0, got {amount}")
        return BucketState(max(0.0, self.level(state, now) - amount), max(now, state.updated_s))
