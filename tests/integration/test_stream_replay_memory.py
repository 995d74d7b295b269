"""Replaying a 10 MB answer from the stream log holds a page at a time, not the answer:
the gateway's traced memory grows by far less than the answer while it sends it (memory
and Redis backends)."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc

import pytest

from unbroken.core.streamlog import Retention
from unbroken.gateway.app import create_app
from unbroken.mock import ServerThread
from unbroken.settings import GatewaySettings, Settings
from unbroken.stores.streamlog import MemoryStreamLog, StreamLog

pytestmark = pytest.mark.integration

STREAM_ID = "strm_" + "ab" * 16
N_EVENTS = 10_000
EVENT = (
    b'{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
    + (b"y" * 930)
    + b'"}}]}'
)
ANSWER_BYTES = N_EVENTS * len(EVENT)
RETENTION = Retention(max_stream_bytes=64 << 20, max_total_bytes=128 << 20)
# What the replay may add to the gateway's memory: a few pages of 256 KiB and buffers.
BOUND_BYTES = 3 << 20


async def fill(log: StreamLog) -> None:
    """Log a finished 10 MB answer (1 KB chunks, then [DONE])."""
    now = time.time()
    lease = await log.create(
        STREAM_ID, caller="anonymous", request=b"{}", resumable=False, owner="w", now=now, lease_s=3
    )
    for i in range(10):
        last = i == 9
        batch = [EVENT] * (N_EVENTS // 10 - (1 if last else 0)) + ([b"[DONE]"] if last else [])
        await log.append(STREAM_ID, lease.epoch, batch, now, end=last)
    await log.aclose()


def replay(url: str) -> int:
    """GET the stream over a bare socket, discarding what arrives; bytes received."""
    host, port = url.removeprefix("http://").split(":")
    total = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"GET /v1/streams/{STREAM_ID} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        while data := sock.recv(65536):
            total += len(data)
    return total


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_replaying_10_mb_stays_in_bounded_memory(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """The replay sends all 10 MB while the traced memory peak stays under 3 MB."""
    server_log: StreamLog
    if backend == "memory":
        store = "memory"
        server_log = MemoryStreamLog(RETENTION)
        asyncio.run(fill(server_log))
    else:
        from unbroken.stores.redis_streamlog import RedisStreamLog

        store = request.getfixturevalue("redis_url")
        asyncio.run(fill(RedisStreamLog.from_url(store, RETENTION, prefix="replay-test:")))
        server_log = RedisStreamLog.from_url(store, RETENTION, prefix="replay-test:")
    settings = Settings(
        api_key="sk-up",
        gateway=GatewaySettings(
            store=store, stream_max_bytes=64 << 20, streams_max_bytes=128 << 20
        ),
    )
    with ServerThread(create_app(settings, stream_log=server_log), lifespan="on") as server:
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            received = replay(server.url)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received > ANSWER_BYTES
    assert peak - before < BOUND_BYTES, f"replay grew memory by {(peak - before) >> 10} KiB"
