"""RedisStore: the shared store for several gateway instances (redis.asyncio).

Each operation is one atomic Lua script on one key (`take_all`: on keys of one hash slot),
so it is safe under any number of instances and with Redis Cluster. The bucket scripts are
`core.ratelimit.TokenBucket` written again in Lua, on the same doubles, and
`tests/integration/test_stores.py` runs one table of cases against both stores. Numbers are
stored with `%.17g` so floats round-trip exactly. Imports redis (the `[redis]` extra), errors
and settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from unbroken.errors import ConfigError, StoreError
from unbroken.settings import KeySettings, LimitSettings
from unbroken.stores.base import Bucket, Slot, Taken

__all__ = ["RedisStore"]

T = TypeVar("T")

# Connections per process: enough for hundreds of concurrent requests (each holds one for
# one round trip), well under Redis's default maxclients of 10,000 across many instances.
POOL_CONNECTIONS = 128

# Lua 5.1 inside Redis: numbers are doubles, as in Python; `%.17g` prints them exactly.
_FMT = "local function fmt(x) return string.format('%.17g', x) end\n"

# KEYS[1] bucket hash {t: tokens, u: updated}; ARGV capacity, refill_per_s, cost, now.
_TAKE = (
    _FMT
    + """
local capacity, refill = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens, updated = capacity, now
if s[1] then tokens, updated = tonumber(s[1]), tonumber(s[2]) end
local elapsed = now - updated
if elapsed < 0 then elapsed = 0 end
local available = math.min(capacity, tokens + elapsed * refill)
local stamp = math.max(now, updated)
local wait = '0'
if cost <= available then
  available = available - cost
elseif cost > capacity then
  wait = 'inf'
else
  wait = fmt((cost - available) / refill)
end
redis.call('HSET', KEYS[1], 't', fmt(available), 'u', fmt(stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity / refill + 60) * 1000))
return wait
"""
)

# KEYS bucket hashes, then the slot zset when ARGV[2] = 1; ARGV now, with-slot, then
# capacity, refill_per_s, cost per bucket, then lease, limit, lease_s for the slot. Every
# bucket is refilled and checked, then the slot, and all are written only when none refuses
# (a refused call takes nothing). Returns {refused (1-based, 0 for none), wait, level per
# bucket} as strings: Lua numbers would come back truncated to integers.
_TAKE_ALL = (
    _FMT
    + """
local now, with_slot = tonumber(ARGV[1]), ARGV[2] == '1'
local n = #KEYS
if with_slot then n = n - 1 end
local levels, stamps = {}, {}
local refused, wait = 0, '0'
for i = 1, n do
  local capacity, refill = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  local s = redis.call('HMGET', KEYS[i], 't', 'u')
  local tokens, updated = capacity, now
  if s[1] then tokens, updated = tonumber(s[1]), tonumber(s[2]) end
  local elapsed = now - updated
  if elapsed < 0 then elapsed = 0 end
  local available = math.min(capacity, tokens + elapsed * refill)
  stamps[i] = math.max(now, updated)
  if refused == 0 and cost > available then
    refused = i
    if cost > capacity then wait = 'inf' else wait = fmt((cost - available) / refill) end
  end
  levels[i] = available
end
local slot, lease, lease_s = KEYS[n + 1], ARGV[3 * n + 3], tonumber(ARGV[3 * n + 5])
if refused == 0 and with_slot then
  redis.call('ZREMRANGEBYSCORE', slot, '-inf', fmt(now))
  if not redis.call('ZSCORE', slot, lease) and
     redis.call('ZCARD', slot) >= tonumber(ARGV[3 * n + 4]) then
    refused = n + 1
  end
end
local out = {tostring(refused), wait}
for i = 1, n do
  if refused == 0 then
    local capacity, refill = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
    levels[i] = levels[i] - tonumber(ARGV[3 * i + 2])
    redis.call('HSET', KEYS[i], 't', fmt(levels[i]), 'u', fmt(stamps[i]))
    redis.call('PEXPIRE', KEYS[i], math.ceil((capacity / refill + 60) * 1000))
  end
  out[i + 2] = fmt(levels[i])
end
if refused == 0 and with_slot then
  redis.call('ZADD', slot, fmt(now + lease_s), lease)
  redis.call('PEXPIRE', slot, math.ceil(lease_s * 1000) + 60000)
end
return out
"""
)

# KEYS[1] bucket hash; ARGV capacity, refill_per_s, delta, now.
_ADJUST = (
    _FMT
    + """
local capacity, refill = tonumber(ARGV[1]), tonumber(ARGV[2])
local delta, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens, updated = capacity, now
if s[1] then tokens, updated = tonumber(s[1]), tonumber(s[2]) end
local elapsed = now - updated
if elapsed < 0 then elapsed = 0 end
local level = math.min(capacity, tokens + elapsed * refill)
if delta >= 0 then
  level = math.min(capacity, level + delta)
