"""What the Redis stream log costs Redis: an append in the middle of an answer runs four
commands (no read of the store-wide total before it is added to), a log the store-wide
bound refuses leaves the total as it was, and lease renewals move Redis' expiry of an
answer's keys on every `KEEP_REFRESH_S` seconds, not at every renewal."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from unbroken.core.streamlog import Retention
from unbroken.stores.redis_streamlog import KEEP_REFRESH_S, RedisStreamLog
from unbroken.stores.streamlog import LogFullError

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

PREFIX = "test-calls:"


@pytest.fixture
async def log(redis_url: str) -> AsyncIterator[RedisStreamLog]:
    retention = Retention(ttl_s=100, max_stream_bytes=1024, max_total_bytes=2000)
    redis_log = RedisStreamLog.from_url(redis_url, retention, prefix=PREFIX)
    await redis_log._redis.flushdb()
    yield redis_log
    await redis_log.aclose()


async def commands(log: RedisStreamLog) -> dict[str, int]:
    stats = await log._redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def create(log: RedisStreamLog, stream_id: str) -> None:
    await log.create(
        stream_id, caller="k", request=b"{}", resumable=True, owner="A", now=0.0, lease_s=30
    )


async def test_an_append_mid_answer_runs_four_commands(log: RedisStreamLog) -> None:
    await create(log, "s1")
    await log.append("s1", 1, [b"first"], 1.0, end=False)
    await log._redis.config_resetstat()
    await log.append("s1", 1, [b"second"], 2.0, end=False)
    calls = await commands(log)
    calls.pop("config|resetstat", None)
    calls.pop("info", None)
    assert calls == {"evalsha": 1, "hmget": 1, "incrby": 1, "xadd": 1, "hset": 1}


async def test_a_refused_append_leaves_the_store_wide_total(log: RedisStreamLog) -> None:
    """Two live answers (neither may be evicted): the second's append past the store-wide
    bound is refused, and the total counts only what is logged."""
    total = f"{PREFIX}streams:bytes"
    await create(log, "s1")
    await create(log, "s2")
    await log.append("s1", 1, [b"x" * 1000], 1.0, end=False)
    with pytest.raises(LogFullError, match="stream logs are full"):
        await log.append("s2", 1, [b"y" * 1001], 2.0, end=False)
    assert await log._redis.get(total) == b"1000"
    assert await log.append("s2", 1, [b"z" * 900], 3.0, end=False) == 1
    assert await log._redis.get(total) == b"1900"


async def test_renewals_move_redis_expiry_on_every_refresh_interval(log: RedisStreamLog) -> None:
    await create(log, "s1")
    await log.append("s1", 1, [b"a"], 1.0, end=False)
    keys = [f"{PREFIX}s:s1", f"{PREFIX}s:s1:log", f"{PREFIX}s:s1:req"]
    keep_ms = log._keep_ms()

    async def ttls() -> list[int]:
        return [int(await log._redis.pttl(key)) for key in keys]

    assert (await log.renew_many("A", [("s1", 1)], 2.0, 30))[0] is not None
    for key in keys:
        await log._redis.pexpire(key, 50_000)  # as if set a while ago
    # Within the interval since the create set them: renewed, the expiries stay.
    assert (await log.renew_many("A", [("s1", 1)], KEEP_REFRESH_S - 1.0, 30))[0] is not None
    assert all(ttl <= 50_000 for ttl in await ttls())
    # Past it: moved on, the whole keep time again.
    assert (await log.renew_many("A", [("s1", 1)], KEEP_REFRESH_S + 1.0, 30))[0] is not None
    assert all(keep_ms - 5_000 < ttl <= keep_ms for ttl in await ttls())
    for key in keys:
        await log._redis.pexpire(key, 50_000)
    assert (await log.renew_many("A", [("s1", 1)], KEEP_REFRESH_S + 2.0, 30))[0] is not None
    assert all(ttl <= 50_000 for ttl in await ttls())
