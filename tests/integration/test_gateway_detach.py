"""A caught-up live answer's reader detaches (gateway/detach.py) on a real uvicorn with the
gateway's protocol: while the producer writes to the client the request has no task, and
the answer still ends whole, with its metrics booked once; a client that pauses reading
(the sink refuses, the reader resumes on the send path) and one that leaves both work."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_gateway_direct import (
    MESSAGES,
    Reader,
    content,
    events,
    expected,
    metric,
    request_bytes,
)
from tests.support import gateway_thread as gateway
from unbroken.mock import MockConfig, MockServer, ServerThread

pytestmark = pytest.mark.integration

BODY = json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": True}).encode()


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=4)) as server:
        yield server


def chat_request(server: ServerThread, **headers: str) -> bytes:
    """A streamed chat POST with these (mock) headers, as bytes to send."""
    return request_bytes(server, "POST", "/v1/chat/completions", BODY, **headers)


def request_tasks(server: ServerThread) -> int:
    """The gateway server's request tasks now (uvicorn's set of them)."""
    uvicorn_server: Any = server._server
    return len(uvicorn_server.server_state.tasks)


def test_a_caught_up_reader_holds_no_task_and_the_answer_ends_whole(
    upstream: MockServer,
) -> None:
    """Mid-answer the request has no task (its reader detached); the answer is whole and
    well framed, the connection serves the next request, and the chat is counted once."""
    with gateway(upstream.url) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            reader = Reader(sock)
            sock.sendall(chat_request(server, X_Mock_Tokens="80", X_Mock_Token_Ms="20"))
            # The first events, then the task count while the rest streams in.
            _, _, head = reader.response(stop_after=1500)
            tasks_mid_answer = request_tasks(server)
            rest = b""
            while b"data: [DONE]\n\n" not in head + rest:
                size = int(reader._line(), 16)
                rest += reader._exactly(size)
                assert reader._exactly(2) == b"\r\n"
            assert int(reader._line(), 16) == 0  # the terminating chunk
            assert reader._exactly(2) == b"\r\n"
            sock.sendall(request_bytes(server, "GET", "/healthz"))
            status, _, _ = reader.response()
        assert status == 200
        assert tasks_mid_answer == 0
        got = events(head + rest)
        assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
        chunks = [d for _, d in got if d != b"[DONE]" and b'"unbroken":' not in d]
        assert content(chunks) == expected(80)
        assert metric(server, "unbroken_gateway_active_requests") == 0
        assert metric(server, 'unbroken_gateway_streams_total{outcome="complete"}') == 1
        assert metric(server, "unbroken_gateway_chunks_direct_total") > 40


def test_a_reader_detaches_before_the_first_token_and_every_chunk_goes_direct(
    upstream: MockServer,
) -> None:
    """While the upstream has not sent the first token the request already has no task
    (its reader handed itself to the producer with the response's head sink), and every
    event but the last three (the usage chunk, the final chunk and [DONE], which the
    resumed reader writes together as it ends the response) reaches the client from the
    producer: none through `send`."""
    with gateway(upstream.url) as server:
        with socket.create_connection((server.host, server.port), timeout=15) as sock:
            sock.sendall(
                chat_request(server, X_Mock_Tokens="6", X_Mock_Ttft_Ms="4000", X_Mock_Token_Ms="40")
            )
            deadline = time.monotonic() + 10
            while int(upstream.stats()["streams"]["started"]) < 1:
                assert time.monotonic() < deadline, "the upstream never got the request"
                time.sleep(0.01)  # polling the mock's counters; no event to wait on
            # Well before the first token (4 s away) the request's task is gone.
            deadline = time.monotonic() + 2
            while request_tasks(server) != 0:
                assert time.monotonic() < deadline, "the reader still has a task"
                time.sleep(0.01)  # polling the server's task set; no event to wait on
            assert int(upstream.stats()["streams"]["completed"]) == 0
            reader = Reader(sock)
            status, _, body = reader.response()
        assert status == 200
        got = events(body)
        assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
        chunks = [d for _, d in got if d != b"[DONE]" and b'"unbroken":' not in d]
        assert content(chunks) == expected(6)
        assert metric(server, 'unbroken_gateway_streams_total{outcome="complete"}') == 1
        total = metric(server, "unbroken_gateway_chunks_total")
        assert total == len(got)
        assert b'"usage"' in got[-3][1]
        assert metric(server, "unbroken_gateway_chunks_direct_total") == total - 3


def test_a_reader_that_pauses_gets_the_whole_answer(upstream: MockServer) -> None:
    """A client that stops reading for a while (the transport pauses, the producer's sink
    refuses, the reader resumes and writes through `send`) then reads on gets it all."""
    with gateway(upstream.url, send_timeout_s=30, stream_buffer_bytes=64 * 1024) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        sock.settimeout(20)
        with sock:
            sock.sendall(chat_request(server, X_Mock_Tokens="20000", X_Mock_Token_Ms="0.05"))
            reader = Reader(sock)
            _, _, head = reader.response(stop_after=2000)
            # Not reading until the upstream has sent the whole answer: the gateway's
            # writes back up meanwhile (its transport pauses) far before that.
            deadline = time.monotonic() + 15
            while int(upstream.stats()["streams"]["completed"]) < 1:
                assert time.monotonic() < deadline, "the upstream never finished"
                time.sleep(0.02)  # polling the mock's counters; no event to wait on
            rest = _drain(reader)
        got = events(head + rest)
        assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
        assert got[-1][1] == b"[DONE]"
        chunks = [d for _, d in got if d != b"[DONE]" and b'"unbroken":' not in d]
        assert content(chunks) == expected(20000)
        assert metric(server, 'unbroken_gateway_streams_total{outcome="complete"}') == 1
        # The pause was real: many events went through the reader's `send`, not the sink.
        total = metric(server, "unbroken_gateway_chunks_total")
        assert total - metric(server, "unbroken_gateway_chunks_direct_total") > 100


def _drain(reader: Reader) -> bytes:
    """The rest of a chunked body whose start `Reader.response(stop_after=...)` read."""
    body = b""
    while True:
        size = int(reader._line(), 16)
        data = reader._exactly(size)
        assert reader._exactly(2) == b"\r\n"
        if size == 0:
            return body
        body += data


def test_a_detached_readers_client_leaving_cancels_the_upstream(upstream: MockServer) -> None:
    """The client of a detached reader goes away: the upstream request is cancelled and
    the chat ends as client_gone, once."""
    with gateway(upstream.url) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(chat_request(server, X_Mock_Tokens="5000", X_Mock_Token_Ms="10"))
            Reader(sock).response(stop_after=1500)
            assert request_tasks(server) == 0
        deadline = time.monotonic() + 10
        while int(upstream.stats()["streams"]["cancelled"]) < 1:
            assert time.monotonic() < deadline, "the upstream was never cancelled"
            time.sleep(0.02)  # polling the mock's counters; no event to wait on
        while metric(server, "unbroken_gateway_active_requests") != 0:
            assert time.monotonic() < deadline, "the chat never ended"
            time.sleep(0.02)  # polling the gateway's metrics; no event to wait on
        assert metric(server, 'unbroken_gateway_streams_total{outcome="client_gone"}') == 1


def test_a_reconnect_detaches_too_and_gets_exactly_the_rest(upstream: MockServer) -> None:
    """A GET /v1/streams/{id} reconnect that caught up holds no task either, and gets
    exactly the events after its Last-Event-ID."""
    with gateway(upstream.url) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as first:
            first.sendall(
                chat_request(
                    server, X_Mock_Tokens="120", X_Mock_Token_Ms="20", X_Unbroken_Resumable="1"
                )
            )
            _, headers, head = Reader(first).response(stop_after=600)
        stream_id = headers["x-unbroken-stream-id"]
        seen = events(head.rsplit(b"\n\n", 1)[0] + b"\n\n")
        with socket.create_connection((server.host, server.port), timeout=10) as second:
            second.sendall(
                request_bytes(
                    server,
                    "GET",
                    f"/v1/streams/{stream_id}",
                    Authorization="Bearer x",
                    Accept="text/event-stream",
                    Last_Event_ID=str(seen[-1][0]),
                )
            )
            reader = Reader(second)
            status, _, part = reader.response(stop_after=1000)
            tasks_mid_answer = request_tasks(server)
            rest = part + _drain(reader)
        assert status == 200
        assert tasks_mid_answer == 0
        got = seen + events(rest)
        assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
        assert got[-1][1] == b"[DONE]"
        chunks = [d for _, d in got if d != b"[DONE]" and b'"unbroken":' not in d]
        assert content(chunks) == expected(120)
