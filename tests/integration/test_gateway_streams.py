"""The stream log with the memory store, one gateway: ids on every event, replay after any
event id (SSE and long-poll), reconnecting mid-answer without a new upstream request,
stopping, detached generation, takeover of an abandoned answer, status codes, sessions."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import gateway_thread as gateway
from unbroken.core import ChatStreamDecoder, ChunkAccumulator
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.settings import KeySettings, hash_key
from unbroken.stores.packed import BLOCK_EVENTS

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=11)
MESSAGES = [{"role": "user", "content": "Tell me about logs that outlive connections."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
SLOW = {"X-Mock-Tokens": "60", "X-Mock-Token-Ms": "15"}


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    """A fresh mock per test: the tests read its counters."""
    with MockServer(MOCK) as server:
        yield server


def parse_events(raw: bytes) -> list[tuple[int, bytes]]:
    """(id, data) of each SSE event (comments skipped)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        ident = data = None
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                ident = int(line[4:])
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is not None:
            assert ident is not None, block
            events.append((ident, data))
    return events


def fold(datas: list[bytes]) -> ChunkAccumulator:
    decoder = ChatStreamDecoder()
    acc = ChunkAccumulator()
    for data in datas:
        for chunk in decoder.feed(b"data: " + data + b"\n\n"):
            acc.feed(chunk)
    return acc


def expected(n_tokens: int | None = 60) -> str:
    return answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=n_tokens)[1]


def read_some(client: httpx.Client, n: int, headers: dict[str, str]) -> tuple[str, bytes]:
    """POST, read `n` events, then drop the connection; the stream id and the bytes read."""
    raw = b""
    with client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response:
        assert response.headers["x-unbroken-gateway"] == "1"
        stream_id = response.headers["x-unbroken-stream-id"]
        for data in response.iter_raw():
            raw += data
            if raw.count(b"\n\n") >= n:
                break
    return stream_id, raw


def test_every_event_has_an_id_and_the_final_event_proves_the_text(upstream: MockServer) -> None:
    """Ids 1..n on every event ([DONE] included); the final event carries the SHA-256 of
    the content; the log replays the same events after any id, with ?after= or the header."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        response = client.post("/v1/chat/completions", json=BODY, headers={"X-Mock-Tokens": "60"})
        stream_id = response.headers["x-unbroken-stream-id"]
        events = parse_events(response.content)
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert events[-1][1] == b"[DONE]"
        final = json.loads(events[-2][1])
        content = fold([d for _, d in events]).content(0)
        assert content == expected()
        assert final["unbroken"]["content_sha256"] == hashlib.sha256(content.encode()).hexdigest()
        assert final["unbroken"]["stream_id"] == stream_id
        replay = client.get(f"/v1/streams/{stream_id}")
        assert replay.headers["content-type"].startswith("text/event-stream")
        assert parse_events(replay.content) == events
        tail = client.get(f"/v1/streams/{stream_id}?after=5")
        assert parse_events(tail.content) == events[5:]
        header_wins = client.get(
            f"/v1/streams/{stream_id}?after=1", headers={"Last-Event-ID": str(len(events) - 1)}
        )
        assert parse_events(header_wins.content) == events[-1:]
        # After the last event, EventSource is told to stop reconnecting.
        past_end = client.get(
            f"/v1/streams/{stream_id}", headers={"Last-Event-ID": str(len(events))}
        )
        assert past_end.status_code == 204


def test_reconnect_mid_answer_costs_no_upstream_request(upstream: MockServer) -> None:
    """A resumable answer whose client dropped keeps generating; the reconnect replays
    from the last id and follows live; the mock served one request only."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        stream_id, raw = read_some(client, 8, {**SLOW, "X-Unbroken-Resumable": "1"})
        first = parse_events(raw[: raw.rindex(b"\n\n") + 2])
        last_id = first[-1][0]
        rest = client.get(f"/v1/streams/{stream_id}", headers={"Last-Event-ID": str(last_id)})
        events = first + parse_events(rest.content)
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert fold([d for _, d in events]).content(0) == expected()
    stats = upstream.stats()
    assert stats["requests_total"] == 1
    assert stats["streams"]["cancelled"] == 0


