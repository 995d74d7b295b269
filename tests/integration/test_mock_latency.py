"""The latency model of the mock DeepSeek: time to first token, token interval, queue time
with keep-alives, server-wide and per request; and coalescing when nothing is delayed."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import MOCK_CONFIG
from tests.servers import RawResult, raw_exchange
from unbroken.mock import Latency, MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "latency"}]
STREAM: dict[str, Any] = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}


def event_times(result: RawResult) -> list[float]:
    """Arrival time of each `data:` event (by the read that completed it)."""
    times = []
    seen = b""
    for at, data in result.times:
        before = seen.count(b"data: ")
        seen += data
        times += [at] * (seen.count(b"data: ") - before)
    return times


def test_ttft_header_delays_the_first_chunk_not_the_headers(mock: MockServer) -> None:
    """X-Mock-TTFT-Ms: headers at once, the first chunk after the delay."""
    result = raw_exchange(mock.url, STREAM, headers={"X-Mock-TTFT-Ms": "150"})
    assert result.first_byte_s is not None
    assert result.first_byte_s < 0.1  # the status line and headers
    first = event_times(result)[0]
    assert 0.14 <= first < 2.0


def test_token_interval(mock: MockServer) -> None:
    """X-Mock-Token-Ms 20 with 11 tokens: ~200 ms from the first token to the last."""
    result = raw_exchange(
        mock.url, STREAM, headers={"X-Mock-Token-Ms": "20", "X-Mock-Tokens": "11"}
    )
    times = event_times(result)
    assert len(times) == 1 + 11 + 2
    # Counted from the request, not from the first token's arrival: the mock keeps its
    # tokens' schedule, so a first token read late on a busy machine shortens the gap to
    # the last one without any token coming early.
    assert 0.19 <= times[-1] < 2.0
    assert times[-1] - times[1] < 2.0
    assert times[-1] == times[-3]  # the usage chunk and [DONE] come with the last token
    body = result.body.decode()
    assert body.count("data: ") == 14


def test_queue_sends_keepalive_comments_then_the_stream(mock: MockServer) -> None:
    """X-Mock-Queue-Ms: `: keep-alive` comments (the first at once) until the queue ends."""
    result = raw_exchange(
        mock.url, STREAM, headers={"X-Mock-Queue-Ms": "150", "X-Mock-Keepalive-Ms": "40"}
    )
    head, _, _ = result.body.partition(b"data: ")
    assert head == b": keep-alive\n\n" * head.count(b": keep-alive\n\n")
    assert 4 <= head.count(b": keep-alive\n\n") <= 6
    assert event_times(result)[0] >= 0.14
    assert result.body.endswith(b"data: [DONE]\n\n")


def test_non_stream_queue_sends_blank_lines_before_the_json(mock: MockServer) -> None:
    """A queued non-stream request gets blank lines, then the JSON (protocol.md TV28)."""
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    result = raw_exchange(
        mock.url, body, headers={"X-Mock-Queue-Ms": "120", "X-Mock-Keepalive-Ms": "40"}
    )
    assert result.body.startswith(b"\n\n\n")
    assert (
        result.json()["choices"][0]["message"]["content"]
        == answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)[1]
    )
    last = result.times[-1][0]
    assert last >= 0.12


def test_non_stream_waits_for_the_whole_generation(mock: MockServer) -> None:
    """Without queue time a non-stream answer arrives after ttft + (n-1) * token_ms."""
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    result = raw_exchange(
        mock.url,
        body,
        headers={"X-Mock-TTFT-Ms": "50", "X-Mock-Token-Ms": "10", "X-Mock-Tokens": "11"},
    )
    assert result.first_byte_s is not None
    assert result.first_byte_s >= 0.15
    assert not result.body.startswith(b"\n")


def test_server_wide_latency_and_header_override() -> None:
    """MockConfig.latency applies to every request; headers override it per request."""
    with MockServer(MockConfig(seed=5, latency=Latency(ttft_ms=200))) as server:
        slow = raw_exchange(server.url, STREAM)
        fast = raw_exchange(server.url, STREAM, headers={"X-Mock-TTFT-Ms": "0"})
    assert event_times(slow)[0] >= 0.19
    assert event_times(fast)[0] < 0.19


def test_zero_delay_streams_are_coalesced_into_few_writes(mock: MockServer) -> None:
    """With no delays thousands of chunks go out in a few large writes (~64 KiB)."""
    result = raw_exchange(mock.url, STREAM, headers={"X-Mock-Tokens": "5000"})
    assert result.body.count(b"data: ") == 5003
    assert len(result.pieces) <= len(result.body) // 32768 + 2