else
  level = math.max(0, level - (-delta))
end
redis.call('HSET', KEYS[1], 't', fmt(level), 'u', fmt(math.max(now, updated)))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity / refill + 60) * 1000))
return 1
"""
)

# KEYS[1] zset lease -> expiry; ARGV lease, limit, now, lease_s.
_ACQUIRE = (
    _FMT
    + """
local now, lease_s = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and
   redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], fmt(now + lease_s), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease_s * 1000) + 60000)
return 1
"""
)

# KEYS[1] zset; ARGV lease, now, lease_s.
_RENEW = (
    _FMT
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local expires = tonumber(ARGV[2]) + tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], fmt(expires), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 60000)
end
return 1
"""
)

# KEYS[1] counter hash {v: value, e: expires}; ARGV amount, now, ttl_s.
_ADD = (
    _FMT
    + """
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'v', 'e')
local value, expires = 0, now + ttl
if s[1] and tonumber(s[2]) > now then value, expires = tonumber(s[1]), tonumber(s[2]) end
value = value + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'v', fmt(value), 'e', fmt(expires))
redis.call('PEXPIRE', KEYS[1], math.ceil((expires - now) * 1000) + 60000)
return fmt(value)
"""
)


def _key_to_json(key: KeySettings) -> str:
    limits = {name: getattr(key.limits, name) for name in LimitSettings.__dataclass_fields__}
    return json.dumps(
        {
            "name": key.name,
            "sha256": key.sha256,
            "limits": limits,
            "models": None if key.models is None else list(key.models),
            "role": key.role,
        }
    )


def _key_from_json(raw: str) -> KeySettings:
    data = json.loads(raw)
    models = data.get("models")
    return KeySettings(
        name=str(data["name"]),
        sha256=str(data["sha256"]),
        limits=LimitSettings(**data.get("limits") or {}),
        models=None if models is None else tuple(models),
        role=str(data.get("role", "user")),
    )


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        # Redis messages name host and port at most, never the URL's password.
        raise StoreError(
            f"redis store failed to {what}: {type(exc).__name__}: {exc}"[:300]
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"redis store holds a malformed value ({what}): {exc}"[:300]) from exc


