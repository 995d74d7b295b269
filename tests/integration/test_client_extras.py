"""Client instrumentation (Prometheus), async cancellation, and HTTP/2 on the wire."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry

from tests.h2server import ANSWER, H2ChatServer
from unbroken import AsyncClient, Client, PrometheusHook, RetryPolicy, Route
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "count me"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=2)) as server:
        yield server


def test_prometheus_hook_counts_what_happened(upstream: MockServer) -> None:
    """Requests, attempts by kind, resumes, tokens, cost, TTFT, breaker state and active
    streams reach the registry; the key is never a label value."""
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    routes = [
        Route("a", upstream.url, api_key="sk-secret-label", headers={"X-Mock-Fault": "503"}),
        Route("b", upstream.url, api_key="sk-secret-label"),
    ]
    fast = RetryPolicy(wait_initial_s=0.01, wait_max_s=0.01)
    with Client(routes=routes, hooks=[hook], retry=fast, breaker_threshold=1) as c:
        c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_headers={
                "X-Mock-Fault": "reset after=4 times=1",
                "X-Mock-Fault-Key": f"p{time.time()}",
            },
        )

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    assert (
        value("unbroken_requests_total", route="b", model="deepseek-chat", outcome="complete") == 2
    )
    assert value("unbroken_attempts_total", route="a", kind="first", outcome="overloaded") == 1
    assert value("unbroken_fallbacks_total", route="b") == 1
    assert value("unbroken_resumes_total", route="b") == 1
    assert value("unbroken_errors_total", route="b", kind="truncated") == 1
    assert value("unbroken_circuit_state", route="a") == 2  # open
    assert value("unbroken_tokens_total", route="b", model="deepseek-chat", type="completion") > 0
    assert value("unbroken_cost_usd_total", route="b", model="deepseek-chat") > 0
    assert value("unbroken_time_to_first_token_seconds_count", route="b") == 2
    assert value("unbroken_active_streams") == 0
    exposition = b"".join(
        line.encode() for metric in registry.collect() for line in str(metric.samples)
    )
    assert b"sk-secret-label" not in exposition


@pytest.mark.anyio
async def test_cancelling_the_task_closes_the_upstream(upstream: MockServer) -> None:
    """Cancelling the consuming task closes the connection: the mock sees a cancel."""
    before = upstream.stats()["streams"]["cancelled"]
    async with AsyncClient(api_key="sk", base_url=upstream.url) as c:
        got_one = anyio.Event()

        async def consume() -> None:
            stream = await c.chat.completions.create(
                model="deepseek-chat",
                messages=MESSAGES,
                stream=True,
                extra_headers={"X-Mock-Token-Ms": "50", "X-Mock-Tokens": "400"},
            )
            async for _ in stream:
                got_one.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await got_one.wait()
            tg.cancel_scope.cancel()
    with anyio.fail_after(3):
        while upstream.stats()["streams"]["cancelled"] == before:  # noqa: ASYNC110 - a counter in another server, not an event here
            await anyio.sleep(0.02)  # polling the mock's counter, bounded by fail_after
    assert upstream.stats()["streams"]["cancelled"] == before + 1


def test_http2_is_spoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """http2=True talks HTTP/2: an HTTP/2-only TLS server (ALPN `h2`, h2 frames) streams
    the whole answer to it."""
    with H2ChatServer(tmp_path) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
        with Client(
            api_key="sk", base_url=server.url, http2=True, retry=RetryPolicy(attempts=1)
        ) as c:
            done = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert done.choices[0].message.content == "".join(ANSWER)
    assert server.protocols == ["h2"]
    assert server.paths == ["/chat/completions"]


def test_closed_stream_is_recorded_once_and_keeps_what_arrived(upstream: MockServer) -> None:
    """Closing a stream mid-answer ends its active-stream count (outcome cancelled), and
    current() still gives what arrived."""
    registry = CollectorRegistry()
    with Client(api_key="sk", base_url=upstream.url, hooks=[PrometheusHook(registry)]) as c:
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Mock-Token-Ms": "20", "X-Mock-Tokens": "200"},
        )
        shown = ""
        for chunk in stream:
            shown += "".join(ch.delta.content or "" for ch in chunk.choices if ch.delta)
            if len(shown) > 5:
                break
        stream.close()
        stream.close()
    assert registry.get_sample_value("unbroken_active_streams") == 0
    cancelled = registry.get_sample_value(
        "unbroken_requests_total",
        {"route": "default", "model": "deepseek-chat", "outcome": "cancelled"},
    )
    assert cancelled == 1
    assert stream.current().choices[0].message.content == shown
