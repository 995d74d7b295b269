"""The memory and Redis stream logs behave the same: one table of cases runs against both
(Redis on a real redis-server on a free loopback port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from unbroken.core.streamlog import Lease, Renewal, Retention
from unbroken.stores.streamlog import (
    Batch,
    FencedError,
    LogFullError,
    MemoryStreamLog,
    StreamLog,
    UnknownStreamError,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

S1 = "strm_" + "1" * 32
S2 = "strm_" + "2" * 32
S3 = "strm_" + "3" * 32
RETENTION = Retention(ttl_s=100, max_stream_bytes=2048, max_total_bytes=4096, tombstone_s=50)


@pytest.fixture(params=["memory", "redis"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[StreamLog]:
    """Each backend, empty."""
    if request.param == "memory":
        yield MemoryStreamLog(RETENTION)
        return
    from unbroken.stores.redis_streamlog import RedisStreamLog

    url = request.getfixturevalue("redis_url")
    redis_log = RedisStreamLog.from_url(url, RETENTION, prefix="test-log:")
    await redis_log._redis.flushdb()
    yield redis_log
    await redis_log.aclose()


async def create(log: StreamLog, sid: str, owner: str = "A", *, resumable: bool = False) -> Lease:
    return await log.create(
        sid, caller="k1", request=b'{"q":1}', resumable=resumable, owner=owner, now=0.0, lease_s=3
    )


def err(exc: BaseException) -> str:
    return type(exc).__name__


# Each case: a list of (method, args, kwargs) run in order; results are compared with the
# expected list (exceptions by class name). `info` results are reduced to a few fields.
CASES: list[tuple[str, list[tuple[str, tuple[Any, ...], dict[str, Any]]], list[Any]]] = [
    (
        "append then read in pages",
        [
            ("append", (S1, 1, [b"a", b"bb"], 1.0), {"end": False}),
            ("append", (S1, 1, [b"ccc"], 2.0), {"end": False}),
            ("read", (S1, 0), {"limit": 2, "max_bytes": 100}),
            ("read", (S1, 2), {"limit": 10, "max_bytes": 100}),
            ("read", (S1, 3), {"limit": 10, "max_bytes": 100}),
        ],
        [
            2,
            3,
            Batch([(1, b"a"), (2, b"bb")], False, 3),
            Batch([(3, b"ccc")], False, 3),
            Batch([], False, 3),
        ],
    ),
    (
        "max_bytes cuts a page, but one big event still comes alone",
        [
            ("append", (S1, 1, [b"x" * 600, b"y" * 600], 1.0), {"end": True}),
            ("read", (S1, 0), {"limit": 10, "max_bytes": 700}),
            ("read", (S1, 0), {"limit": 10, "max_bytes": 10}),
        ],
        [
            2,
            Batch([(1, b"x" * 600)], True, 2),
            Batch([(1, b"x" * 600)], True, 2),
        ],
    ),
    (
        "an ended log takes no more appends and no new lease",
        [
            ("append", (S1, 1, [b"[DONE]"], 1.0), {"end": True}),
            ("append", (S1, 1, [b"late"], 2.0), {"end": False}),
            ("acquire", (S1, "B", 10.0, 3.0), {}),
        ],
        [1, "FencedError", None],
    ),
    (
        "takeover after expiry fences the old writer",
        [
            ("append", (S1, 1, [b"a"], 1.0), {"end": False}),
            ("acquire", (S1, "B", 2.0, 3.0), {}),
            ("acquire", (S1, "B", 3.0, 3.0), {}),
            ("append", (S1, 1, [b"from A"], 3.5), {"end": False}),
            ("renew", (S1, "A", 1, 3.5, 3.0), {}),
            ("append", (S1, 2, [b"from B"], 3.5), {"end": False}),
            ("read", (S1, 1), {"limit": 10, "max_bytes": 100}),
        ],
        [1, None, Lease("B", 2, 6.0), "FencedError", None, 2, Batch([(2, b"from B")], False, 2)],
    ),
    (
        "renew extends the lease and reports stop requests and readers",
        [
            ("renew", (S1, "A", 1, 2.0, 3.0), {}),
            ("request_stop", (S1,), {}),
            ("touch_reader", (S1, 4.0), {}),
            ("renew", (S1, "A", 1, 4.5, 3.0), {}),
            ("acquire", (S1, "B", 6.0, 3.0), {}),
        ],
        [
            {"lease": Lease("A", 1, 5.0), "stop": False, "reader_at": 0.0},
            None,
            None,
            {"lease": Lease("A", 1, 7.5), "stop": True, "reader_at": 4.0},
            None,
        ],
    ),
    (
        "a released lease is free at once, and not an orphan",
        [
            ("release", (S2, "A", 1), {}),
            ("orphans", (1.0, 10), {}),
            ("acquire", (S2, "B", 1.0, 3.0), {}),
            ("release", (S2, "A", 1), {}),
            ("info", (S2,), {}),
        ],
        [None, [], Lease("B", 2, 4.0), None, {"lease": Lease("B", 2, 4.0), "stop": False}],
    ),
    (
        "orphans: detached answers whose writer died",
        [
            ("orphans", (2.0, 10), {}),
            ("orphans", (3.0, 10), {}),
            ("append", (S3, 1, [b"[DONE]"], 3.0), {"end": True}),
            ("orphans", (3.0, 10), {}),
        ],
        [[], [S3], 1, []],
    ),
    (
        "per-stream bound",
        [
            ("append", (S1, 1, [b"x" * 2000], 1.0), {"end": False}),
            ("append", (S1, 1, [b"x" * 100], 1.0), {"end": False}),
            ("read", (S1, 0), {"limit": 10, "max_bytes": 10}),
            ("append", (S1, 1, [b"e" * 100, b"[DONE]"], 1.0), {"end": True}),
            ("read", (S1, 1), {"limit": 10, "max_bytes": 1000}),
        ],
        [
            1,
            "LogFullError",
            Batch([(1, b"x" * 2000)], False, 1),
            3,  # the last events still fit, so the log can end
            Batch([(2, b"e" * 100), (3, b"[DONE]")], True, 3),
        ],
    ),
    (
        "total bound: ended logs are evicted, unfinished ones are not",
        [
            ("append", (S1, 1, [b"x" * 2000], 1.0), {"end": True}),
            ("append", (S2, 1, [b"y" * 2000], 1.0), {"end": False}),
            ("append", (S3, 1, [b"z" * 1000], 1.0), {"end": False}),
            ("read", (S1, 0), {"limit": 10, "max_bytes": 10}),
            ("append", (S3, 1, [b"z" * 1200], 1.0), {"end": False}),
        ],
        [1, 1, 1, "UnknownStreamError", "LogFullError"],
    ),
    (
        "expiry: swept after ttl, then a tombstone, then forgotten",
        [
            ("append", (S1, 1, [b"a"], 1.0), {"end": True}),
            ("sweep", (100.0,), {}),
            ("read", (S1, 0), {"limit": 10, "max_bytes": 10}),
            ("sweep", (101.0,), {}),
            ("read", (S1, 0), {"limit": 10, "max_bytes": 10}),
            ("info", (S1,), {}),
            ("request", (S1,), {}),
        ],
        [
            1,
            2,  # S2 and S3: unfinished, last written at 0
            Batch([(1, b"a")], True, 1),
            1,
            "UnknownStreamError",
            {"lease": Lease("A", 1, 3.0), "stop": False},
            None,
        ],
    ),
    (
        "unknown streams",
        [
            ("append", ("strm_" + "9" * 32, 1, [b"a"], 1.0), {"end": False}),
            ("read", ("strm_" + "9" * 32, 0), {"limit": 1, "max_bytes": 1}),
            ("info", ("strm_" + "9" * 32,), {}),
            ("acquire", ("strm_" + "9" * 32, "A", 1.0, 3.0), {}),
            ("request_stop", ("strm_" + "9" * 32,), {}),
            ("session_stream", ("sess1",), {}),
        ],
        [
            "UnknownStreamError",
            "UnknownStreamError",
            None,
            "UnknownStreamError",
            "UnknownStreamError",
            None,
        ],
    ),
    (
        "sessions link to their live stream; requests are kept",
        [
            ("link_session", ("sess1", S1, 1.0), {}),
            ("session_stream", ("sess1",), {}),
            ("request", (S1,), {}),
        ],
        [None, S1, b'{"q":1}'],
    ),
]


def reduce(result: Any) -> Any:
    if hasattr(result, "caller"):  # StreamInfo
        return {"lease": result.lease, "stop": result.stop_requested, "reader_at": result.reader_at}
    return result


@pytest.mark.parametrize(("name", "ops", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_log_case(
    log: StreamLog, name: str, ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]], expected: Any
) -> None:
    """Both backends give the same result for every operation of the case."""
    await create(log, S1)
    await create(log, S2)
    await create(log, S3, resumable=True)
    results: list[Any] = []
    for method, args, kwargs in ops:
        try:
            result = reduce(await getattr(log, method)(*args, **kwargs))
        except (FencedError, LogFullError, UnknownStreamError) as exc:
            result = err(exc)
        results.append(result)
    # an expected info names the fields it checks
    for i, item in enumerate(results):
        if isinstance(item, dict) and isinstance(expected[i], dict):
            results[i] = {k: v for k, v in item.items() if k in expected[i]}
    assert results == expected


async def test_create_twice_is_refused(log: StreamLog) -> None:
    """A stream id is created once."""
    await create(log, S1)
    with pytest.raises(Exception, match="exists already"):
        await create(log, S1)


async def test_wait_returns_on_append_or_timeout(log: StreamLog) -> None:
    """A waiter wakes when an event arrives after its cursor, or at its timeout."""
    import anyio

    await create(log, S1)
    with anyio.fail_after(3):
        await log.wait(S1, 0, 0.05)  # times out quietly
        async with anyio.create_task_group() as tg:

            async def writer() -> None:
                await anyio.sleep(0.05)
                await log.append(S1, 1, [b"a"], 1.0, end=False)

            tg.start_soon(writer)
            await log.wait(S1, 0, 2.5)
        batch = await log.read(S1, 0, limit=10, max_bytes=100)
        assert batch.events == [(1, b"a")]
        await log.wait(S1, 0, 2.5)  # already there: returns at once


async def test_reads_across_packed_blocks_match_what_was_appended(log: StreamLog) -> None:
    """Past many blocks of packed events (memory: 8 per zlib block), with batches that
    straddle blocks, any page read gives back exactly the payloads appended, in order,
    while the log is open and after it ended (the last block sealed)."""
    import random

    rng = random.Random(7)
    lease = await create(log, S1)
    model: list[bytes] = []
    while len(model) < 90:
        batch = [
            b'{"i":%d,"t":"%s"}' % (len(model) + i, b"x" * rng.randrange(0, 6))
            for i in range(rng.randrange(1, 12))
        ]
        await log.append(S1, lease.epoch, batch, 1.0, end=False)
        model += batch
    for ended in (False, True):
        if ended:
            await log.append(S1, lease.epoch, [b"[DONE]"], 2.0, end=True)
            model.append(b"[DONE]")
        for _ in range(60):
            after = rng.randrange(0, len(model) + 1)
            limit = rng.randrange(1, 80)
            max_bytes = rng.randrange(1, 600)
            batch_read = await log.read(S1, after, limit=limit, max_bytes=max_bytes)
            got = [payload for _, payload in batch_read.events]
            assert [seq for seq, _ in batch_read.events] == list(
                range(after + 1, after + 1 + len(got))
            )
            assert got == model[after : after + len(got)]
            if after < len(model):
                assert got, "a page holds at least one event"
                more = model[after + len(got) : after + len(got) + 1]
                size = sum(map(len, got))
                assert len(got) == limit or not more or size + len(more[0]) > max_bytes
            assert batch_read.ended is ended


@pytest.mark.parametrize("seed", range(4))
async def test_memory_append_one_counts_as_append_now_does(seed: int) -> None:
    """The memory log's `append_one` (a producer's one-event path) leaves every count as
    `append_now` of that one event does: the event's number, the stream's events and
    bytes, the store's bytes, and the same `LogFullError` once a stream or the store is
    full; what it appended reads back byte for byte. Two streams, so the store's count is
    not one stream's."""
    import random

    rng = random.Random(seed)
    retention = Retention(ttl_s=100, max_stream_bytes=1500, max_total_bytes=2400)
    one, now_log = MemoryStreamLog(retention), MemoryStreamLog(retention)
    epochs = {}
    for sid in (S1, S2):
        epochs[sid] = (await create(one, sid)).epoch
        assert (await create(now_log, sid)).epoch == epochs[sid]
    model: dict[str, list[bytes]] = {S1: [], S2: []}
    n_full = 0
    for i in range(200):
        sid = rng.choice((S1, S2))
        payload = b'{"i":%d,"t":"%b"}' % (i, b"x" * rng.randrange(0, 60))
        got: list[object] = []
        for log in (one, now_log):
            try:
                if log is one:
                    got.append(log.append_one(sid, epochs[sid], payload, float(i)))
                else:
                    got.append(log.append_now(sid, epochs[sid], [payload], float(i), end=False))
            except LogFullError as exc:
                got.append(str(exc))
        assert got[0] == got[1]
        if isinstance(got[0], int):
            model[sid].append(payload)
        else:
            n_full += 1
        assert one.total_bytes == now_log.total_bytes == sum(map(len, model[S1] + model[S2]))
        for sid in (S1, S2):
            info, other = await one.info(sid), await now_log.info(sid)
            assert info is not None
            assert other is not None
            assert (info.n_events, info.n_bytes, info.updated_at) == (
                other.n_events,
                other.n_bytes,
                other.updated_at,
            )
            assert info.n_events == len(model[sid])
            assert info.n_bytes == sum(map(len, model[sid]))
    for sid in (S1, S2):
        assert one.events_now(sid, 0, len(model[sid])) == list(enumerate(model[sid], 1))
    assert n_full, "a stream or the store filled up"


