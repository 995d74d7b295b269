"""The bars of the stream log with real processes: two gateway instances behind nginx
(round robin, buffering off) on one redis-server lose one instance to kill -9 mid-answer;
a TCP fault proxy cuts a hundred streams at random byte offsets. Every client reconnects
with its last event id and ends with the byte-identical answer."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import (
    FaultProxy,
    Reader,
    gateway_process,
    nginx,
    percentile,
    run_with_loss,
)
from tests.integration.test_gateway_streams import fold
from tests.support import require_binary
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=21)
MESSAGES = [{"role": "user", "content": "An answer that must survive its gateway."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
N_STREAMS = 100
HEADERS = {"X-Mock-Tokens": "60", "X-Mock-Token-Ms": "40", "X-Unbroken-Resumable": "1"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    """The mock DeepSeek shared by these tests."""
    with MockServer(MOCK) as server:
        yield server


def check(readers: list[Reader]) -> None:
    """Every answer is whole, byte-identical, its ids 1..n, and its final event's digest
    matches the text."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=60)
    for reader in readers:
        assert reader.done
        assert sorted(reader.events) == list(range(1, reader.last_id + 1))
        payloads = [reader.events[i] for i in sorted(reader.events)]
        got = fold(payloads).content(0)
        assert got.encode() == content.encode()
        final = json.loads(payloads[-2])["unbroken"]
        assert final["stream_id"] == reader.stream_id


def long_poll(client: httpx.Client, stream_id: str) -> list[object]:
    """Every event of a stream, page by page with the long-poll form."""
    after: str = "0"
    events: list[object] = []
    while True:
        page = client.get(
            f"/v1/streams/{stream_id}",
            params={"after": after, "wait": "5"},
            headers={"Accept": "application/json"},
        ).json()
        events += page["events"]
        after = page["next"]
        if page["done"]:
            return events


def test_instance_loss_behind_nginx(upstream: MockServer, redis_url: str) -> None:
    """kill -9 of one of two gateways mid-answer: its clients reconnect through nginx,
    the other instance takes their answers over, and all 100 end identical."""
    nginx_binary = require_binary("nginx")
    upstream.reset()
    lease = {"stream_lease_s": "1.5"}
    with (
        gateway_process(upstream.url, redis_url, **lease) as (a, url_a),
        gateway_process(upstream.url, redis_url, **lease) as (_, url_b),
        nginx(
            nginx_binary, [url_a.removeprefix("http://"), url_b.removeprefix("http://")]
        ) as front,
    ):
        run = asyncio.run(
            run_with_loss(front, BODY, HEADERS, N_STREAMS, lambda: a.send_signal(signal.SIGKILL))
        )
        # A long-poll client reaches the same answers, through nginx, after the takeover.
        moved = [r for r in run.readers if r.reconnects][:10]
        with httpx.Client(base_url=front, timeout=20) as client:
            for reader in moved:
                logged = [reader.events[i] for i in sorted(reader.events)][:-1]  # no [DONE]
                assert long_poll(client, reader.stream_id) == [json.loads(p) for p in logged]
    check(run.readers)
    moved = [r for r in run.readers if r.reconnects]
    assert 20 <= len(moved) <= 80  # round robin gave the dead instance about half
    assert len(run.gaps_s) == len(moved)
    assert percentile(run.gaps_s, 0.99) < 10.0


def test_network_loss_costs_no_upstream_tokens(upstream: MockServer, redis_url: str) -> None:
    """A fault proxy cuts each of 100 streams once at a random byte offset; all end
    identical and the mock served exactly one request and one answer's chunks per stream."""
    upstream.reset()
    rng = random.Random(5)
    # Each POST's connection is cut somewhere in its answer, past its headers (they carry
    # the stream id a reconnect needs); reconnections pass.
    # (the answer is about 9 KB of SSE: offsets stay well inside it, or some would not cut)
    cuts = [rng.randrange(600, 6000) for _ in range(N_STREAMS)]
    posts = iter(cuts)

    def cut(_: int, head: bytes) -> int | None:
        return next(posts, None) if head.startswith(b"POST ") else None

    with gateway_process(upstream.url, redis_url) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        with FaultProxy((host, int(port)), cut) as proxy:
            run = asyncio.run(run_with_loss(proxy.url, BODY, HEADERS, N_STREAMS, lambda: None))
            assert proxy.n_cut == N_STREAMS
    check(run.readers)
    assert all(r.reconnects >= 1 for r in run.readers)
    stats = upstream.stats()
    assert stats["requests_total"] == N_STREAMS
    assert stats["streams"]["cancelled"] == 0
    single = stats["chunks_sent"] / N_STREAMS
    assert single == int(single)  # every stream sent the same, whole answer once


def test_sweeper_finishes_a_detached_answer_of_a_dead_instance(
    upstream: MockServer, redis_url: str
) -> None:
    """Nobody reconnects: the surviving instance's sweeper takes the dead one's detached
    answer over and finishes it into the log, which then replays whole."""
    import redis

    upstream.reset()
    lease = {"stream_lease_s": "1.5"}
    with (
        gateway_process(upstream.url, redis_url, **lease) as (a, url_a),
        gateway_process(upstream.url, redis_url, **lease) as (_, url_b),
        httpx.Client(timeout=20) as client,
    ):
        with client.stream(
            "POST", url_a + "/v1/chat/completions", json=BODY, headers=HEADERS
        ) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            next(response.iter_raw())
            a.send_signal(signal.SIGKILL)
        meta = f"unbroken:s:{stream_id}"
        with redis.Redis.from_url(redis_url) as r:
            for _ in range(300):
                if r.hget(meta, "ended") == b"1":
                    break
                time.sleep(0.05)  # polling the shared store; the sweeper runs elsewhere
            else:
                pytest.fail("the sweeper did not finish the answer")
        replay = client.get(f"{url_b}/v1/streams/{stream_id}")
    reader = Reader()
    reader.feed(replay.content, bytearray())
    reader.stream_id = stream_id
    check([reader])
    assert json.loads(reader.events[reader.last_id - 1])["unbroken"]["takeovers"] == 1


def test_a_stop_asked_of_another_instance_ends_the_answer_at_its_writer(
    upstream: MockServer, redis_url: str
) -> None:
    """DELETE through the instance that does not write the answer: it records the stop in
    the shared store, the writer's next lease renewal sees it, and the client reading from
    the writer gets a stop finish and [DONE] long before the answer's natural end."""
    upstream.reset()
    slow = {**HEADERS, "X-Mock-Tokens": "2000", "X-Mock-Token-Ms": "20"}
    with (
        gateway_process(upstream.url, redis_url) as (_, url_a),
        gateway_process(upstream.url, redis_url) as (_, url_b),
        httpx.Client(timeout=20) as client,
        client.stream("POST", url_a + "/v1/chat/completions", json=BODY, headers=slow) as response,
    ):
        stream_id = response.headers["x-unbroken-stream-id"]
        reader = Reader()
        buffer = bytearray()
        chunks = response.iter_raw()
        reader.feed(next(chunks), buffer)
        stopped = client.delete(f"{url_b}/v1/streams/{stream_id}")
        assert stopped.json() == {"id": stream_id, "object": "stream", "stopped": True}
        for data in chunks:
            reader.feed(data, buffer)
    assert reader.done
    payloads = [reader.events[i] for i in sorted(reader.events)]
    answer = fold(payloads)
    assert answer.finish_reason(0) == "stop"
    # 2,000 tokens take 40 s; a lease renewal comes every second
    assert len(payloads) < 1000
    assert upstream.stats()["streams"]["cancelled"] == 1
