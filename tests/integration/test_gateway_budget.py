"""Exact token budgets and store outages, on real servers: parallel requests reserve
before they are admitted, so a daily budget is overshot by at most one reservation (memory
and Redis); a store that dies at the end of a stream does not cost the answer its [DONE];
the booking is written once the store is back; fail-open serves, fail-closed refuses."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.support import free_port, require_binary
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, LimitSettings, Settings, hash_key
from unbroken.stores import open_store

pytestmark = pytest.mark.integration

KEY = "sk-gw-budget-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Count to ten."}]
BUDGET = 2000
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=3, answer_tokens=(30, 40))) as server:
        yield server


def settings(url: str, store: str = "memory", **options: Any) -> Settings:
    limits = LimitSettings(daily_tokens=BUDGET)
    return Settings(
        api_key="sk-up",
        base_url=url,
        gateway=GatewaySettings(
            keys=(KeySettings("budget", hash_key(KEY), limits),),
            store=store,
            forward_headers=("x-mock-*",),
            **options,
        ),
    )


async def _flush(url: str) -> None:
    from unbroken.stores.redis import RedisStore

    store = open_store(url)
    assert isinstance(store, RedisStore)
    await store._redis.flushdb()
    await store.aclose()


async def _parallel(base: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one() -> None:
            results.append(await client.post("/v1/chat/completions", json=body, headers=AUTH))

        async with anyio.create_task_group() as group:
            for _ in range(n):
                group.start_soon(one)
    return results


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("max_tokens", [MAX_TOKENS, None])
def test_200_parallel_requests_overshoot_the_daily_budget_by_at_most_one_reservation(
    upstream: MockServer, request: pytest.FixtureRequest, store: str, max_tokens: int | None
) -> None:
    """200 requests at once against a 2,000-token budget: the answers served spend at most
    2,000 plus one request's reservation (max_tokens, or reserve_tokens without it)."""
    url = "memory"
    if store == "redis":
        url = request.getfixturevalue("redis_url")
        anyio.run(_flush, url)
    body: dict[str, Any] = {"model": "deepseek-chat", "messages": MESSAGES}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    app = create_app(settings(upstream.url, url, reserve_tokens=MAX_TOKENS))
    with ServerThread(app, lifespan="on") as server:
        responses = anyio.run(_parallel, server.url, 200, body)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == 200
    assert {r.json()["error"]["code"] for r in refused} == {"daily_token_budget_exceeded"}
    spent = sum(r.json()["usage"]["total_tokens"] for r in served)
    reservation = max(r.json()["usage"]["prompt_tokens"] for r in served) + MAX_TOKENS
    assert len(served) >= 10
    assert spent <= BUDGET + reservation, (spent, len(served))


@contextmanager
def redis_server(port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server that keeps every write on disk, so a restart loses nothing."""
    binary = require_binary("redis-server")
    proc = subprocess.Popen(
        [
            binary,
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)),
            *("--appendonly", "yes", "--appendfsync", "always"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)  # waiting for another process to listen
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def metric(client: httpx.Client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def wait_for(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)  # polling the gateway's metrics; no event to wait on


@pytest.mark.redis
def test_a_store_outage_at_the_end_of_a_stream_still_ends_with_done(
    upstream: MockServer, tmp_path: Path
) -> None:
    """Redis dies mid-stream: the answer still ends with [DONE], its booking is queued and
    written once Redis is back, and the first request after recovery is served."""
    require_binary("redis-cli")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    app = create_app(settings(upstream.url, url))
    body = {
        "model": "deepseek-chat",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 40,
        "stream_options": {"include_usage": True},
    }
    with (
        redis_server(port, tmp_path) as redis,
        ServerThread(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={**AUTH, "X-Mock-Token-Ms": "30"},
        ) as response:
            reads = response.iter_raw()
            raw = [next(reads)]
            redis.kill()
            redis.wait(10)
            raw.extend(reads)
        assert response.status_code == 200
        assert b"".join(raw).endswith(b"data: [DONE]\n\n")
        data = [
            json.loads(line[6:])
            for line in b"".join(raw).split(b"\n")
            if line.startswith(b"data: {")
        ]
        usage = [d["usage"]["total_tokens"] for d in data if d.get("usage")][-1]
        pending = "unbroken_gateway_bookings_pending"
        assert metric(client, pending) == 1
        assert metric(client, 'unbroken_gateway_store_failures_total{outcome="booking_deferred"}')
        with redis_server(port, tmp_path):
            wait_for(lambda: metric(client, pending) == 0, 5.0)
            used = subprocess.run(
                ["redis-cli", "-p", str(port), "--scan", "--pattern", "unbroken:counter:tokens:*"],
                capture_output=True,
                check=True,
            ).stdout.split()
            assert len(used) == 1
            value = subprocess.run(
                ["redis-cli", "-p", str(port), "hget", used[0], "v"],
                capture_output=True,
                check=True,
            ).stdout
            assert float(value) == usage
            after = [
                client.post("/v1/chat/completions", json={**body, "stream": False}, headers=AUTH)
                for _ in range(5)
            ]
            assert [r.status_code for r in after] == [200] * 5


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
def test_store_failure_mode_is_a_config_choice_with_a_metric(
    upstream: MockServer, mode: str, status: int
) -> None:
    """With the store down, fail-open serves the request unlimited and fail-closed refuses
    it with 503; both are counted."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(settings(upstream.url, dead, store_failure=mode, retry_attempts=1))
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    with (
        ServerThread(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        response = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == status, response.text
        name = f'unbroken_gateway_store_failures_total{{outcome="admit_{mode}"}}'
        assert metric(client, name) == 1