async def test_memory_events_read_in_place_match_what_was_appended() -> None:
    """The memory log's `events_now` (a local producer's readers read it instead of a
    tail): any range of a live log, in and past packed blocks, is what was appended; a
    caught-up reader gets nothing; a range the log does not hold, or an unknown stream,
    is None."""
    log = MemoryStreamLog(Retention(ttl_s=100, max_stream_bytes=1 << 20, max_total_bytes=1 << 21))
    lease = await create(log, S1)
    model = [b'{"i":%d}' % i for i in range(1, 41)]
    for payload in model:
        log.append_one(S1, lease.epoch, payload, 1.0)
    for after in range(len(model) + 1):
        for last in range(after, len(model) + 1):
            got = log.events_now(S1, after, last)
            assert got == list(enumerate(model[after:last], after + 1))
    assert log.events_now(S1, 40, 40) == []
    assert log.events_now(S1, 39, 41) is None
    assert log.events_now(S1, 5, 4) is None
    assert log.events_now(S2, 0, 0) is None


async def test_renew_many_answers_each_lease_as_renew_does(log: StreamLog) -> None:
    """`renew_many` renews every lease of the list, in order, as `renew` of that lease alone
    would: a `Renewal` (stop requested, reader_at), or None for a fenced writer or an unknown
    stream; the renewed leases last as `renew` makes them last."""
    await create(log, S1)
    await create(log, S2, owner="B")
    await create(log, S3, resumable=True)
    await log.request_stop(S3)
    await log.touch_reader(S1, 1.5)
    unknown = "strm_" + "9" * 32
    results = await log.renew_many(
        "A", [(S1, 1), (S2, 1), (unknown, 1), (S3, 1), (S3, 2)], 2.0, 3.0
    )
    assert results == [Renewal(False, 1.5), None, None, Renewal(True, 0.0), None]
    # renewed to 5.0: another owner cannot take S1 at 4.0 (it could at 3.5 without it)
    assert await log.acquire(S1, "B", 4.0, 3.0) is None
    info = await log.info(S3)
    assert info is not None
    assert info.lease == Lease("A", 1, 5.0)
    assert await log.renew_many("A", [], 2.0, 3.0) == []