class RedisStore:
    """The `Store` on Redis: one atomic Lua script per operation.

    Args:
        client: a `redis.asyncio.Redis` with `decode_responses=True`.
        prefix: the namespace of every key this store writes.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "unbroken:") -> None:
        self._redis = client
        self._prefix = prefix
        self._take = client.register_script(_TAKE)
        self._take_all = client.register_script(_TAKE_ALL)
        self._adjust = client.register_script(_ADJUST)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._add = client.register_script(_ADD)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"

    @classmethod
    def from_url(cls, url: str, prefix: str = "unbroken:") -> RedisStore:
        """A store on the Redis at `url` (`redis://host:port/db`, `rediss://`, `unix://`).

        Raises:
            ConfigError: the URL is malformed.
        """
        try:
            # Bounded waits: a dead Redis must fail a request (503) and /readyz, not hang them.
            # A blocking pool: past its size a command waits for a free connection instead
            # of failing ("Too many connections") under a burst of concurrent requests.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                max_connections=POOL_CONNECTIONS,
                timeout=5.0,
            )
            client = aioredis.Redis.from_pool(pool)
        except ValueError as exc:
            raise ConfigError(f"gateway store: malformed Redis URL ({exc})") from None
        return cls(client, prefix)

    async def _run(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        with _translated(what):
            return await call()

    async def take(
        self, key: str, capacity: float, refill_per_s: float, cost: float, now: float
    ) -> float:
        """See `Store.take`."""
        args = [repr(float(capacity)), repr(float(refill_per_s)), repr(float(cost)), repr(now)]
        raw: Any = await self._run(
            "take from a bucket",
            lambda: self._take(keys=[f"{self._prefix}bucket:{key}"], args=args),
        )
        return math.inf if raw == "inf" else float(raw)

    async def take_all(
        self, buckets: Sequence[Bucket], now: float, slot: Slot | None = None
    ) -> Taken:
        """See `Store.take_all`: one script over the buckets and the slot."""
        keys = [f"{self._prefix}bucket:{b.key}" for b in buckets]
        args = [repr(now), "0" if slot is None else "1"]
        for b in buckets:
            args += [repr(float(b.capacity)), repr(float(b.refill_per_s)), repr(float(b.cost))]
        if slot is not None:
            keys.append(f"{self._prefix}slots:{slot.key}")
            args += [slot.lease, str(int(slot.limit)), repr(float(slot.lease_s))]
        raw: Any = await self._run(
            "take from buckets", lambda: self._take_all(keys=keys, args=args)
        )
        with _translated("take from buckets"):
            refused = int(raw[0])
            wait = math.inf if raw[1] == "inf" else float(raw[1])
            return Taken(refused - 1 if refused else None, wait, tuple(map(float, raw[2:])))

    async def adjust(
        self, key: str, capacity: float, refill_per_s: float, delta: float, now: float
    ) -> None:
        """See `Store.adjust`."""
        args = [repr(float(capacity)), repr(float(refill_per_s)), repr(float(delta)), repr(now)]
        await self._run(
            "adjust a bucket",
            lambda: self._adjust(keys=[f"{self._prefix}bucket:{key}"], args=args),
        )

    async def acquire_slot(
        self, key: str, lease: str, limit: int, now: float, lease_s: float
    ) -> bool:
        """See `Store.acquire_slot`."""
        args = [lease, str(int(limit)), repr(now), repr(float(lease_s))]
        raw: Any = await self._run(
            "acquire a slot",
            lambda: self._acquire(keys=[f"{self._prefix}slots:{key}"], args=args),
        )
        return bool(int(raw))

    async def renew_slot(self, key: str, lease: str, now: float, lease_s: float) -> None:
        """See `Store.renew_slot`."""
        args = [lease, repr(now), repr(float(lease_s))]
        await self._run(
            "renew a slot", lambda: self._renew(keys=[f"{self._prefix}slots:{key}"], args=args)
        )

    async def release_slot(self, key: str, lease: str) -> None:
        """See `Store.release_slot`."""
        await self._run(
            "release a slot", lambda: self._redis.zrem(f"{self._prefix}slots:{key}", lease)
        )

    async def add(self, key: str, amount: float, now: float, ttl_s: float) -> float:
        """See `Store.add`."""
        args = [repr(float(amount)), repr(now), repr(float(ttl_s))]
        raw: Any = await self._run(
            "add to a counter",
            lambda: self._add(keys=[f"{self._prefix}counter:{key}"], args=args),
        )
        return float(raw)

    async def get(self, key: str, now: float) -> float:
        """See `Store.get`."""
        raw: Any = await self._run(
            "read a counter",
            lambda: self._redis.hmget(f"{self._prefix}counter:{key}", ["v", "e"]),
        )
        value, expires = raw
        if value is None or expires is None or float(expires) <= now:
            return 0.0
        return float(value)

    async def level(self, key: str, capacity: float, refill_per_s: float, now: float) -> float:
        """See `Store.level` (the take script's refill, read-only)."""
        raw: Any = await self._run(
            "read a bucket",
            lambda: self._redis.hmget(f"{self._prefix}bucket:{key}", ["t", "u"]),
        )
        tokens, updated = raw
        if tokens is None or updated is None:
            return float(capacity)
        elapsed = max(0.0, now - float(updated))
        return min(float(capacity), float(tokens) + elapsed * refill_per_s)

    async def add_usage(self, day: str, amounts: Mapping[str, float], ttl_s: float) -> None:
        """See `Store.add_usage`: HINCRBYFLOAT per field in one transaction."""
        name = f"{self._prefix}usage:{day}"

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for field, amount in amounts.items():
                    pipe.hincrbyfloat(name, field, amount)
                pipe.pexpire(name, math.ceil(ttl_s * 1000))
                await pipe.execute()

        await self._run("add usage", write)

    async def get_usage(self, day: str) -> dict[str, float]:
        """See `Store.get_usage`."""
        raw: Any = await self._run(
            "read usage", lambda: self._redis.hgetall(f"{self._prefix}usage:{day}")
        )
        with _translated("read usage"):
            return {str(k): float(v) for k, v in raw.items()}

    async def list_keys(self) -> list[KeySettings]:
        """See `Store.list_keys` (SCAN, so Redis is never blocked by a long listing)."""

        async def scan() -> list[str]:
            return [k async for k in self._redis.scan_iter(match=f"{self._prefix}key:*")]

        names = await self._run("list keys", scan)
        if not names:
            return []
        raws: Any = await self._run("list keys", lambda: self._redis.mget(names))
        with _translated("list keys"):
            return [_key_from_json(raw) for raw in raws if raw is not None]

    async def get_key(self, digest: str) -> KeySettings | None:
        """See `Store.get_key`."""
        raw: Any = await self._run(
            "read a key", lambda: self._redis.get(f"{self._prefix}key:{digest}")
        )
        if raw is None:
            return None
        with _translated("read a key"):
            return _key_from_json(raw)

    async def put_key(self, key: KeySettings) -> None:
        """See `Store.put_key`."""
        await self._run(
            "store a key",
            lambda: self._redis.set(f"{self._prefix}key:{key.sha256}", _key_to_json(key)),
        )

    async def delete_key(self, digest: str) -> None:
        """See `Store.delete_key`."""
        await self._run("delete a key", lambda: self._redis.delete(f"{self._prefix}key:{digest}"))

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
