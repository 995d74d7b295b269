"""Per-key limits: requests and tokens per minute (token buckets), concurrent requests
(leased slots) and daily token or cost budgets (counters), all kept in a `Store`.

An over-limit request is refused before any upstream call with 429, a `Retry-After` and an
OpenAI-shaped body naming the limit. Token limits are exact: a request *reserves* its
prompt estimate plus `max_tokens` (or the configured `reserve_tokens`) before it is
admitted, in one atomic store operation, and `finish` settles the reservation against the
billed usage. So concurrent requests can never spend more than the budget plus what the
last admitted ones used beyond their reservation. Imports settings, stores and siblings.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from unbroken.errors import StoreError
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.usage import day_of
from unbroken.stores.base import Bucket, Slot, Store

__all__ = ["Admission", "Limiter", "limit_key"]

# Daily counters outlive their UTC day by one more, so a late request still finds them.
DAY_TTL_S = 2 * 86400.0


@dataclass(slots=True)
class Admission:
    """What one admitted request holds: its slot lease and its token reservations. `finish`
    clears each part once settled, so a settlement cut short by a store failure can be run
    again without booking anything twice.

    Attributes:
        unchecked: admitted without limits because the store failed (fail-open).
        requests_level: the requests-per-minute bucket's tokens once this request was
            taken (None without that limit), for the rate-limit headers.
        tokens_level: the same of the tokens-per-minute bucket.
    """

    caller: Caller
    day: str
    lease: str | None = None
    reserved_tokens: int = 0
    reserved_daily: float = 0.0
    unchecked: bool = False
    tokens_booked: bool = False
    cost_booked: bool = False
    requests_level: float | None = None
    tokens_level: float | None = None


def limit_key(kind: str, cid: str) -> str:
    """The store key of caller `cid`'s `rpm` or `tpm` bucket or its `slots`: the id is a
    Redis hash tag, so all share a hash slot and one `Store.take_all` takes them on Redis
    Cluster."""
    return f"{kind}:{{{cid}}}"


def _to_midnight(now: float) -> float:
    return 86400.0 - (now % 86400.0)


class Limiter:
    """Admits requests under their caller's limits.

    Args:
        store: where buckets, slots and counters live.
        lease_s: how long a concurrency slot is held without renewal.
        fail_open: when the store fails during admission, serve the request unlimited
            (True) instead of refusing it with 503 (False).
        on_store_failure: told `admit_open`, `admit_closed` for each such failure.
    """

    def __init__(
        self,
        store: Store,
        lease_s: float,
        *,
        fail_open: bool = False,
        on_store_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self.lease_s = lease_s
        self.fail_open = fail_open
        self.on_store_failure = on_store_failure

    async def admit(self, caller: Caller, estimated_tokens: int, now: float) -> Admission:
        """Check and take every limit of `caller` for one request, or refuse it.

        Args:
            caller: who asks.
            estimated_tokens: prompt estimate plus the completion budget (`max_tokens`, or
                the configured reservation when the request has none).
            now: Unix time.

        Raises:
            GatewayError: 429 naming the limit, with Retry-After.
            StoreError: the store failed and the limiter fails closed.
        """
        try:
            return await self._admit(caller, estimated_tokens, now)
        except StoreError:
            outcome = "admit_open" if self.fail_open else "admit_closed"
            if self.on_store_failure is not None:
                self.on_store_failure(outcome)
            if not self.fail_open:
                raise
            return Admission(caller, day_of(now), unchecked=True)

    async def _admit(self, caller: Caller, estimated_tokens: int, now: float) -> Admission:
        limits = caller.limits
        store = self._store
        admission = Admission(caller, day_of(now))
        cid = caller.id
        if limits.daily_tokens is not None:
            # Reserve, then look: the add is atomic, so every admitted request's reservation
            # is inside the total that request saw, and the admitted ones never sum past
            # the budget. A request bigger than the whole budget may run on an unused one.
            budget = limits.daily_tokens
            want = float(min(max(estimated_tokens, 1), budget))
            key = f"tokens:{cid}:{admission.day}"
            total = await store.add(key, want, now, DAY_TTL_S)
            if total > budget:
                await store.add(key, -want, now, DAY_TTL_S)
                raise self._refuse(
                    f"key {caller.name!r} used its daily budget of {budget} tokens "
                    f"({total - want:.0f} used or reserved today, UTC; this request needs "
                    f"about {want:.0f})",
                    "daily_token_budget_exceeded",
                    _to_midnight(now),
                )
            admission.reserved_daily = want
        if limits.daily_cost_usd is not None:
            spent = await store.get(f"cost:{cid}:{admission.day}", now)
            if spent >= limits.daily_cost_usd:
                raise self._refuse(
                    f"key {caller.name!r} used its daily budget of ${limits.daily_cost_usd:g} "
                    f"(${spent:.4f} spent today, UTC)",
                    "daily_cost_budget_exceeded",
                    _to_midnight(now),
                )
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        buckets: list[Bucket] = []
        if rpm is not None:
            buckets.append(Bucket(limit_key("rpm", cid), rpm, rpm / 60.0, 1.0))
        cost = 0.0
        if tpm is not None:
            # A request bigger than the whole bucket still runs when the bucket is full.
            cost = float(min(max(estimated_tokens, 1), tpm))
            buckets.append(Bucket(limit_key("tpm", cid), tpm, tpm / 60.0, cost))
        streams = limits.concurrent_streams
        slot = None
        if streams is not None:
            slot = Slot(limit_key("slots", cid), uuid.uuid4().hex, streams, self.lease_s)
        if not buckets and slot is None:
            return admission
        # Both buckets and the slot in one store call (one round trip before the upstream
        # request), all or nothing; its levels are the answer's rate-limit headers.
        taken = await store.take_all(buckets, now, slot)
        if taken.refused is not None:
            # Nothing was taken; the daily reservation goes back.
            await self._undo(admission, now)
            if taken.refused == len(buckets):
                raise self._refuse(
                    f"key {caller.name!r} already has {streams} requests in flight "
                    "(its concurrency limit)",
                    "concurrency_limit_exceeded",
                    1.0,
                )
            if rpm is not None and taken.refused == 0:
                raise self._refuse(
                    f"key {caller.name!r} is over its limit of {rpm:g} requests per minute",
                    "requests_per_minute_exceeded",
                    taken.wait,
                )
            raise self._refuse(
                f"key {caller.name!r} is over its limit of {tpm:g} tokens per minute "
                f"(this request needs about {cost:.0f})",
                "tokens_per_minute_exceeded",
                taken.wait,
            )
        levels = iter(taken.levels)
        if rpm is not None:
            admission.requests_level = next(levels)
        if tpm is not None:
            admission.tokens_level = next(levels)
            admission.reserved_tokens = int(cost)
        if slot is not None:
            admission.lease = slot.lease
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

    async def _undo(self, admission: Admission, now: float) -> None:
        if admission.reserved_daily:
            key = f"tokens:{admission.caller.id}:{admission.day}"
            await self._store.add(key, -admission.reserved_daily, now, DAY_TTL_S)
            admission.reserved_daily = 0.0

    async def renew(self, admission: Admission, now: float) -> None:
        """Keep a long request's concurrency slot."""
        if admission.lease is not None:
            await self._store.renew_slot(
                limit_key("slots", admission.caller.id), admission.lease, now, self.lease_s
            )

    async def finish(
        self, admission: Admission, tokens: int | None, cost_usd: float, now: float
    ) -> None:
        """Release the slot and settle the reservations against what the request used.

        Each step is marked done on `admission` as it succeeds, so after a `StoreError`
        the same call can be made again (see `gateway.budget.Bookings`).

        Args:
            admission: from `admit`.
            tokens: billed tokens (all attempts), or None when unknown (nothing billed).
            cost_usd: billed cost.
            now: Unix time.

        Raises:
            StoreError: the store failed; the steps not yet done are still to do.
        """
        caller = admission.caller
        limits = caller.limits
        if admission.lease is not None:
            await self._store.release_slot(limit_key("slots", caller.id), admission.lease)
            admission.lease = None
        if admission.reserved_tokens:  # (only with a tokens-per-minute limit)
            tpm = limits.tokens_per_minute
            delta = admission.reserved_tokens - (tokens or 0)
            if tpm is not None and delta:
                key = limit_key("tpm", caller.id)
                await self._store.adjust(key, tpm, tpm / 60.0, float(delta), now)
            admission.reserved_tokens = 0
        if not admission.tokens_booked:
            if admission.reserved_daily or (tokens and limits.daily_tokens is not None):
                delta_daily = (tokens or 0) - admission.reserved_daily
                if delta_daily:
                    key = f"tokens:{caller.id}:{admission.day}"
                    await self._store.add(key, delta_daily, now, DAY_TTL_S)
            admission.reserved_daily = 0.0
            admission.tokens_booked = True
        if cost_usd and not admission.cost_booked and limits.daily_cost_usd is not None:
            await self._store.add(f"cost:{caller.id}:{admission.day}", cost_usd, now, DAY_TTL_S)
        admission.cost_booked = True
