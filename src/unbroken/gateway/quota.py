"""OpenAI's rate-limit headers (`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`)
from a caller's requests- and tokens-per-minute buckets.

OpenAI sends the reset as a Go duration (`1s`, `6m0s`, `20ms`): the time until the bucket
is full again. A limit the key does not have is not announced. Imports stores and
gateway siblings.
"""

from __future__ import annotations

import math

from unbroken.gateway.keys import Caller
from unbroken.gateway.limits import limit_key
from unbroken.stores.base import Store

__all__ = ["go_duration", "has_rate_limits", "level_headers", "rate_limit_headers"]


def go_duration(seconds: float) -> str:
    """`seconds` as Go's `time.Duration.String()` prints it, to the millisecond."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def has_rate_limits(caller: Caller) -> bool:
    """Whether `caller` has a limit `rate_limit_headers` announces (else they are none)."""
    limits = caller.limits
    return limits.requests_per_minute is not None or limits.tokens_per_minute is not None


async def rate_limit_headers(store: Store, caller: Caller, now: float) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers of `caller` at Unix time `now`, read from `store`."""
    limits = caller.limits
    levels: list[float | None] = []
    for kind, per_minute in (
        ("rpm", limits.requests_per_minute),
        ("tpm", limits.tokens_per_minute),
    ):
        levels.append(
            None
            if per_minute is None
            else await store.level(limit_key(kind, caller.id), per_minute, per_minute / 60.0, now)
        )
    return level_headers(caller, levels[0], levels[1])


def level_headers(
    caller: Caller, requests_level: float | None, tokens_level: float | None
) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers of `caller` whose buckets hold these levels (the admission's,
    after its request was taken: see `Limiter.admit`); a limit without a level is left out."""
    headers: list[tuple[bytes, bytes]] = []
    limits = caller.limits
    for kind, per_minute, level in (
        ("requests", limits.requests_per_minute, requests_level),
        ("tokens", limits.tokens_per_minute, tokens_level),
    ):
        if per_minute is None or level is None:
            continue
        refill = per_minute / 60.0
        headers += [
            (f"x-ratelimit-limit-{kind}".encode(), str(int(per_minute)).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, math.floor(level))).encode()),
            (
                f"x-ratelimit-reset-{kind}".encode(),
                go_duration((per_minute - level) / refill).encode(),
            ),
        ]
    return headers
