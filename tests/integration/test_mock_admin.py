"""The mock's instruments (/_mock/stats, /_mock/log, /_mock/reset, /_mock/config), its
server-wide faults (scripted and seeded), and a clean shutdown under open streams."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.servers import raw_exchange
from unbroken.mock import FaultRule, MockConfig, MockServer

pytestmark = pytest.mark.integration

BODY: dict[str, Any] = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "admin"}],
    "stream": True,
}


def statuses(url: str, n: int, headers: dict[str, str] | None = None) -> list[int]:
    return [raw_exchange(url, BODY, headers=headers).status for _ in range(n)]


def test_stats_count_requests_streams_and_chunks(mock: MockServer) -> None:
    """Counters by path and status, streams started/completed/cancelled/active, chunks."""
    raw_exchange(mock.url, BODY, headers={"X-Mock-Tokens": "10"})
    raw_exchange(mock.url, {**BODY, "stream": False})
    raw_exchange(mock.url, BODY, path="/models", method="GET")
    raw_exchange(mock.url, BODY, headers={"X-Mock-Fault": "429"})
    # Leave a slow stream early: the server counts it as cancelled.
    raw_exchange(
        mock.url, BODY, headers={"X-Mock-Token-Ms": "50", "X-Mock-Tokens": "100"}, max_s=0.2
    )
    deadline = time.monotonic() + 5
    while mock.stats()["streams"]["cancelled"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stats = mock.stats()
    assert stats["requests"] == {
        "POST /chat/completions": {"200": 3, "429": 1},
        "GET /models": {"200": 1},
    }
    assert stats["statuses"] == {"200": 4, "429": 1}
    assert stats["requests_total"] == 5
    # The timed stream went through the pacer; the one with no delays did not.
    assert stats["streams"] == {
        "started": 2,
        "active": 0,
        "completed": 1,
        "cancelled": 1,
        "paced": 1,
    }
    assert stats["chunks_sent"] >= 13
    assert stats["faults"] == {"429": 1}
    assert stats["bytes_sent"] > 0


def test_log_keeps_recent_requests_without_prompts(mock: MockServer) -> None:
    """/_mock/log lists recent requests (oldest first, `limit`), with no prompt text."""
    for _ in range(3):
        raw_exchange(mock.url, BODY)
    entries = mock.log(limit=2)
    assert [e["seq"] for e in entries] == [2, 3]
    entry = entries[-1]
    assert entry["path"] == "/chat/completions"
    assert entry["model"] == "deepseek-chat"
    assert entry["stream"] is True
    assert entry["outcome"] == "ok"
    assert entry["chunks"] == entry["completion_tokens"] + 3  # role, usage chunk, [DONE]
    assert "admin" not in str(entries)  # the prompt never appears


def test_reset_clears_counters_fault_keys_and_cache(mock: MockServer) -> None:
    """POST /_mock/reset zeroes counters, forgets times=K budgets and the context cache."""
    nonstream = {**BODY, "stream": False}
    raw_exchange(mock.url, nonstream)
    assert raw_exchange(mock.url, nonstream).json()["usage"]["prompt_cache_hit_tokens"] > 0
    assert statuses(mock.url, 2, {"X-Mock-Fault": "503 times=1"}) == [503, 200]
    mock.reset()
    assert mock.stats()["requests_total"] == 0
    assert mock.log() == []
    assert raw_exchange(mock.url, nonstream).json()["usage"]["prompt_cache_hit_tokens"] == 0
    assert statuses(mock.url, 1, {"X-Mock-Fault": "503 times=1"}) == [503]


def test_config_endpoint_changes_latency_faults_and_balance(mock: MockServer) -> None:
    """POST /_mock/config replaces parts of the configuration at run time."""
    original = httpx.get(mock.url + "/_mock/config").json()
    try:
        view = httpx.post(
            mock.url + "/_mock/config",
            json={"faults": [{"fault": "503", "first_requests": 1}], "balance": "0.00"},
        ).json()
        assert view["faults"][0]["fault"] == "503"
        assert raw_exchange(mock.url, BODY).status == 503  # scripted rule first
        assert raw_exchange(mock.url, BODY).status == 402  # then the empty balance
        balance = httpx.get(mock.url + "/user/balance", headers={"Authorization": "Bearer s"})
        assert balance.json()["is_available"] is False
        httpx.post(mock.url + "/_mock/config", json={"balance": "5.00", "faults": []})
        httpx.post(mock.url + "/_mock/config", json={"latency": {"ttft_ms": 150}})
        result = raw_exchange(mock.url, BODY)
        assert result.status == 200
        assert result.times[-1][0] >= 0.14
    finally:
        httpx.post(
            mock.url + "/_mock/config",
            json={k: original[k] for k in ("latency", "faults", "balance", "seed")},
        )
    assert httpx.get(mock.url + "/_mock/config").json() == original


def test_scripted_faults_fail_the_first_requests_then_heal() -> None:
    """first_requests=N fails the first N chat requests; first_s fails for T seconds."""
    config = MockConfig(faults=(FaultRule("503", first_requests=3),))
    with MockServer(config) as server:
        assert statuses(server.url, 5) == [503, 503, 503, 200, 200]
        server.reset()
        assert statuses(server.url, 2) == [503, 503]
    timed = MockConfig(faults=(FaultRule("429 retry_after=1", first_s=0.15),))
    with MockServer(timed) as server:
        started = time.monotonic()
        server.reset()  # the window starts at start or reset
        first = raw_exchange(server.url, BODY)
        assert (first.status, first.header("retry-after")) == (429, "1")
        while raw_exchange(server.url, BODY).status == 429:
            assert time.monotonic() - started < 5
        assert time.monotonic() - started >= 0.15


def test_probabilistic_faults_are_reproducible_with_the_seed() -> None:
    """Seeded draws: the same seed gives the same sequence (also after reset); the header
    `X-Mock-Fault: none` opts a request out."""
    rules = (FaultRule("503", probability=0.3), FaultRule("reset after=2", probability=0.3))

    def run(seed: int) -> list[str]:
        with MockServer(MockConfig(faults=rules, fault_seed=seed)) as server:
            out = []
            for i in range(24):
                body = {**BODY, "messages": [{"role": "user", "content": f"q{i}"}]}
                result = raw_exchange(server.url, body)
                out.append("reset" if result.ending == "reset" else str(result.status))
            server.reset()
            again = [
                "reset" if r.ending == "reset" else str(r.status)
                for r in (
                    raw_exchange(
                        server.url, {**BODY, "messages": [{"role": "user", "content": f"q{i}"}]}
                    )
                    for i in range(24)
                )
            ]
            assert again == out
            assert statuses(server.url, 3, {"X-Mock-Fault": "none"}) == [200, 200, 200]
            return out

    first = run(1)
    assert run(1) == first
    assert {"503", "reset", "200"} <= set(first)
    assert run(2) != first


def test_stop_is_quick_with_hanging_and_stalled_clients() -> None:
    """Stopping the server ends hanging and stalled exchanges at once."""
    server = MockServer()
    server.start()
    parts = urlsplit(server.url)
    socks = []
    for spec in ("hang", "stall after=2"):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        payload = (
            b'{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"x"}]}'
        )
        sock.sendall(
            b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s\r\n"
            + f"X-Mock-Fault: {spec}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        socks.append(sock)
    deadline = time.monotonic() + 5
    while server.stats()["streams"]["active"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.5
    for sock in socks:
        with sock:
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
