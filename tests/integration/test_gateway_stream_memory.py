"""What a live streamed answer holds in the gateway (memory store): the answer's text once,
in its stream log, not again in the SDK stream that produces it; the answer still ends
whole, with its digest and usage, and still resumes from the log."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_gateway_streams import fold, parse_events
from tests.support import gateway_thread as gateway
from tests.support import held_text_bytes
from unbroken.client import AsyncStream
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=5)
BODY = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "Say a good deal about memory."}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
SLOW = {"X-Mock-Tokens": "120", "X-Mock-Token-Ms": "20"}


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    with MockServer(MOCK) as server:
        yield server


def _answer_of(stream_id: str) -> ChunkAccumulator:
    """The answer accumulator of the SDK stream the producer of `stream_id` reads (found
    without reading the answer: its log is being written on the gateway's thread)."""
    from unbroken.gateway.streams import Producer, _TextLink

    objects = gc.get_objects()
    (producer,) = [o for o in objects if issubclass(type(o), Producer) and o.stream_id == stream_id]
    # The producer is where its accumulator reads the text (`keep_text_in`, through a link
    # cut when the producer ends); its chunk sink is let go when the answer ends.
    (stream,) = [
        o
        for o in objects
        if issubclass(type(o), AsyncStream)
        and isinstance(link := getattr(o._run.answer, "_source", None), _TextLink)
        and link.producer is producer
    ]
    assert isinstance(stream, AsyncStream)
    return stream._run.answer


def test_the_answer_text_is_held_by_the_log_only(upstream: MockServer) -> None:
    """Mid-answer, the producer's SDK answer accumulator holds none of the text streamed so
    far (the log does), and reads it back whole."""
    from unbroken.gateway.streams import Producer, StreamHub

    # A long answer: the client reads a part of it, well before the upstream's end.
    headers = {"X-Mock-Tokens": "400", "X-Mock-Token-Ms": "25"}
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        raw = b""
        with client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            # Held, so the response stays open: the client reads on (mid-answer).
            reads = response.iter_raw()
            for data in reads:
                raw += data
                if raw.count(b"\n\n") >= 40:
                    break
            streamed = fold([d for _, d in parse_events(raw)]).content(0)
            held = held_text_bytes(_answer_of(stream_id), stop=(Producer, StreamHub))
            del reads
    assert len(streamed) > 100
    assert held < 100, (held, len(streamed))


def test_the_answer_ends_whole(upstream: MockServer) -> None:
    """The text the client got, its SHA-256 in the final event, and the usage chunk."""
    headers = {"X-Mock-Tokens": "120", "X-Mock-Token-Ms": "2"}
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/v1/chat/completions", json=BODY, headers=headers)
    events = parse_events(response.content)
    assert events[-1][1] == b"[DONE]"
    content = fold([d for _, d in events]).content(0)
    final = json.loads(events[-2][1])
    assert final["unbroken"]["content_sha256"] == hashlib.sha256(content.encode()).hexdigest()
    usage = json.loads(events[-3][1])["usage"]
    assert usage["completion_tokens"] == 120


def test_a_reconnect_mid_answer_replays_the_text(upstream: MockServer) -> None:
    """A resumable answer whose client left: the reconnect gets the whole text from the log
    and the final event's digest of it."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        raw = b""
        headers = {**SLOW, "X-Unbroken-Resumable": "1"}
        with client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            for data in response.iter_raw():
                raw += data
                if raw.count(b"\n\n") >= 20:
                    break
        replay = client.get(f"/v1/streams/{stream_id}")
    events = parse_events(replay.content)
    content = fold([d for _, d in events]).content(0)
    final = json.loads(events[-2][1])
    assert final["unbroken"]["content_sha256"] == hashlib.sha256(content.encode()).hexdigest()
    assert len(content) > 150


def _held_by_the_mock(obj: object) -> bool:
    """Held by the mock upstream (running in this process), which keeps its requests."""
    return any(type(r).__module__.startswith("unbroken.mock") for r in gc.get_referrers(obj))


def test_a_live_answer_holds_its_request_packed_and_no_idle_flags(upstream: MockServer) -> None:
    """Mid-answer, the conversation and the headers sent upstream are not held as objects
    (the producer's SDK call holds them as their JSON, to resume or retry with), nor is the
    request id's bytes (the access record has it), nor a `first` flag of its own once its
    first event is out, nor its relay a keep-alive flag between keep-alives; the answer
    still ends whole."""
    from unbroken.gateway import streams
    from unbroken.gateway.relay import StreamRelay
    from unbroken.gateway.streams import Producer

    prompt = "Say a good deal about packed conversations."
    body = {**BODY, "messages": [{"role": "user", "content": prompt}]}
    headers = {"X-Mock-Tokens": "200", "X-Mock-Token-Ms": "10"}
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        raw = b""
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            request_id = response.headers["x-request-id"]
            reads = response.iter_raw()
            for data in reads:
                raw += data
                if raw.count(b"\n\n") >= 20:
                    break
            objects = gc.get_objects()
            (producer,) = [
                o for o in objects if issubclass(type(o), Producer) and o.stream_id == stream_id
            ]
            (stream,) = [
                o
                for o in objects
                if issubclass(type(o), AsyncStream)
                and getattr(o._run.chunk_sink, "sink", None) is producer
            ]
            held = stream._run._body["messages"]
            lists = [
                o
                for o in objects
                if type(o) is list
                and o is not body["messages"]
                and any(isinstance(m, dict) and m.get("content") == prompt for m in o)
                and not _held_by_the_mock(o)
            ]
            held_headers = getattr(stream._run, "_headers", None)
            # Its first event is out: the shared set flag, not one of its own.
            own_first = producer.first is not getattr(streams, "_FIRST_SET", None)
            # No keep-alive being written: its relay holds no flag for one.
            idle_flags = [o._idle for o in objects if issubclass(type(o), StreamRelay)]
            # The request id's bytes are in no gateway object (the access record has it).
            rid = request_id.encode()
            rid_holders = [
                type(o).__name__
                for o in objects
                if str(type(o).__module__).startswith("unbroken.gateway")
                and any(type(r) is bytes and r == rid for r in gc.get_referents(o))
            ]
            del objects, producer, stream
            for data in reads:
                raw += data
    assert isinstance(held, bytes)
    assert json.loads(held) == body["messages"]
    assert lists == []
    assert isinstance(held_headers, bytes)
    assert json.loads(held_headers)["X-Request-ID"] == request_id
    assert rid_holders == []
    assert not own_first
    assert idle_flags
    assert all(flag is None for flag in idle_flags)
    events = parse_events(raw)
    assert events[-1][1] == b"[DONE]"
    assert json.loads(events[-3][1])["usage"]["completion_tokens"] == 200


def test_a_live_answers_producer_waits_on_the_lanes_slotted_wait(upstream: MockServer) -> None:
    """Mid-answer, the producer's task waits for its SDK stream's fast lane on the lane's
    slotted wait, not on an asyncio future (80 bytes against 144 per live answer); the
    answer still ends whole."""
    import asyncio

    from unbroken.gateway.streams import Producer

    headers = {"X-Mock-Tokens": "200", "X-Mock-Token-Ms": "10"}
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        raw = b""
        with client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            reads = response.iter_raw()
            for data in reads:
                raw += data
                if raw.count(b"\n\n") >= 20:
                    break
            (producer,) = [
                o
                for o in gc.get_objects()
                if issubclass(type(o), Producer) and o.stream_id == stream_id
            ]
            task: Any = producer.task
            waiting_on = task._fut_waiter  # the C task's: what it awaits
            del task
            del producer
            for data in reads:
                raw += data
    assert type(waiting_on).__name__ == "_TapWait"
    assert not isinstance(waiting_on, asyncio.Future)
    del waiting_on
    events = parse_events(raw)
    assert events[-1][1] == b"[DONE]"
    assert json.loads(events[-3][1])["usage"]["completion_tokens"] == 200


def test_a_finished_answers_producer_goes_by_refcount(upstream: MockServer) -> None:
    """Once an answer is over, its producer (with its task, booking and request record) is
    freed by refcount: not left hanging off the finished SDK stream (cyclic garbage) until
    a garbage collection, which runs here only when called. The answer is whole."""
    from unbroken.gateway.streams import Producer

    headers = {"X-Mock-Tokens": "30", "X-Mock-Token-Ms": "1"}
    gc.collect()
    gc.disable()
    try:
        with (
            gateway(upstream.url) as server,
            httpx.Client(base_url=server.url, timeout=30) as client,
        ):
            response = client.post("/v1/chat/completions", json=BODY, headers=headers)
            stream_id = response.headers["x-unbroken-stream-id"]
        # The server has shut down: every task of the gateway has ended.
        left = [o for o in gc.get_objects() if issubclass(type(o), Producer)]
        assert [p.stream_id for p in left if p.stream_id == stream_id] == []
    finally:
        gc.enable()
    events = parse_events(response.content)
    assert events[-1][1] == b"[DONE]"
    assert json.loads(events[-3][1])["usage"]["completion_tokens"] == 30
