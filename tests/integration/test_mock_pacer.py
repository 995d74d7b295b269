"""The mock's pacer under uvicorn: a plain timed stream written straight to the transport
is the stream the awaited path writes through uvicorn's `send`, byte for byte on the wire,
and a client that leaves ends it."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.servers import RawResult, raw_exchange
from unbroken.mock import Latency, MockConfig, MockServer

pytestmark = pytest.mark.integration

STREAM: dict[str, Any] = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "pace me"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
TIMED = {"X-Mock-Tokens": "30", "X-Mock-Token-Ms": "4"}


def wire(result: RawResult) -> tuple[bytes, bytes]:
    """The head without its date, and the body."""
    return re.sub(rb"\r\ndate: [^\r]*", b"", result.head), result.body


def answers(config: MockConfig) -> tuple[list[RawResult], dict[str, Any]]:
    with MockServer(config) as mock:
        results = [raw_exchange(mock.url, STREAM, headers=TIMED) for _ in range(2)]
        plain = {"model": STREAM["model"], "messages": STREAM["messages"]}
        results.append(raw_exchange(mock.url, plain, headers=TIMED))
        return results, mock.stats()


def test_paced_and_awaited_streams_put_the_same_bytes_on_the_wire() -> None:
    config = MockConfig(seed=5)
    paced, paced_stats = answers(config)
    awaited, awaited_stats = answers(MockConfig(seed=5, paced=False))
    assert paced_stats["streams"]["paced"] == 2
    assert awaited_stats["streams"]["paced"] == 0
    for mine, theirs in zip(paced, awaited, strict=True):
        assert mine.status == theirs.status == 200
        assert mine.is_complete
        assert theirs.is_complete
        assert mine.ending == theirs.ending == "eof"
        my_head, my_body = wire(mine)
        their_head, their_body = wire(theirs)
        assert my_head == their_head
        # The answer's id and time differ per request; everything else is the same.
        assert re.sub(rb'"id":"[^"]*","object":"([a-z.]*)","created":\d+', b"", my_body) == (
            re.sub(rb'"id":"[^"]*","object":"([a-z.]*)","created":\d+', b"", their_body)
        )
    # Each write of a stream one chunk of whole events; an idle loop sends one per token.
    for stream in paced[:2]:
        for chunk in stream.pieces:
            assert chunk.startswith(b"data: ")
            assert chunk.endswith(b"\n\n")
    assert len(paced[0].pieces) >= 20
    assert paced_stats["chunks_sent"] == awaited_stats["chunks_sent"] == 2 * 33
    assert paced_stats["bytes_sent"] == awaited_stats["bytes_sent"]


def test_a_client_that_leaves_a_paced_stream_is_counted_and_let_go() -> None:
    with MockServer(MockConfig(latency=Latency(token_ms=10.0))) as mock:
        result = raw_exchange(mock.url, STREAM, headers={"X-Mock-Tokens": "500"}, max_s=0.15)
        assert result.ending == "timeout"
        assert 5 <= result.body.count(b"data: ") < 100
        deadline = time.monotonic() + 5
        while mock.stats()["streams"]["cancelled"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polling the mock's counters from another thread
        stats = mock.stats()
        assert stats["streams"] == {
            "started": 1,
            "active": 0,
            "completed": 0,
            "cancelled": 1,
            "paced": 1,
        }
        assert mock.log()[-1]["outcome"] == "cancelled"
        deadline = time.monotonic() + 5
        while not mock.app.pacer.is_idle:
            assert time.monotonic() < deadline
            time.sleep(0.01)
