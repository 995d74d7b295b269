"""`/v1/chat/ws` against a real gateway and mock over loopback: answers, several on one
connection, auth by header or first frame, resume after a dropped connection, cancel, bad
frames, a client that stops reading, and the heartbeat."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, Settings, hash_key

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Which sizes does the jacket come in?"}]
BODY = {"model": "deepseek-chat", "messages": QUESTION}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=13)) as server:
        yield server


@contextmanager
def gateway(
    mock: MockServer, ws_ping_interval: float = 20.0, **options: Any
) -> Iterator[ServerThread]:
    settings = Settings(
        api_key="sk-test",
        base_url=mock.url,
        gateway=GatewaySettings(forward_headers=("x-mock-*",), **options),
    )
    with ServerThread(
        create_app(settings),
        lifespan="on",
        ws="websockets-sansio",
        ws_ping_interval=ws_ping_interval,
        ws_ping_timeout=ws_ping_interval,
    ) as server:
        yield server


def ws_url(server: ServerThread) -> str:
    return server.url.replace("http://", "ws://") + "/v1/chat/ws"


def frames(ws: ClientConnection, rid: str | None = None) -> Iterator[dict[str, Any]]:
    """Frames until `done` (or an error) for `rid` (any id when None)."""
    while True:
        frame = json.loads(ws.recv(timeout=20))
        yield frame
        if frame["type"] in ("done", "error") and (rid is None or frame["id"] == rid):
            return


def content(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["data"]["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["data"].get("choices")
    )


def reference(server: ServerThread, body: dict[str, Any]) -> str:
    """The same request's answer through a plain non-stream POST."""
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=20)
    return str(response.json()["choices"][0]["message"]["content"])


def test_create_streams_an_answer_with_event_ids(mock: MockServer) -> None:
    """A create gets `started` with a stream id, chunks with increasing event ids, `done`,
    and the text of the same request over HTTP."""
    with gateway(mock) as server, connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "create", "id": "r1", "body": BODY}))
        got = list(frames(ws, "r1"))
        expected = reference(server, BODY)
    assert got[0]["type"] == "started"
    assert got[0]["stream_id"]
    chunks = [f for f in got if f["type"] == "chunk"]
    assert got[-1] == {"type": "done", "id": "r1"}
    events = [int(c["event"]) for c in chunks]
    assert events == list(range(1, len(events) + 1))
    assert content(chunks) == expected != ""


def test_several_answers_share_one_connection(mock: MockServer) -> None:
    """Two creates on one connection interleave and each ends whole under its own id."""
    other = {**BODY, "messages": [{"role": "user", "content": "And the colours?"}]}
    with gateway(mock) as server, connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "create", "id": "a", "body": BODY}))
        ws.send(json.dumps({"type": "create", "id": "b", "body": other}))
        by_id: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        done: set[str] = set()
        while done != {"a", "b"}:
            frame = json.loads(ws.recv(timeout=20))
            by_id[frame["id"]].append(frame)
            if frame["type"] == "done":
                done.add(frame["id"])
        expected = reference(server, BODY), reference(server, other)
    got = (
        content([f for f in by_id["a"] if f["type"] == "chunk"]),
        content([f for f in by_id["b"] if f["type"] == "chunk"]),
    )
    assert got == expected
    assert expected[0] != expected[1]


def test_resume_after_a_dropped_connection_has_no_gap_and_no_repeat(mock: MockServer) -> None:
    """A client that loses its connection mid-answer resumes on a new one from its last
    event id: the two parts join into the whole answer, each event once."""
    headers = {"X-Mock-Token-Ms": "5"}
    with gateway(mock) as server:
        with connect(ws_url(server), additional_headers=headers) as ws:
            ws.send(json.dumps({"type": "create", "id": "r1", "body": BODY}))
            started = json.loads(ws.recv(timeout=20))
            first = [json.loads(ws.recv(timeout=20)) for _ in range(5)]
        # The connection is gone; the resumable answer kept generating into the log.
        with connect(ws_url(server)) as ws:
            ws.send(
                json.dumps(
                    {
                        "type": "resume",
                        "id": "r1",
                        "stream_id": started["stream_id"],
                        "after": first[-1]["event"],
                    }
                )
            )
            rest = [f for f in frames(ws, "r1") if f["type"] == "chunk"]
        expected = reference(server, BODY)
    events = [int(f["event"]) for f in first + rest]
    assert events == list(range(1, len(events) + 1))
    assert content(first + rest) == expected


def test_auth_by_header_or_first_frame(mock: MockServer) -> None:
    """With keys configured: the Authorization header or a first `auth` frame opens the
    connection; a wrong key gets an error frame and close code 1008."""
    key = "sk-gw-" + "k" * 20
    keys = (KeySettings("shop", hash_key(key)),)
    with gateway(mock, keys=keys) as server:
        url = ws_url(server)
        with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            ws.send(json.dumps({"type": "create", "id": "h", "body": BODY}))
            assert list(frames(ws, "h"))[-1]["type"] == "done"
        with connect(url) as ws:
            ws.send(json.dumps({"type": "auth", "token": key}))
            ws.send(json.dumps({"type": "create", "id": "f", "body": BODY}))
            assert list(frames(ws, "f"))[-1]["type"] == "done"
        with connect(url) as ws:
            ws.send(json.dumps({"type": "auth", "token": "sk-wrong"}))
            error = json.loads(ws.recv(timeout=10))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
    assert error["type"] == "error"
    assert error["error"]["code"] in ("invalid_api_key", "unknown_key", "missing_api_key")
    assert "sk-wrong" not in json.dumps(error)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


