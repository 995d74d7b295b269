"""Per-key limits: requests and tokens per minute (token buckets), concurrent requests
(leased slots) and daily token or cost budgets (counters), all kept in a `Store`.

An over-limit request is refused before any upstream call with 429, a `Retry-After` and an
OpenAI-shaped body naming the limit. Imports settings, stores, core.tokens and siblings.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass

from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.stores.base import Store

__all__ = ["Admission", "Limiter"]

# Daily counters outlive their UTC day by one more, so a late request still finds them.
DAY_TTL_S = 2 * 86400.0


@dataclass(slots=True)
class Admission:
    """What one admitted request holds: its slot lease and its token reservation."""

    caller: Caller
    day: str
    lease: str | None = None
    reserved_tokens: int = 0


def _day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


def _to_midnight(now: float) -> float:
    return 86400.0 - (now % 86400.0)


class Limiter:
    """Admits requests under their caller's limits.

    Args:
        store: where buckets, slots and counters live.
        lease_s: how long a concurrency slot is held without renewal.
    """

    def __init__(self, store: Store, lease_s: float) -> None:
        self._store = store
        self.lease_s = lease_s

    async def admit(self, caller: Caller, estimated_tokens: int, now: float) -> Admission:
        """Check and take every limit of `caller` for one request, or refuse it.

        Args:
            caller: who asks.
            estimated_tokens: prompt estimate plus the completion budget (`max_tokens`).
            now: Unix time.

        Raises:
            GatewayError: 429 naming the limit, with Retry-After.
        """
        limits = caller.limits
        store = self._store
        admission = Admission(caller, _day(now))
        cid = caller.id
        if limits.daily_tokens is not None:
            used = await store.get(f"tokens:{cid}:{admission.day}", now)
            if used >= limits.daily_tokens:
                raise self._refuse(
                    f"key {caller.name!r} used its daily budget of {limits.daily_tokens} "
                    f"tokens ({used:.0f} used today, UTC)",
                    "daily_token_budget_exceeded",
                    _to_midnight(now),
                )
        if limits.daily_cost_usd is not None:
            spent = await store.get(f"cost:{cid}:{admission.day}", now)
            if spent >= limits.daily_cost_usd:
                raise self._refuse(
                    f"key {caller.name!r} used its daily budget of ${limits.daily_cost_usd:g} "
                    f"(${spent:.4f} spent today, UTC)",
                    "daily_cost_budget_exceeded",
                    _to_midnight(now),
                )
        rpm = limits.requests_per_minute
        if rpm is not None:
            wait = await store.take(f"rpm:{cid}", rpm, rpm / 60.0, 1.0, now)
            if wait > 0:
                raise self._refuse(
                    f"key {caller.name!r} is over its limit of {rpm:g} requests per minute",
                    "requests_per_minute_exceeded",
                    wait,
                )
        tpm = limits.tokens_per_minute
        if tpm is not None:
            # A request bigger than the whole bucket still runs when the bucket is full.
            cost = float(min(max(estimated_tokens, 1), tpm))
            wait = await store.take(f"tpm:{cid}", tpm, tpm / 60.0, cost, now)
            if wait > 0:
                await self._undo(admission, now, rpm=True)
                raise self._refuse(
                    f"key {caller.name!r} is over its limit of {tpm:g} tokens per minute "
                    f"(this request needs about {cost:.0f})",
                    "tokens_per_minute_exceeded",
                    wait,
                )
            admission.reserved_tokens = int(cost)
        streams = limits.concurrent_streams
        if streams is not None:
            lease = uuid.uuid4().hex
            if not await store.acquire_slot(f"slots:{cid}", lease, streams, now, self.lease_s):
                await self._undo(admission, now, rpm=True)
                raise self._refuse(
                    f"key {caller.name!r} already has {streams} requests in flight "
                    "(its concurrency limit)",
                    "concurrency_limit_exceeded",
                    1.0,
                )
            admission.lease = lease
        return admission

    def _refuse(self, message: str, code: str, wait_s: float) -> GatewayError:
        retry = wait_s if math.isfinite(wait_s) else 60.0
        return GatewayError(
            429,
            f"{message}; retry in {math.ceil(retry)} s",
            type="rate_limit_error",
            code=code,
            retry_after_s=retry,
        )

    async def _undo(self, admission: Admission, now: float, *, rpm: bool) -> None:
        limits = admission.caller.limits
        cid = admission.caller.id
        if rpm and limits.requests_per_minute is not None:
            r = limits.requests_per_minute
            await self._store.adjust(f"rpm:{cid}", r, r / 60.0, 1.0, now)
        if admission.reserved_tokens and limits.tokens_per_minute is not None:
            t = limits.tokens_per_minute
            await self._store.adjust(f"tpm:{cid}", t, t / 60.0, admission.reserved_tokens, now)
            admission.reserved_tokens = 0

    async def renew(self, admission: Admission, now: float) -> None:
        """Keep a long request's concurrency slot."""
        if admission.lease is not None:
            await self._store.renew_slot(
                f"slots:{admission.caller.id}", admission.lease, now, self.lease_s
            )

    async def finish(
        self, admission: Admission, tokens: int | None, cost_usd: float, now: float
    ) -> None:
        """Release the slot and book what the request really used.

        Args:
            admission: from `admit`.
            tokens: billed tokens (all attempts), or None when unknown.
            cost_usd: billed cost.
            now: Unix time.
        """
        limits = admission.caller.limits
        cid = admission.caller.id
        store = self._store
        if admission.lease is not None:
            await store.release_slot(f"slots:{cid}", admission.lease)
            admission.lease = None
        tpm = limits.tokens_per_minute
        if tpm is not None and tokens is not None and admission.reserved_tokens:
            delta = admission.reserved_tokens - tokens
            if delta:
                await store.adjust(f"tpm:{cid}", tpm, tpm / 60.0, float(delta), now)
        if limits.daily_tokens is not None and tokens:
            await store.add(f"tokens:{cid}:{admission.day}", float(tokens), now, DAY_TTL_S)
        if limits.daily_cost_usd is not None and cost_usd:
            await store.add(f"cost:{cid}:{admission.day}", cost_usd, now, DAY_TTL_S)
