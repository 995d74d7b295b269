"""The Redis stream log sends the writes of many answers made in one event-loop turn as one
pipeline: each call still gets its own reply or error, scripts Redis lost are loaded again,
and a failed connection fails every call of its batch (as a StoreError)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from tests.support import free_port
from unbroken.core.streamlog import Retention
from unbroken.errors import StoreError
from unbroken.stores.redis_streamlog import RedisStreamLog
from unbroken.stores.streamlog import UnknownStreamError

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

RETENTION = Retention(ttl_s=100, max_stream_bytes=1 << 20, max_total_bytes=1 << 24)
N = 200


def sid(i: int) -> str:
    return f"strm_{i:032d}"


@pytest.fixture
async def log(redis_url: str) -> AsyncIterator[RedisStreamLog]:
    redis_log = RedisStreamLog.from_url(redis_url, RETENTION, prefix="test-coalesce:")
    await redis_log._redis.flushdb()
    yield redis_log
    await redis_log.aclose()


async def turns_until(condition: Callable[[], bool]) -> None:
    """Let the event loop turn until `condition` holds (a few turns at most)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition did not come true")


async def connected_clients(log: RedisStreamLog) -> int:
    info = await log._redis.info("clients")
    return int(info["connected_clients"])


async def test_concurrent_appends_share_one_pipeline(log: RedisStreamLog) -> None:
    """N answers appending in the same turn: every append lands in its own stream, over
    one connection (one per call would open N)."""
    before = await connected_clients(log)
    await asyncio.gather(
        *(
            log.create(
                sid(i), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
            )
            for i in range(N)
        )
    )
    first = await asyncio.gather(
        *(log.append(sid(i), 1, [b"a%d" % i], 1.0, end=False) for i in range(N))
    )
    second = await asyncio.gather(
        *(log.append(sid(i), 1, [b"b", b"c"], 2.0, end=i % 2 == 0) for i in range(N))
    )
    assert first == [1] * N
    assert second == [3] * N
    assert await connected_clients(log) - before <= 2
    batch = await log.read(sid(7), 0, limit=10, max_bytes=1000)
    assert batch.events == [(1, b"a7"), (2, b"b"), (3, b"c")]
    assert not batch.ended
    assert (await log.read(sid(8), 0, limit=10, max_bytes=1000)).ended


async def test_each_call_gets_its_own_reply_or_error(log: RedisStreamLog) -> None:
    """In one batch: a good append, one to a stream that does not exist, and one whose key
    holds the wrong type (a Redis error): only the last two fail, each with its own error."""
    await log.create(
        sid(1), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
    )
    await log._redis.set(f"test-coalesce:s:{sid(3)}", b"not a hash")
    results = await asyncio.gather(
        log.append(sid(1), 1, [b"x"], 1.0, end=False),
        log.append(sid(2), 1, [b"x"], 1.0, end=False),
        log.append(sid(3), 1, [b"x"], 1.0, end=False),
        return_exceptions=True,
    )
    assert results[0] == 1
    assert isinstance(results[1], UnknownStreamError)
    assert isinstance(results[2], StoreError)
    assert "WRONGTYPE" in str(results[2])


async def test_scripts_redis_lost_are_loaded_again(log: RedisStreamLog) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) a batch of writes still succeeds."""
    await log.create(
        sid(1), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
    )
    await log._redis.script_flush()
    lease_info, n = await asyncio.gather(
        log.renew(sid(1), "A", 1, 1.0, 3.0),
        log.append(sid(1), 1, [b"x", b"y"], 1.0, end=False),
    )
    assert lease_info is not None
    assert n == 2
    await log._redis.script_flush()
    await log.release(sid(1), "A", 1)
    info = await log.info(sid(1))
    assert info is not None
    assert info.lease is not None
    assert info.lease.expires_at == 0


async def test_a_dead_redis_fails_every_call_of_the_batch() -> None:
    """No Redis behind the URL: every coalesced call raises a StoreError."""
    dead = RedisStreamLog.from_url(f"redis://127.0.0.1:{free_port()}/0", RETENTION)
    try:
        results = await asyncio.gather(
            *(dead.append(sid(i), 1, [b"x"], 1.0, end=False) for i in range(5)),
            return_exceptions=True,
        )
    finally:
        await dead.aclose()
    assert all(isinstance(r, StoreError) for r in results), results


async def test_a_redis_that_stops_answering_fails_the_batch_in_the_socket_timeout(
    redis_url: str,
) -> None:
    """The writes' connection has no socket timeout of its own (see `_Coalescer`): one
    bound per batch, the client's socket timeout, fails the calls of a Redis that does not
    answer, and once it answers again the next call goes through on a new connection."""
    client = aioredis.from_url(redis_url, socket_timeout=0.3)
    slow = RedisStreamLog(client, RETENTION, prefix="test-coalesce-timeout:")
    control = aioredis.from_url(redis_url)
    try:
        await slow.create(
            sid(1), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
        )
        await control.client_pause(20_000, all=False)
        try:
            async with asyncio.timeout(5):  # without the bound: never
                results = await asyncio.gather(
                    slow.append(sid(1), 1, [b"x"], 1.0, end=False),
                    slow.append(sid(1), 1, [b"y"], 1.0, end=False),
                    return_exceptions=True,
                )
        finally:
            await control.client_unpause()
        assert all(isinstance(r, StoreError) for r in results), results
        assert all("Timeout" in str(r) for r in results), results
        # The paused calls' connection was closed: Redis never ran them.
        n = await slow.append(sid(1), 1, [b"z"], 2.0, end=False)
        batch = await slow.read(sid(1), 0, limit=10, max_bytes=1000)
        assert n == 1
        assert batch.events == [(1, b"z")]
    finally:
        await slow.aclose()
        await control.aclose()


async def test_writes_go_on_after_redis_closed_their_connection(log: RedisStreamLog) -> None:
    """Redis dropped the writes' connection (CLIENT KILL, as in a failover): the next
    batch connects again, and an answer's appends go on numbered in order."""
    await log.create(
        sid(1), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
    )
    assert await log.append(sid(1), 1, [b"a"], 1.0, end=False) == 1
    killed = await log._redis.client_kill_filter(_type="normal", skipme=True)
    assert int(killed) >= 1
    # Written on the closed connection (an error), or on a new one.
    with contextlib.suppress(StoreError):
        assert await log.append(sid(1), 1, [b"b"], 1.0, end=False) == 2
    n = await log.append(sid(1), 1, [b"c"], 2.0, end=False)
    batch = await log.read(sid(1), 0, limit=10, max_bytes=1000)
    assert batch.events[-1] == (n, b"c")
    assert [i for i, _ in batch.events] == list(range(1, n + 1))