async def test_renew_many_on_redis_fails_one_item_alone(redis_url: str) -> None:
    """On Redis, a lease whose key holds the wrong type gets a StoreError in its place; the
    other leases of the same call are renewed, also past one script call's 500 leases."""
    from unbroken.errors import StoreError
    from unbroken.stores.redis_streamlog import RENEW_MANY_CHUNK, RedisStreamLog

    log = RedisStreamLog.from_url(redis_url, RETENTION, prefix="test-renew-many:")
    try:
        await log._redis.flushdb()
        ids = ["strm_" + f"{i:032d}" for i in range(RENEW_MANY_CHUNK + 3)]
        for sid in ids:
            await create(log, sid)
        await log._redis.set(f"test-renew-many:s:{S2}", b"not a hash")
        leases = [(sid, 1) for sid in ids]
        leases.insert(RENEW_MANY_CHUNK - 1, (S2, 1))
        results = await log.renew_many("A", leases, 2.0, 3.0)
        failed = results.pop(RENEW_MANY_CHUNK - 1)
        assert isinstance(failed, StoreError)
        assert S2 in str(failed)
        assert results == [Renewal(False, 0.0)] * len(ids)
        info = await log.info(ids[-1])
        assert info is not None
        assert info.lease == Lease("A", 1, 5.0)
    finally:
        await log.aclose()