def test_bad_frames_get_errors_and_the_connection_stays(mock: MockServer) -> None:
    """Non-JSON, an unknown type, a create without a body and a duplicate id each get an
    error frame naming the problem; the connection still serves a good create."""
    with gateway(mock) as server, connect(ws_url(server)) as ws:
        ws.send("not json")
        ws.send(json.dumps({"type": "shout", "id": "x"}))
        ws.send(json.dumps({"type": "create", "id": "y"}))
        ws.send(json.dumps({"type": "create", "id": "z", "body": {"model": "deepseek-chat"}}))
        errors = [json.loads(ws.recv(timeout=10)) for _ in range(4)]
        ws.send(json.dumps({"type": "create", "id": "ok", "body": BODY}))
        assert list(frames(ws, "ok"))[-1]["type"] == "done"
    messages = [e["error"]["message"] for e in errors]
    assert all(e["type"] == "error" for e in errors)
    assert "not JSON" in messages[0]
    assert "shout" in messages[1]
    assert "body" in messages[2]
    assert "messages" in messages[3]


def test_cancel_stops_the_upstream(mock: MockServer) -> None:
    """`cancel` ends the answer with a stop finish and `done`, and the mock sees its
    request end long before the answer would have."""
    headers = {"X-Mock-Token-Ms": "20", "X-Mock-Tokens": "2000"}
    with gateway(mock) as server, connect(ws_url(server), additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "create", "id": "r1", "body": BODY}))
        got = [json.loads(ws.recv(timeout=20)) for _ in range(4)]
        ws.send(json.dumps({"type": "cancel", "id": "r1"}))
        got += list(frames(ws, "r1"))
    finishes = [
        f["data"]["choices"][0].get("finish_reason")
        for f in got
        if f["type"] == "chunk" and f["data"].get("choices")
    ]
    assert finishes[-1] == "stop"
    assert got[-1]["type"] == "done"
    entry = mock.log(5)[-1]
    assert entry["chunks"] < 200  # of 2,000 tokens: cancelled, not run to its end


def _raw_ws(server: ServerThread, headers: dict[str, str]) -> socket.socket:
    """A WebSocket opened by hand, so the test controls reading and pongs."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.socket()
    # A small receive window (set before connecting, so it is the advertised one): a client
    # that does not read then fills the gateway's socket within a few hundred frames.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        (
            "GET /v1/chat/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    data = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    length = len(data)
    header = bytes([0x81]) + (
        bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    )
    sock.sendall(header + mask + masked)


def test_a_client_that_stops_reading_is_closed_and_its_upstream_cancelled(
    mock: MockServer,
) -> None:
    """A client that never reads fills the socket and the bounded queue: the gateway closes
    it (code 4008 when it can still say so) and the mock sees the upstream request end
    early, not run to completion."""
    # 40,000 tokens at 0.25 ms: 10 s if nothing cut it. The kernel's socket buffers take
    # a few MB before the gateway's writes block at all.
    headers = {"X-Mock-Tokens": "40000", "X-Mock-Token-Ms": "0.25"}
    with gateway(mock, send_timeout_s=0.5, ws_queue_frames=8) as server:
        sock = _raw_ws(server, headers)
        before = len(mock.log(1000))
        _send_text(sock, json.dumps({"type": "create", "id": "r1", "body": BODY}))
        # The mock logs a request when it ends: wait for that (the gateway cut it, or 10 s
        # of tokens ran out); never read.
        deadline = time.monotonic() + 30
        while len(log := mock.log(1000)) == before and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the mock's log; nothing here to wait on instead
        entry = log[-1]
        sock.close()
    assert entry["outcome"] == "cancelled"
    assert entry["chunks"] < 40000
    assert entry["status"] == 200


def test_heartbeat_closes_a_connection_that_never_answers_pings(mock: MockServer) -> None:
    """The server pings; a peer that never pongs is disconnected after the timeout."""
    with gateway(mock, ws_ping_interval=0.2) as server:
        sock = _raw_ws(server, {})
        sock.settimeout(10)
        seen = b""
        started = time.monotonic()
        while True:
            data = sock.recv(4096)
            if not data:
                break
            seen += data
        elapsed = time.monotonic() - started
        sock.close()
    assert seen[:1] == b"\x89"  # a ping frame came first
    assert elapsed < 5


def test_hundred_streams_cut_at_random_resume_byte_identical(mock: MockServer) -> None:
    """100 WebSocket answers whose connections a TCP proxy cuts at random byte offsets:
    every client resumes on a new connection and ends with the fault-free answer, each
    event exactly once."""
    import asyncio

    from tests.cluster import FaultProxy
    from tests.wsloss import cut_first_connections, run_ws_loss

    bodies = [
        {**BODY, "messages": [{"role": "user", "content": f"Question {i} about sizes"}]}
        for i in range(100)
    ]
    with gateway(mock) as server:
        port = int(server.url.rsplit(":", 1)[1])
        expected = [reference(server, b) for b in bodies]
        with FaultProxy(("127.0.0.1", port), cut_first_connections(7, 400, 1_200)) as proxy:
            run = asyncio.run(
                run_ws_loss(
                    proxy.url.replace("http", "ws") + "/v1/chat/ws",
                    ws_url(server),
                    bodies,
                    concurrency=100,
                )
            )
            n_cut = proxy.n_cut
    assert n_cut == 100
    assert run.reconnects == n_cut
    assert run.answers == expected
    for events in run.events:
        assert events == list(range(1, len(events) + 1))