async def test_a_lost_connection_fails_every_batch_written_on_it(log: RedisStreamLog) -> None:
    """Batches are written without waiting for the replies of the one before: when the
    connection is lost with two batches unanswered, the callers of both get a StoreError
    (none is left waiting, none gets another's reply), and Redis ran none of them."""
    for i in (1, 2):
        await log.create(
            sid(i), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
        )
    inflight = log._writes._inflight
    await log._redis.client_pause(20_000, all=False)
    try:
        first = asyncio.ensure_future(log.append(sid(1), 1, [b"x"], 1.0, end=False))
        await turns_until(lambda: len(inflight) == 1)  # the writer wrote the first batch
        second = asyncio.ensure_future(log.append(sid(2), 1, [b"y"], 1.0, end=False))
        await turns_until(lambda: len(inflight) == 2)
        await log._redis.client_kill_filter(_type="normal", skipme=True)
    finally:
        await log._redis.client_unpause()
    async with asyncio.timeout(5):  # a batch left unanswered would wait 10 s (the timeout)
        results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results), results
    assert await log.append(sid(2), 1, [b"z"], 2.0, end=False) == 1
    assert (await log.read(sid(1), 0, limit=10, max_bytes=1000)).events == []
    assert (await log.read(sid(2), 0, limit=10, max_bytes=1000)).events == [(1, b"z")]


async def test_a_create_and_appends_made_before_its_reply_run_after_it(
    log: RedisStreamLog,
) -> None:
    """`create_soon` does not wait for Redis: appends made right after it (in the same
    turn, and in the next ones) run after it, so the first one finds the stream; each
    `append_then` reply comes to its callback, in order."""
    replies: list[int] = []
    both = asyncio.get_running_loop().create_future()

    def then(reply: object) -> None:
        replies.append(log.append_reply(reply, sid(1), 1))
        if len(replies) == 2:
            both.set_result(None)

    created = log.create_soon(
        sid(1), caller="k", request=b"{}", resumable=True, owner="A", now=0.0, lease_s=3
    )
    log.append_then(sid(1), 1, [b"a"], 1.0, end=False, then=then)
    await asyncio.sleep(0)  # the next turn: another batch
    log.append_then(sid(1), 1, [b"b", b"c"], 1.0, end=True, then=then)
    assert not created.done()  # nothing waited for its reply
    lease = await created
    await both
    assert lease.epoch == 1
    assert replies == [1, 3]
    batch = await log.read(sid(1), 0, limit=10, max_bytes=1000)
    assert batch.events == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert batch.ended


async def test_an_append_then_callback_gets_errors_as_append_raises_them(
    log: RedisStreamLog,
) -> None:
    """A stream that does not exist, and a Redis error: `append_reply` raises what
    `append` would."""
    await log._redis.set(f"test-coalesce:s:{sid(3)}", b"not a hash")
    got: list[object] = []
    done = asyncio.get_running_loop().create_future()

    def then(reply: object) -> None:
        got.append(reply)
        if len(got) == 2:
            done.set_result(None)

    log.append_then(sid(2), 1, [b"x"], 1.0, end=False, then=then)
    log.append_then(sid(3), 1, [b"x"], 1.0, end=False, then=then)
    await done
    with pytest.raises(UnknownStreamError):
        log.append_reply(got[0], sid(2), 1)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        log.append_reply(got[1], sid(3), 1)


async def test_a_create_redis_refuses_fails_its_future(log: RedisStreamLog) -> None:
    await log.create(
        sid(1), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
    )
    again = log.create_soon(
        sid(1), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
    )
    with pytest.raises(StoreError, match="exists already"):
        await again


async def test_a_caller_that_gave_up_does_not_shift_the_replies(log: RedisStreamLog) -> None:
    """Three appends in one batch, the middle one's caller cancelled before the replies
    came: the other two get their own stream's reply."""
    for i in (1, 2, 3):
        await log.create(
            sid(i), caller="k", request=b"{}", resumable=False, owner="A", now=0.0, lease_s=3
        )
    await log.append(sid(3), 1, [b"x", b"y"], 1.0, end=False)
    calls = [
        asyncio.ensure_future(log.append(sid(i), 1, [b"z"], 2.0, end=False)) for i in (1, 2, 3)
    ]
    await asyncio.sleep(0)  # the calls are queued
    calls[1].cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] == 3
