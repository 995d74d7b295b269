"""The memory and Redis stores behave the same: one table of cases runs against both (the
Redis one on a real redis-server started on a free loopback port), and the bucket cases
also match core.ratelimit.TokenBucket, whose math the Redis Lua script repeats."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import free_port
from unbroken.core.ratelimit import TokenBucket
from unbroken.errors import StoreError
from unbroken.gateway.keys import Caller
from unbroken.gateway.limits import Limiter
from unbroken.gateway.problems import GatewayError
from unbroken.settings import KeySettings, LimitSettings, hash_key
from unbroken.stores import MemoryStore, Store, open_store
from unbroken.stores.base import Bucket, Slot, Taken

pytestmark = pytest.mark.integration


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each store kind, empty."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    redis_store = open_store(url)
    from unbroken.stores.redis import RedisStore

    assert isinstance(redis_store, RedisStore)
    await redis_store._redis.flushdb()
    yield redis_store
    await redis_store.aclose()


# (operations, expected results): each op is (method, args...). Times are explicit, so the
# cases are exact; `inf` stands for math.inf.
CASES: list[tuple[str, list[tuple[Any, ...]], list[Any]]] = [
    (
        "bucket starts full and drains",
        [
            ("take", "b", 3, 1, 1, 100.0),
            ("take", "b", 3, 1, 2, 100.0),
            ("take", "b", 3, 1, 1, 100.0),
        ],
        [0.0, 0.0, 1.0],
    ),
    (
        "bucket refills with time and caps at capacity",
        [
            ("take", "b", 2, 0.5, 2, 0.0),
            ("take", "b", 2, 0.5, 1, 1.0),
            ("take", "b", 2, 0.5, 2, 100.0),
        ],
        [0.0, 1.0, 0.0],
    ),
    (
        "cost above capacity never fits",
        [("take", "b", 5, 1, 6, 10.0), ("take", "b", 5, 1, 5, 10.0)],
        ["inf", 0.0],
    ),
    (
        "fractional refill is exact",
        [
            ("take", "b", 10, 1 / 6, 10, 0.0),
            ("take", "b", 10, 1 / 6, 1, 3.0),
            ("take", "b", 10, 1 / 6, 1, 6.0),
        ],
        [0.0, 3.0, 0.0],
    ),
    (
        "time going backwards does not mint tokens",
        [("take", "b", 2, 1, 2, 50.0), ("take", "b", 2, 1, 1, 40.0)],
        [0.0, 1.0],
    ),
    (
        "refund caps at capacity; charge floors at zero",
        [
            ("take", "b", 4, 1, 4, 0.0),
            ("adjust", "b", 4, 1, 10.0, 0.0),
            ("take", "b", 4, 1, 4, 0.0),
            ("adjust", "b", 4, 1, -10.0, 0.0),
            ("take", "b", 4, 1, 1, 0.0),
        ],
        [0.0, None, 0.0, None, 1.0],
    ),
    (
        "slots: a limit of 2 holds two leases",
        [
            ("acquire_slot", "s", "a", 2, 0.0, 60.0),
            ("acquire_slot", "s", "b", 2, 0.0, 60.0),
            ("acquire_slot", "s", "c", 2, 1.0, 60.0),
            ("release_slot", "s", "a"),
            ("acquire_slot", "s", "c", 2, 2.0, 60.0),
        ],
        [True, True, False, None, True],
    ),
    (
        "slots: re-acquiring a held lease succeeds; expired leases free their slot",
        [
            ("acquire_slot", "s", "a", 1, 0.0, 10.0),
            ("acquire_slot", "s", "a", 1, 1.0, 10.0),
            ("acquire_slot", "s", "b", 1, 5.0, 10.0),
            ("acquire_slot", "s", "b", 1, 11.0, 10.0),
        ],
        [True, True, False, True],
    ),
    (
        "slots: renewal keeps a lease alive",
        [
            ("acquire_slot", "s", "a", 1, 0.0, 10.0),
            ("renew_slot", "s", "a", 9.0, 10.0),
            ("acquire_slot", "s", "b", 1, 15.0, 10.0),
            ("acquire_slot", "s", "b", 1, 19.5, 10.0),
            ("renew_slot", "s", "zz", 19.5, 10.0),
        ],
        [True, None, False, True, None],
    ),
    (
        "counters add, read and expire",
        [
            ("add", "c", 5.0, 0.0, 100.0),
            ("add", "c", 0.25, 10.0, 100.0),
            ("get", "c", 50.0),
            ("get", "c", 100.0),
            ("add", "c", 1.0, 150.0, 100.0),
            ("get", "missing", 0.0),
        ],
        [5.0, 5.25, 5.25, 0.0, 1.0, 0.0],
    ),
    (
        "take_all takes every cost and returns the levels after",
        [("take_all", [Bucket("r", 3, 1, 1), Bucket("t", 10, 1, 4)], 0.0)],
        [Taken(None, 0.0, (2.0, 6.0))],
    ),
    (
        "take_all: a refusing second bucket takes nothing from the first",
        [
            ("take", "t", 10, 1, 8, 0.0),
            ("take_all", [Bucket("r", 3, 1, 1), Bucket("t", 10, 1, 4)], 0.0),
            ("level", "r", 3, 1, 0.0),
            ("take_all", [Bucket("r", 3, 1, 1), Bucket("t", 10, 1, 4)], 2.0),
        ],
        [0.0, Taken(1, 2.0, (3.0, 2.0)), 3.0, Taken(None, 0.0, (2.0, 0.0))],
    ),
    (
        "take_all: the first refusing bucket is named, the others keep their tokens",
        [
            ("take_all", [Bucket("r", 1, 0.5, 1), Bucket("t", 10, 1, 4)], 0.0),
            ("take_all", [Bucket("r", 1, 0.5, 1), Bucket("t", 10, 1, 4)], 1.0),
            ("level", "t", 10, 1, 1.0),
            ("take_all", [Bucket("r", 1, 0.5, 1), Bucket("t", 10, 1, 20)], 2.0),
            ("level", "r", 1, 0.5, 2.0),
        ],
        [
            Taken(None, 0.0, (0.0, 6.0)),
            Taken(0, 1.0, (0.5, 7.0)),
            7.0,
            Taken(1, math.inf, (1.0, 8.0)),
            1.0,
        ],
    ),
    (
        "take_all with a slot: a held-out slot takes nothing; a free or own one is held",
        [
            ("acquire_slot", "s", "a", 1, 0.0, 10.0),
            ("take_all", [Bucket("r", 3, 1, 1)], 1.0, Slot("s", "b", 1, 10.0)),
            ("level", "r", 3, 1, 1.0),
            ("take_all", [Bucket("r", 3, 1, 1)], 1.0, Slot("s", "a", 1, 10.0)),
            ("take_all", [], 11.5, Slot("s", "b", 1, 10.0)),
            ("acquire_slot", "s", "c", 1, 12.0, 10.0),
            ("take_all", [Bucket("r", 3, 1, 5)], 12.0, Slot("s", "d", 1, 10.0)),
        ],
        [
            True,
            Taken(1, 0.0, (3.0,)),
            3.0,
            Taken(None, 0.0, (2.0,)),
            Taken(None, 0.0, ()),
            False,
            Taken(0, math.inf, (3.0,)),
        ],
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "ops", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_store_case(
    store: Store, name: str, ops: list[tuple[Any, ...]], expected: list[Any]
) -> None:
    """Both stores give the same result for every operation of the case."""
    results = []
    for method, *args in ops:
        result = await getattr(store, method)(*args)
        results.append("inf" if result == math.inf else result)
    assert results == expected


@pytest.mark.parametrize(
    ("name", "ops", "expected"), [c for c in CASES if c[1][0][0] == "take"][:5]
)
def test_bucket_cases_match_the_core(
    name: str, ops: list[tuple[Any, ...]], expected: list[Any]
) -> None:
    """The bucket cases are core.ratelimit's math, so the Lua script is checked against it."""
    state = None
    results = []
    for _, _key, capacity, refill, cost, now in ops:
        bucket = TokenBucket(capacity, refill)
        state = state or bucket.initial(now)
        state, wait = bucket.take(state, cost, now)
        results.append("inf" if wait == math.inf else wait)
    assert results == expected


