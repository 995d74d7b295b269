"""MemoryStore: the embedded store (the default, and the reference for RedisStore).

Single event loop, no awaits inside a method, so every method is atomic. Bucket math is
`core.ratelimit.TokenBucket` itself. Imports core, settings and the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import add

from unbroken.core.ratelimit import BucketState, TokenBucket
from unbroken.settings import KeySettings
from unbroken.stores.base import Bucket, Slot, Taken

__all__ = ["MemoryStore"]


class MemoryStore:
    """In-process state: dicts of buckets, leases, counters and keys (see `Store`)."""

    def __init__(self) -> None:
        self._buckets: dict[str, BucketState] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._counters: dict[str, tuple[float, float]] = {}
        self._keys: dict[str, KeySettings] = {}
        self._usage: dict[str, dict[str, float]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(buckets={len(self._buckets)}, keys={len(self._keys)})"

    async def take(
        self, key: str, capacity: float, refill_per_s: float, cost: float, now: float
    ) -> float:
        """See `Store.take`."""
        bucket = TokenBucket(capacity, refill_per_s)
        state = self._buckets.get(key) or bucket.initial(now)
        new, wait = bucket.take(state, cost, now)
        self._buckets[key] = new
        return wait

    async def take_all(
        self, buckets: Sequence[Bucket], now: float, slot: Slot | None = None
    ) -> Taken:
        """See `Store.take_all`."""
        taken: list[tuple[str, BucketState]] = []
        refused: int | None = None
        wait = 0.0
        for index, (key, capacity, refill_per_s, cost) in enumerate(buckets):
            bucket = TokenBucket(capacity, refill_per_s)
            new, wait = bucket.take(self._buckets.get(key) or bucket.initial(now), cost, now)
            if wait > 0:
                refused = index
                break
            taken.append((key, new))
        # No await inside `acquire_slot`: the slot and the buckets are taken atomically.
        if (
            refused is None
            and slot is not None
            and not await self.acquire_slot(slot.key, slot.lease, slot.limit, now, slot.lease_s)
        ):
            refused = len(buckets)
        if refused is not None:
            levels = [
                TokenBucket(b.capacity, b.refill_per_s).level(
                    self._buckets.get(b.key) or BucketState(b.capacity, now), now
                )
                for b in buckets
            ]
            return Taken(refused, wait, tuple(levels))
        self._buckets.update(taken)
        return Taken(None, 0.0, tuple(state.tokens for _, state in taken))

    async def adjust(
        self, key: str, capacity: float, refill_per_s: float, delta: float, now: float
    ) -> None:
        """See `Store.adjust`."""
        bucket = TokenBucket(capacity, refill_per_s)
        state = self._buckets.get(key) or bucket.initial(now)
        if delta >= 0:
            self._buckets[key] = bucket.refund(state, delta, now)
        else:
            self._buckets[key] = bucket.charge(state, -delta, now)

    async def acquire_slot(
        self, key: str, lease: str, limit: int, now: float, lease_s: float
    ) -> bool:
        """See `Store.acquire_slot`."""
        leases = self._slots.setdefault(key, {})
        for held, expires in list(leases.items()):
            if expires <= now:
                del leases[held]
        if lease not in leases and len(leases) >= limit:
            return False
        leases[lease] = now + lease_s
        return True

    async def renew_slot(self, key: str, lease: str, now: float, lease_s: float) -> None:
        """See `Store.renew_slot`."""
        leases = self._slots.get(key)
        if leases is not None and lease in leases:
            leases[lease] = now + lease_s

    async def release_slot(self, key: str, lease: str) -> None:
        """See `Store.release_slot`."""
        leases = self._slots.get(key)
        if leases is not None:
            leases.pop(lease, None)
            if not leases:
                del self._slots[key]

    async def add(self, key: str, amount: float, now: float, ttl_s: float) -> float:
        """See `Store.add`."""
        value, expires = self._counters.get(key, (0.0, now + ttl_s))
        if expires <= now:
            value, expires = 0.0, now + ttl_s
        value += amount
        self._counters[key] = (value, expires)
        return value

    async def get(self, key: str, now: float) -> float:
        """See `Store.get`."""
        value, expires = self._counters.get(key, (0.0, 0.0))
        return value if expires > now else 0.0

    async def level(self, key: str, capacity: float, refill_per_s: float, now: float) -> float:
        """See `Store.level`."""
        bucket = TokenBucket(capacity, refill_per_s)
        return bucket.level(self._buckets.get(key) or bucket.initial(now), now)

    async def add_usage(self, day: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        """See `Store.add_usage` (the memory store keeps every day until it stops)."""
        table = self._usage.get(day)
        if table is None:
            table = self._usage[day] = {}
        # Each field's sum, old + amount, made and stored in C (every answer books five
        # fields: a loop of them was ~80 bytecodes an answer). Each name comes once, and
        # its old value is read before it is stored.
        sums = map(add, map(table.get, amounts, repeat(0.0)), amounts.values())
        table.update(zip(amounts, sums, strict=True))

    async def get_usage(self, day: str) -> dict[str, float]:
        """See `Store.get_usage`."""
        return dict(self._usage.get(day, {}))

    async def list_keys(self) -> list[KeySettings]:
        """See `Store.list_keys`."""
        return list(self._keys.values())

    async def get_key(self, digest: str) -> KeySettings | None:
        """See `Store.get_key`."""
        return self._keys.get(digest)

    async def put_key(self, key: KeySettings) -> None:
        """See `Store.put_key`."""
        self._keys[key.sha256] = key

    async def delete_key(self, digest: str) -> None:
        """See `Store.delete_key`."""
        self._keys.pop(digest, None)

    async def ping(self) -> bool:
        """Always True: memory is always there."""
        return True

    async def aclose(self) -> None:
        """Nothing to release."""