def test_long_poll_reaches_the_same_answer(upstream: MockServer) -> None:
    """`Accept: application/json` with ?after=&wait= pages through the same events."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        stream_id, _ = read_some(client, 2, {**SLOW, "X-Unbroken-Resumable": "1"})
        after, chunks, polls = "0", [], 0
        while True:
            page = client.get(
                f"/v1/streams/{stream_id}",
                params={"after": after, "wait": "5"},
                headers={"Accept": "application/json"},
            ).json()
            polls += 1
            chunks += [json.dumps(e).encode() for e in page["events"]]
            after = page["next"]
            if page["done"]:
                break
        assert polls > 1  # it did wait for live events
        assert fold(chunks).content(0) == expected()
        assert json.loads(chunks[-1])["unbroken"]["stream_id"] == stream_id


def test_delete_stops_the_answer_with_a_stop_finish(upstream: MockServer) -> None:
    """DELETE cancels the upstream at once; the log ends with a stop finish and [DONE]."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        slow = {"X-Mock-Tokens": "2000", "X-Mock-Token-Ms": "20", "X-Unbroken-Resumable": "1"}
        stream_id, _ = read_some(client, 3, slow)
        stopped = client.delete(f"/v1/streams/{stream_id}")
        assert stopped.json() == {"id": stream_id, "object": "stream", "stopped": True}
        assert upstream.stats()["streams"]["cancelled"] == 1
        events = parse_events(client.get(f"/v1/streams/{stream_id}").content)
        assert events[-1][1] == b"[DONE]"
        assert fold([d for _, d in events]).finish_reason(0) == "stop"
        again = client.delete(f"/v1/streams/{stream_id}")
        assert again.json()["stopped"] is False


