"""Load shapes, request plans and token-count distributions for `unbroken bench`. Pure: no
clock, no I/O; randomness comes from a `random.Random` the caller passes in.

A *closed loop* keeps `concurrency` requests in flight and starts the next when one ends, so
the offered rate follows the server's speed. An *open loop* starts requests at planned times
whatever the server does (constant rate, Poisson arrivals, or a linear ramp), which is what
real traffic does and what shows queueing: a slow server gets more, not fewer, requests in
flight. `sales_peak` is a ramp from a quiet baseline to a target rate, then a hold.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from unbroken.errors import ConfigError

__all__ = [
    "LoadShape",
    "TokenDistribution",
    "arrival_times",
    "generated_prompt",
    "parse_tokens",
    "sales_peak",
]

ShapeKind = Literal["closed", "constant", "poisson", "ramp"]

# The sales-peak preset: a quiet baseline at 10% of the target, a ramp over 40% of the run
# and a hold for the rest - the shape a shop sees when a sale opens.
SALES_PEAK_BASELINE = 0.1
SALES_PEAK_RAMP_SHARE = 0.4


@dataclass(frozen=True, slots=True)
class LoadShape:
    """How requests are offered.

    Attributes:
        kind: `closed` (a fixed number in flight), `constant`, `poisson` or `ramp` (open loop).
        duration_s: how long new requests start.
        concurrency: requests in flight (closed loop); an upper bound in open loop (0 = none).
        rate: requests per second (constant, Poisson; the end rate of a ramp).
        start_rate: the ramp's first rate (requests per second).
        ramp_s: how long the ramp climbs; after it the rate holds at `rate`.
        max_requests: stop after this many starts (0 = no limit).
    """

    kind: ShapeKind = "closed"
    duration_s: float = 10.0
    concurrency: int = 8
    rate: float = 10.0
    start_rate: float = 0.0
    ramp_s: float = 0.0
    max_requests: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("closed", "constant", "poisson", "ramp"):
            raise ConfigError(f"unknown load shape {self.kind!r}: closed, constant, poisson, ramp")
        if not self.duration_s > 0 and self.max_requests <= 0:
            raise ConfigError(f"duration must be > 0 s, got {self.duration_s}")
        if self.concurrency < 0 or (self.kind == "closed" and self.concurrency < 1):
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.kind != "closed" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError(f"rate must be a positive number of requests/s, got {self.rate}")
        if self.start_rate < 0 or self.ramp_s < 0 or self.max_requests < 0:
            raise ConfigError("start rate, ramp time and max requests must be >= 0")

    @property
    def is_open(self) -> bool:
        """Whether requests start on a schedule (open loop) rather than as others end."""
        return self.kind != "closed"


def sales_peak(
    target_rate: float, duration_s: float, *, concurrency: int = 0, max_requests: int = 0
) -> LoadShape:
    """The `sales-peak` preset: 10% of `target_rate`, a ramp over 40% of the run, then hold.

    Args:
        target_rate: the peak rate in requests per second.
        duration_s: the whole run.
        concurrency: a cap on requests in flight (0 = none).
        max_requests: stop after this many starts (0 = no limit).
    """
    return LoadShape(
        kind="ramp",
        duration_s=duration_s,
        concurrency=concurrency,
        rate=target_rate,
        start_rate=target_rate * SALES_PEAK_BASELINE,
        ramp_s=duration_s * SALES_PEAK_RAMP_SHARE,
        max_requests=max_requests,
    )


def _rate_at(shape: LoadShape, t: float) -> float:
    if shape.kind != "ramp" or t >= shape.ramp_s:
        return shape.rate
    return shape.start_rate + (shape.rate - shape.start_rate) * t / shape.ramp_s


def arrival_times(shape: LoadShape, rng: random.Random) -> list[float]:
    """Start offsets (seconds from the run's start, ascending) of an open-loop run.

    Constant: every 1/rate. Poisson: exponential gaps drawn from `rng`. Ramp: the cumulative
    offered load (integral of a rate climbing linearly from `start_rate` to `rate` over
    `ramp_s`, then flat) crosses each whole number at a start, so the n-th request starts
    when n requests are due.

    Raises:
        ConfigError: for a closed-loop shape (it has no schedule).
    """
    if not shape.is_open:
        raise ConfigError("a closed-loop shape has no arrival schedule")
    limit = shape.max_requests or math.inf
    times: list[float] = []
    if shape.kind == "poisson":
        t = rng.expovariate(shape.rate)
        while t < shape.duration_s and len(times) < limit:
            times.append(t)
            t += rng.expovariate(shape.rate)
        return times
    if shape.kind == "constant":
        gap = 1.0 / shape.rate
        n = 0
        while n * gap < shape.duration_s and len(times) < limit:
            times.append(n * gap)
            n += 1
        return times
    # ramp: solve cumulative(t) = n for t; during the ramp cumulative is quadratic in t.
    a = (shape.rate - shape.start_rate) / shape.ramp_s / 2.0 if shape.ramp_s > 0 else 0.0
    b = shape.start_rate
    ramp_load = a * shape.ramp_s**2 + b * shape.ramp_s
    n = 0
    while len(times) < limit:
        if n <= ramp_load and shape.ramp_s > 0:
            t = n / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * n)) / (2 * a)
        else:
            t = shape.ramp_s + (n - ramp_load) / shape.rate
        if t >= shape.duration_s:
            break
        times.append(t)
        n += 1
    return times


@dataclass(frozen=True, slots=True)
class TokenDistribution:
    """A `max_tokens` distribution: `fixed:N`, `uniform:LO-HI` or `normal:MEAN,SD`
    (clamped to >= 1).
    """

    kind: Literal["fixed", "uniform", "normal"]
    a: float
    b: float = 0.0

    def draw(self, rng: random.Random) -> int:
        """One `max_tokens` value."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        """The distribution's mean (before clamping)."""
        return self.a if self.kind != "uniform" else (self.a + self.b) / 2.0


def parse_tokens(spec: str) -> TokenDistribution:
    """Parse a `--max-tokens` spec: `150`, `fixed:150`, `uniform:50-300` or `normal:150,30`.

    Raises:
        ConfigError: naming the spec when it is malformed or out of range.
    """
    kind, sep, rest = spec.strip().partition(":")
    if not sep:
        kind, rest = "fixed", kind
    try:
        if kind == "fixed":
            dist = TokenDistribution("fixed", float(int(rest)))
            ok = dist.a >= 1
        elif kind == "uniform":
            lo, _, hi = rest.partition("-")
            dist = TokenDistribution("uniform", float(int(lo)), float(int(hi)))
            ok = 1 <= dist.a <= dist.b
        elif kind == "normal":
            mean, _, sd = rest.partition(",")
            dist = TokenDistribution("normal", float(mean), float(sd))
            ok = dist.a >= 1 and dist.b >= 0 and math.isfinite(dist.a + dist.b)
        else:
            ok = False
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            f"bad --max-tokens {spec!r}: use N, fixed:N, uniform:LO-HI or normal:MEAN,SD "
            "(whole numbers >= 1)"
        )
    return dist


# Words for generated prompts: plain English so that any model answers them.
_TOPICS = (
    "shipping times",
    "a refund",
    "the return policy",
    "a size exchange",
    "gift cards",
    "the warranty",
    "a late order",
    "payment options",
    "a discount code",
    "store opening hours",
)
_ASKS = ("Explain", "Summarise", "Tell a customer about", "Write a short note on", "Describe")


def generated_prompt(rng: random.Random, n: int) -> str:
    """A varied, plausible shop-support prompt (request number `n` keeps it unique)."""
    return f"{rng.choice(_ASKS)} {rng.choice(_TOPICS)} in a few sentences. (request {n})"