async def test_orphans_are_the_open_resumable_logs_whose_lease_expired(log: StreamLog) -> None:
    """Only resumable logs that neither ended nor were forgotten are orphans, at most
    `limit` of them; however many ended logs are held beside them."""
    ids = ["strm_" + f"{i:032x}" for i in range(6)]
    for i, sid in enumerate(ids):
        await create(log, sid, resumable=i != 1)  # ids[1] did not opt in
    await log.append(ids[2], 1, [b"[DONE]"], 1.0, end=True)

    async def orphans(now: float, limit: int = 10) -> set[str]:
        found = await log.orphans(now, limit)
        assert len(found) == len(set(found)) <= limit
        return set(found)

    assert await orphans(2.0) == set()  # every lease still live (until 3.0)
    assert await orphans(3.0) == {ids[0], ids[3], ids[4], ids[5]}
    assert await orphans(3.0, 2) < {ids[0], ids[3], ids[4], ids[5]}
    assert len(await orphans(3.0, 2)) == 2
    await log.release(ids[3], "A", 1)  # released on purpose: not an orphan
    assert await orphans(3.0) == {ids[0], ids[4], ids[5]}
    assert await log.acquire(ids[4], "B", 3.0, 3.0) == Lease("B", 2, 6.0)
    assert await orphans(4.0) == {ids[0], ids[5]}
    assert await orphans(6.0) == {ids[0], ids[4], ids[5]}  # B's lease expired too
    if isinstance(log, MemoryStreamLog):  # (Redis forgets by its keys' own expiry)
        await log.sweep(200.0)  # past the retention: forgotten
        assert await orphans(200.0) == set()