@pytest.mark.anyio
async def test_keys_round_trip(store: Store) -> None:
    """A stored key comes back equal; deleting it forgets it."""
    key = KeySettings(
        "team-a",
        hash_key("sk-gw-a"),
        LimitSettings(requests_per_minute=5, daily_cost_usd=1.5),
        ("deepseek-chat",),
    )
    assert await store.get_key(key.sha256) is None
    await store.put_key(key)
    assert await store.get_key(key.sha256) == key
    await store.delete_key(key.sha256)
    assert await store.get_key(key.sha256) is None
    assert await store.ping()


@pytest.mark.anyio
async def test_redis_failure_is_a_store_error() -> None:
    """An unreachable Redis raises StoreError (never a redis exception) and fails ping."""
    unreachable = open_store(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError):
        await unreachable.take("b", 1, 1, 1, 0.0)
    assert not await unreachable.ping()
    await unreachable.aclose()


@pytest.mark.anyio
async def test_rate_limits_are_taken_in_one_redis_round_trip(redis_url: str) -> None:
    """Admitting a request under requests- and tokens-per-minute and concurrency limits is
    one script call on Redis (it was one per bucket and one for the slot), and its levels
    need no read after it."""
    from unbroken.stores.redis import RedisStore

    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    await store._redis.flushdb()
    limits = LimitSettings(requests_per_minute=10, tokens_per_minute=1000, concurrent_streams=2)
    caller = Caller("k:rt", "rt", limits)
    await store._redis.config_resetstat()
    admission = await Limiter(store, 60.0).admit(caller, 100, 1000.0)
    stats = await store._redis.info("commandstats")
    await store.aclose()
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert (admission.requests_level, admission.tokens_level) == (9.0, 900.0)
    assert admission.lease is not None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("limits", "code"),
    [
        (LimitSettings(requests_per_minute=1), "requests_per_minute_exceeded"),
        (LimitSettings(tokens_per_minute=150), "tokens_per_minute_exceeded"),
        (LimitSettings(concurrent_streams=1), "concurrency_limit_exceeded"),
    ],
    ids=["rpm", "tpm", "concurrency"],
)
async def test_a_refused_request_holds_nothing(
    store: Store, limits: LimitSettings, code: str
) -> None:
    """A request refused by any of the rate or concurrency limits takes nothing: not from
    the buckets, not a slot, not its daily token reservation."""
    limits = LimitSettings(
        requests_per_minute=limits.requests_per_minute or 100,
        tokens_per_minute=limits.tokens_per_minute or 10_000,
        concurrent_streams=limits.concurrent_streams or 10,
        daily_tokens=1000,
    )
    caller = Caller("k:refused", "refused", limits)
    limiter = Limiter(store, 60.0)
    first = await limiter.admit(caller, 100, 1000.0)
    with pytest.raises(GatewayError) as refused:
        await limiter.admit(caller, 100, 1000.0)
    assert refused.value.code == code
    assert await store.get(f"tokens:k:refused:{first.day}", 1000.0) == 100.0
    rpm = limits.requests_per_minute or 0
    assert await store.level("rpm:{k:refused}", rpm, rpm / 60.0, 1000.0) == rpm - 1
    tpm = limits.tokens_per_minute or 0
    assert await store.level("tpm:{k:refused}", tpm, tpm / 60.0, 1000.0) == tpm - 100
