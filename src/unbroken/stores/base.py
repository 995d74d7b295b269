"""The store Protocol: what the gateway's limits and key lookups need from state.

Time is always passed in (`now`, Unix seconds), so a store holds no clock of its own and
the memory and Redis stores can be driven through the same table of cases. Imports
settings only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from unbroken.settings import KeySettings

__all__ = ["Bucket", "Slot", "Store", "Taken"]


class Bucket(NamedTuple):
    """One bucket of a `Store.take_all`: take `cost` of bucket `key` (created full)."""

    key: str
    capacity: float
    refill_per_s: float
    cost: float


class Slot(NamedTuple):
    """The slot of a `Store.take_all`: hold one of `limit` slots of `key` under `lease` for
    `lease_s`, as `Store.acquire_slot`."""

    key: str
    lease: str
    limit: int
    lease_s: float


class Taken(NamedTuple):
    """What `Store.take_all` did.

    Attributes:
        refused: the index of the first bucket that could not give its cost, or
            `len(buckets)` when they could but the slot is all held (nothing was taken from
            any bucket, no slot is held), or None when every cost was taken.
        wait: that bucket's `take` wait (0.0 when none or the slot refused).
        levels: each bucket's tokens after the call (as `level` would read them then).
    """

    refused: int | None
    wait: float
    levels: tuple[float, ...]


class Store(Protocol):
    """State shared by the requests of one gateway (memory) or of many (Redis).

    Every method is atomic with respect to the others on the same key. Failures raise
    `unbroken.errors.StoreError`.
    """

    async def take(
        self, key: str, capacity: float, refill_per_s: float, cost: float, now: float
    ) -> float:
        """Take `cost` tokens from bucket `key` (created full), as `core.ratelimit.TokenBucket`.

        Returns:
            0.0 when taken; else the seconds until they will be there (nothing is taken),
            `math.inf` when `cost > capacity`.
        """

    async def take_all(
        self, buckets: Sequence[Bucket], now: float, slot: Slot | None = None
    ) -> Taken:
        """Take every bucket's cost and then the slot, or nothing: as `take` on each bucket
        in order and `acquire_slot`, except that when one refuses, nothing is taken from any
        bucket and no slot is held. One atomic operation (one round trip on Redis, where the
        keys must share a hash slot for Redis Cluster: tag them, e.g. `rpm:{id}` and
        `tpm:{id}`); the bucket keys are distinct."""

    async def adjust(
        self, key: str, capacity: float, refill_per_s: float, delta: float, now: float
    ) -> None:
        """Give back (`delta` > 0, capped at capacity) or take more (`delta` < 0, floored at
        0) tokens of bucket `key` after the fact."""

    async def acquire_slot(
        self, key: str, lease: str, limit: int, now: float, lease_s: float
    ) -> bool:
        """Hold one of `limit` slots of `key` under the id `lease` until `now + lease_s`
        (expired leases free their slot). Returns False when all slots are held."""

    async def renew_slot(self, key: str, lease: str, now: float, lease_s: float) -> None:
        """Extend a held lease to `now + lease_s`."""

    async def release_slot(self, key: str, lease: str) -> None:
        """Free the slot held by `lease` (no-op when it is not held)."""

    async def add(self, key: str, amount: float, now: float, ttl_s: float) -> float:
        """Add `amount` to counter `key` (created at 0, forgotten `ttl_s` after creation);
        returns the new total."""

    async def get(self, key: str, now: float) -> float:
        """The value of counter `key` (0 when absent or expired)."""

    async def level(self, key: str, capacity: float, refill_per_s: float, now: float) -> float:
        """The tokens in bucket `key` now (a full bucket when absent); changes nothing."""

    async def add_usage(self, day: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        """Add each amount to its field of the usage table of `day` (created empty,
        forgotten `ttl_s` after its last write)."""

    async def get_usage(self, day: str) -> dict[str, float]:
        """Every field of the usage table of `day` ({} when absent)."""

    async def list_keys(self) -> list[KeySettings]:
        """Every stored gateway key."""

    async def get_key(self, digest: str) -> KeySettings | None:
        """The gateway key stored under its SHA-256 `digest`, or None."""

    async def put_key(self, key: KeySettings) -> None:
        """Store (or replace) a gateway key under `key.sha256`."""

    async def delete_key(self, digest: str) -> None:
        """Forget a stored gateway key."""

    async def ping(self) -> bool:
        """True when the store answers (for `/readyz`)."""

    async def aclose(self) -> None:
        """Release connections."""