def test_without_opt_in_a_disconnect_cancels_and_a_reconnect_takes_over(
    upstream: MockServer,
) -> None:
    """No opt-in: the upstream is cancelled within a second of the disconnect; a later
    reconnect continues the answer upstream (resume) and the whole answer is identical."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        stream_id, raw = read_some(client, 8, SLOW)
        deadline = time.monotonic() + 3
        while upstream.stats()["streams"]["cancelled"] < 1:
            assert time.monotonic() < deadline, "upstream not cancelled"
            time.sleep(0.02)  # polling another server's counters
        first = parse_events(raw[: raw.rindex(b"\n\n") + 2])
        rest = client.get(f"/v1/streams/{stream_id}", headers={"Last-Event-ID": str(first[-1][0])})
        events = first + parse_events(rest.content)
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert fold([d for _, d in events]).content(0) == expected()
        final = json.loads(events[-2][1])["unbroken"]
        assert final["takeovers"] == 1
        metrics = client.get("/metrics").text
        assert "unbroken_gateway_stream_takeovers_total 1.0" in metrics
        assert "unbroken_gateway_stream_writers 0.0" in metrics
    assert upstream.stats()["requests_total"] == 2


def test_status_codes(upstream: MockServer) -> None:
    """404 unknown or malformed, 403 another key's stream, 410 expired, 400 bad ids."""
    keys = (KeySettings("a", hash_key("sk-a")), KeySettings("b", hash_key("sk-b")))
    with (
        gateway(upstream.url, keys=keys, stream_ttl_s=0.5) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        a = {"Authorization": "Bearer sk-a"}
        response = client.post("/v1/chat/completions", json=BODY, headers=a)
        stream_id = response.headers["x-unbroken-stream-id"]
        assert client.get(f"/v1/streams/{stream_id}", headers=a).status_code == 200
        assert client.get(f"/v1/streams/{stream_id}?access_token=sk-a").status_code == 200
        other = client.get(f"/v1/streams/{stream_id}", headers={"Authorization": "Bearer sk-b"})
        assert other.status_code == 403
        assert other.json()["error"]["code"] == "stream_forbidden"
        unknown = client.get("/v1/streams/strm_" + "0" * 32, headers=a)
        assert unknown.status_code == 404
        assert client.get("/v1/streams/nope", headers=a).status_code == 404
        bad = client.get(f"/v1/streams/{stream_id}?after=x", headers=a)
        assert bad.status_code == 400
        assert client.get(f"/v1/streams/{stream_id}?after=99999", headers=a).status_code == 400
        assert client.put(f"/v1/streams/{stream_id}", headers=a).status_code == 405
        time.sleep(0.6)  # past the stream's retention (stream_ttl_s=0.5)
        gone = client.get(f"/v1/streams/{stream_id}", headers=a)
        assert gone.status_code == 410
        assert gone.json()["error"]["code"] == "stream_expired"


def test_session_records_its_live_stream(upstream: MockServer) -> None:
    """While a session's answer streams, GET /v1/sessions/{id} names its stream."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        session = client.post("/v1/sessions", json={}).json()["id"]
        headers = {**SLOW, "X-Unbroken-Resumable": "1"}
        with client.stream(
            "POST", f"/v1/sessions/{session}/messages", json={"content": "hi"}, headers=headers
        ) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            next(response.iter_raw())
            assert client.get(f"/v1/sessions/{session}").json()["live_stream_id"] == stream_id
        client.get(f"/v1/streams/{stream_id}")  # follow it to its end
        assert client.get(f"/v1/sessions/{session}").json()["live_stream_id"] is None


def test_an_answer_past_its_log_bound_ends_with_an_error(upstream: MockServer) -> None:
    """An answer that outgrows stream_max_bytes ends with a stream_log_full error event,
    and its log ends too (a reconnect gets the same ending)."""
    with (
        gateway(upstream.url, stream_max_bytes=4096) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        response = client.post("/v1/chat/completions", json=BODY, headers={"X-Mock-Tokens": "200"})
        events = parse_events(response.content)
        error = json.loads(events[-1][1])["error"]
        assert error["code"] == "stream_log_full"
        assert "stream_max_bytes" in error["message"]
        stream_id = response.headers["x-unbroken-stream-id"]
        assert parse_events(client.get(f"/v1/streams/{stream_id}").content) == events


def test_redis_store_logs_batches_and_reconnects(upstream: MockServer, redis_url: str) -> None:
    """With the Redis store (appends batched while one is in flight), the same contract:
    ids 1..n, a reconnect mid-answer without a new upstream request, identical text."""
    with (
        gateway(upstream.url, store=redis_url) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        fast = client.post("/v1/chat/completions", json=BODY, headers={"X-Mock-Tokens": "60"})
        events = parse_events(fast.content)
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert fold([d for _, d in events]).content(0) == expected()
        stream_id, raw = read_some(client, 8, {**SLOW, "X-Unbroken-Resumable": "1"})
        first = parse_events(raw[: raw.rindex(b"\n\n") + 2])
        rest = client.get(f"/v1/streams/{stream_id}", headers={"Last-Event-ID": str(first[-1][0])})
        both = first + parse_events(rest.content)
        assert [i for i, _ in both] == list(range(1, len(both) + 1))
        assert fold([d for _, d in both]).content(0) == expected()
    assert upstream.stats()["requests_total"] == 2


def test_a_finished_answer_replays_the_same_once_its_log_is_sealed(upstream: MockServer) -> None:
    """The memory log compresses an ended answer's last block at the hub's tick, not at its
    end: replays before and after it are the answer's events, byte for byte."""
    from unbroken.gateway.app import create_app
    from unbroken.gateway.guard import guarded_protocol
    from unbroken.mock import ServerThread
    from unbroken.settings import GatewaySettings, Settings

    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(forward_headers=("x-mock-*",)),
    )
    app = create_app(settings)
    with (
        ServerThread(app, lifespan="on", http=guarded_protocol(app.guard)) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        response = client.post("/v1/chat/completions", json=BODY, headers={"X-Mock-Tokens": "60"})
        stream_id = response.headers["x-unbroken-stream-id"]
        events = parse_events(response.content)
        assert events[-1][1] == b"[DONE]"
        log: Any = app.streams.log
        before = parse_events(client.get(f"/v1/streams/{stream_id}").content)
        tail_before = client.get(f"/v1/streams/{stream_id}?after=50").content
        # The tick comes about once a second; the log is then sealed (its last block too).
        deadline = time.monotonic() + 10
        while log._unsealed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not log._unsealed
        packed = log._streams[stream_id].events
        assert len(packed._ends) * BLOCK_EVENTS >= len(packed)
        assert before == events
        assert parse_events(client.get(f"/v1/streams/{stream_id}").content) == events
        assert client.get(f"/v1/streams/{stream_id}?after=50").content == tail_before
