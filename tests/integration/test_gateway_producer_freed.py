"""A finished answer's producer (on Redis, with the tail of its last events) is freed by
reference counting when its answer ends, not left for the gateway's rare full garbage
collections (gateway/server.py raises the thresholds): held until then, every answer that
ended during a long run added its whole tail to the gateway's peak memory."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import gateway_thread as gateway
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

BODY = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "Say a little."}],
    "stream": True,
}


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=3)) as server:
        yield server


def _producers(stream_id: str) -> int:
    from unbroken.gateway.streams import Producer

    return sum(
        1 for o in gc.get_objects() if issubclass(type(o), Producer) and o.stream_id == stream_id
    )


def test_a_finished_redis_answer_is_freed_without_the_collector(
    upstream: MockServer, redis_url: str
) -> None:
    headers = {"X-Mock-Tokens": "30", "X-Mock-Token-Ms": "2"}
    gc.collect()
    gc.disable()  # only reference counting frees what the answer leaves
    try:
        with (
            gateway(upstream.url, store=redis_url) as server,
            httpx.Client(base_url=server.url, timeout=30) as client,
        ):
            response = client.post("/v1/chat/completions", json=BODY, headers=headers)
            assert response.status_code == 200
            assert response.text.rstrip().endswith("data: [DONE]")
            stream_id = response.headers["x-unbroken-stream-id"]
            # The producer ends on the gateway's thread just after the client's [DONE].
            deadline = time.monotonic() + 10
            while _producers(stream_id) and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the gateway's thread
            assert _producers(stream_id) == 0
    finally:
        gc.enable()
