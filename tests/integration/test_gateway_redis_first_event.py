"""A new answer on the Redis stream log: the log's create goes out without holding up the
upstream request (the first append waits for it), an event reaches a client only once its
append's reply came back from Redis, and a log that cannot be created fails the answer
before any event."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.integration.test_gateway_streams import expected, fold, parse_events
from tests.support import free_port
from tests.support import gateway_thread as gateway
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Tell me about logs that outlive connections."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
# Redis' own prefix for the gateway's stream logs (the default `gateway.store_prefix`).
PREFIX = "unbroken:"


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=11)) as server:
        yield server


def started(upstream: MockServer) -> int:
    streams: dict[str, int] = upstream.stats()["streams"]
    return streams["started"]


def test_the_upstream_is_asked_while_redis_holds_the_logs_create(
    upstream: MockServer, redis_url: str
) -> None:
    """Redis pauses its writes as an answer starts: the upstream is asked all the same
    (the create's reply is not waited for first), and the client gets the head and the
    first event only after Redis ran the create and the append, all events in the log."""
    control = redis.Redis.from_url(redis_url)
    with (
        gateway(upstream.url, store=redis_url) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        # The log's connection is up (a first answer) before Redis is paused.
        assert client.post("/v1/chat/completions", json=BODY).status_code == 200
        seen: dict[str, object] = {}

        def ask() -> None:
            with (
                httpx.Client(base_url=server.url, timeout=20) as other,
                other.stream(
                    "POST", "/v1/chat/completions", json=BODY, headers={"X-Mock-Tokens": "20"}
                ) as response,
            ):
                seen["head_at"] = time.monotonic()
                seen["stream_id"] = response.headers["x-unbroken-stream-id"]
                seen["raw"] = response.read()

        control.client_pause(4000, all=False)  # EVALSHA waits, the connection stays up
        asker = threading.Thread(target=ask)
        try:
            asker.start()
            deadline = time.monotonic() + 3
            while started(upstream) < 2:
                assert time.monotonic() < deadline, "the upstream waited for Redis"
                time.sleep(0.01)  # polling the mock's counter
            assert "head_at" not in seen  # nothing delivered before Redis has it
        finally:
            unpaused_at = time.monotonic()
            control.client_unpause()
        asker.join(20)
        assert isinstance(seen["head_at"], float)
        assert seen["head_at"] >= unpaused_at
        assert isinstance(seen["raw"], bytes)
        events = parse_events(seen["raw"])
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert fold([d for _, d in events]).content(0) == expected(20)
        replay = client.get(f"/v1/streams/{seen['stream_id']}")
        assert parse_events(replay.content) == events
    control.close()


def test_an_event_reaches_the_client_only_once_redis_has_it(
    upstream: MockServer, redis_url: str
) -> None:
    """Read as it streams: each event the client has is in the Redis log already (its
    append's reply arrived before it was written to the client)."""
    control = redis.Redis.from_url(redis_url)
    headers = {"X-Mock-Tokens": "30", "X-Mock-Token-Ms": "10"}
    with (
        gateway(upstream.url, store=redis_url) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
        client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response,
    ):
        log = f"{PREFIX}s:{response.headers['x-unbroken-stream-id']}:log"
        raw = b""
        checked = 0
        for part in response.iter_raw():
            raw += part
            events = parse_events(raw[: raw.rfind(b"\n\n") + 2])
            if events:
                # The log's length right after the client got event `events[-1]`.
                assert control.xlen(log) >= events[-1][0]
                checked += 1
        assert checked >= 3
    control.close()


def test_a_log_redis_cannot_create_fails_the_answer_before_any_event(
    upstream: MockServer,
) -> None:
    """No Redis behind the store: a streamed request gets the store's 503 (no event and
    no 200 head), as before the create went out with the upstream request."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with (
        gateway(upstream.url, store=dead, retry_attempts=1) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        response = client.post("/v1/chat/completions", json=BODY)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "store_unavailable"
        assert b"data: {" not in response.content