@pytest.mark.parametrize("seed", range(3))
async def test_memory_sweep_forgets_what_stream_info_says_expired(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory log's sweep reads expiry off its fields: the logs it forgets, and the
    tombstones it drops, are those `StreamInfo.is_expired` and `expires_at` name."""
    import random

    from unbroken.stores import streamlog as streamlog_module

    monkeypatch.setattr(streamlog_module, "MAX_TOMBSTONES", 6)
    monkeypatch.setattr(streamlog_module, "SWEEP_SLICE", 7)  # the loop's turns in between
    rng = random.Random(seed)
    retention = Retention(ttl_s=10, max_stream_bytes=4096, max_total_bytes=1 << 20, tombstone_s=5)
    log = MemoryStreamLog(retention)
    ids = ["strm_" + f"{i:032x}" for i in range(40)]
    for sid in ids:
        now = rng.uniform(0, 20)
        await log.create(
            sid, caller="k", request=b"{}", resumable=True, owner="A", now=now, lease_s=3
        )
        kind = rng.random()
        if kind < 0.5:
            log.append_now(sid, 1, [b"x", b"[DONE]"], now + rng.uniform(0, 5), end=True)
        elif kind < 0.7:
            log.append_now(sid, 1, [b"x"], now + rng.uniform(0, 5), end=False)
        elif kind < 0.8:
            await log.release(sid, "A", 1)
        elif kind < 0.9:  # a writer alive past its log's expiry (a lease renewed long)
            await log.renew(sid, "A", 1, now, rng.uniform(5, 40))
    exact = 0
    for now in (12.0, 14.0, 18.0, 21.0, 25.0, 27.0, 31.0, 33.0, 40.0, 42.0, 60.0):
        held = {sid for sid in ids if sid in log._streams}
        infos = {sid: await log.info(sid) for sid in held}
        gone = {sid for sid in held if log._streams[sid].gone}
        expect_forgotten = {
            sid
            for sid, info in infos.items()
            if info is not None and sid not in gone and info.is_expired(retention, now)
        }
        expect_dropped = {
            sid
            for sid in gone
            if (info := infos[sid]) is not None and now >= info.expires_at(retention) + 5
        }
        assert await log.sweep(now) == len(expect_forgotten)
        for sid in expect_forgotten:  # a tombstone now (or dropped past MAX_TOMBSTONES)
            assert sid not in log._streams or log._streams[sid].gone
        for sid in held - expect_forgotten - gone:
            assert not log._streams[sid].gone
        held_gone = {sid for sid in ids if sid in log._streams and log._streams[sid].gone}
        assert not held_gone & expect_dropped
        assert len(held_gone) <= 6
        due = (gone - expect_dropped) | expect_forgotten  # the tombstones to keep
        exact += len(due) <= 6
        if len(due) <= 6:  # (else the oldest go, to keep MAX_TOMBSTONES)
            assert held_gone == due
        assert {sid for sid in gone if sid not in log._streams} >= expect_dropped
    assert exact  # the case ran at least once without the cap
