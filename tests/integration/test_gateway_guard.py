"""The gateway's HTTP-layer limits on a real uvicorn with the guarded protocol: oversized
heads get 431, slow heads and stalled bodies 408 then a close, connection caps 503, parser
errors an OpenAI-shaped JSON 400, and a normal client is served throughout."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from unbroken.gateway.app import create_app
from unbroken.gateway.guard import LogLimiter, guarded_protocol
from unbroken.mock import MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings

pytestmark = pytest.mark.integration


@contextmanager
def guarded(mock_url: str, keep_alive_s: float = 5.0, **options: Any) -> Iterator[ServerThread]:
    settings = Settings(api_key="sk-up", base_url=mock_url, gateway=GatewaySettings(**options))
    app = create_app(settings)
    with ServerThread(
        app, lifespan="on", http=guarded_protocol(app.guard), timeout_keep_alive=keep_alive_s
    ) as server:
        yield server


def connect(server: ServerThread, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        (server.host, server.port), timeout=10, source_address=(source, 0)
    )
    return sock


def read_all(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, json.loads(body)


def test_a_one_megabyte_header_gets_431_without_reading_it_all(mock: MockServer) -> None:
    """A 1 MB header is refused with a JSON 431 once the head limit is passed."""
    with guarded(mock.url, max_head_bytes=8192) as server, connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        try:
            while sent < 1024 * 1024:
                sock.sendall(b"a" * 16384)
                sent += 16384
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = parse(read_all(sock))
    assert status == 431
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "header_too_large"
    assert body["error"]["type"] == "invalid_request_error"


def test_a_head_within_the_limit_is_served(mock: MockServer) -> None:
    """A 6 KB header under an 8 KB limit is served normally."""
    with guarded(mock.url, max_head_bytes=8192) as server:
        response = httpx.get(f"{server.url}/healthz", headers={"X-Pad": "a" * 6000})
    assert response.status_code == 200


def test_too_many_header_fields_get_431(mock: MockServer) -> None:
    """More header fields than `max_headers` is a 431 naming the limit."""
    with guarded(mock.url, max_headers=20) as server, connect(server) as sock:
        fields = b"".join(b"X-%d: 1\r\n" % i for i in range(30))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, _, body = parse(read_all(sock))
    assert status == 431
    assert body["error"]["code"] == "too_many_headers"


def test_max_headers_fields_are_served_one_more_is_431(mock: MockServer) -> None:
    """The limit counts every field of a request's head, Host included."""
    with guarded(mock.url, max_headers=20) as server:
        for n_fields, status in ((20, 200), (21, 431)):
            fields = b"".join(b"X-%d: 1\r\n" % i for i in range(n_fields - 2))
            with connect(server) as sock:
                sock.sendall(
                    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                    + fields
                    + b"\r\n"
                )
                got, _, _ = parse(read_all(sock))
            assert got == status, n_fields


def test_slow_heads_get_408_and_are_closed_while_others_are_served(mock: MockServer) -> None:
    """50 slowloris connections (and a silent one) are all answered 408 and closed within
    the head timeout, and a normal request meanwhile gets its answer."""
    with guarded(mock.url, head_timeout_s=1.0) as server:
        slow = [connect(server) for _ in range(50)]
        silent = connect(server)
        started = time.monotonic()
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        normal = httpx.get(f"{server.url}/healthz", timeout=5)
        results = [read_all(sock, 5.0) for sock in [*slow, silent]]
        took = time.monotonic() - started
        for sock in [*slow, silent]:
            sock.close()
    assert normal.status_code == 200
    statuses = {parse(raw)[0] for raw in results}
    assert statuses == {408}
    assert parse(results[0])[2]["error"]["code"] == "request_timeout"
    assert took < 3.0


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length (the connection stays open): status, body."""
    sock.settimeout(5.0)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


def closed_after(sock: socket.socket, timeout_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes `sock`, and what it sent before."""
    started = time.monotonic()
    raw = read_all(sock, timeout_s)
    return time.monotonic() - started, raw


def test_idle_keep_alive_connections_close_and_a_next_head_is_timed(mock: MockServer) -> None:
    """After a response, an idle connection is closed silently at the keep-alive timeout;
    on another one the next request's first bytes start the (shorter) head timer: 408."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with (
        guarded(mock.url, keep_alive_s=1.0, head_timeout_s=0.3) as server,
        connect(server) as idle,
        connect(server) as slow,
    ):
        idle.sendall(request)
        slow.sendall(request)
        assert read_response(idle)[0] == 200
        assert read_response(slow)[0] == 200
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and no more
        slow_s, slow_raw = closed_after(slow, 5.0)
        idle_s, idle_raw = closed_after(idle, 5.0)
    assert parse(slow_raw)[0] == 408
    assert slow_s < 0.9  # the head timer, not the keep-alive one
    assert idle_raw == b""
    assert 0.3 < idle_s + slow_s < 3.0  # ~1 s after its response


def test_a_stalled_body_gets_408(mock: MockServer) -> None:
    """A body that stops arriving is answered 408 after the body timeout."""
    with guarded(mock.url, body_timeout_s=0.5) as server, connect(server) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mo'
        )
        status, _, body = parse(read_all(sock, 5.0))
    assert status == 408
    assert body["error"]["code"] == "request_timeout"


def test_connections_past_the_per_client_cap_get_503(mock: MockServer) -> None:
    """A client address over its connection cap is refused at once; others are not."""
    with guarded(mock.url, max_connections_per_client=3) as server:
        held = [connect(server, "127.0.0.2") for _ in range(3)]
        with connect(server, "127.0.0.2") as extra:
            status, headers, body = parse(read_all(extra, 5.0))
        other = httpx.get(f"{server.url}/healthz", timeout=5)
        for sock in held:
            sock.close()
    assert status == 503
    assert headers["retry-after"] == "1"
    assert body["error"]["code"] == "too_many_client_connections"
    assert other.status_code == 200


def test_connections_past_the_process_cap_get_503(mock: MockServer) -> None:
    """The process-wide cap refuses the connection past it."""
    with guarded(mock.url, max_connections=2) as server:
        held = [connect(server) for _ in range(2)]
        with connect(server) as extra:
            status, _, body = parse(read_all(extra, 5.0))
        for sock in held:
            sock.close()
    assert status == 503
    assert body["error"]["code"] == "too_many_connections"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
    ],
)
def test_what_the_parser_refuses_is_an_openai_shaped_json_error(
    mock: MockServer, request_bytes: bytes, status: int
) -> None:
    """Malformed requests and unsupported versions get a JSON error, never a 200."""
    with guarded(mock.url) as server, connect(server) as sock:
        sock.sendall(request_bytes)
        got, headers, body = parse(read_all(sock, 5.0))
    assert got == status
    assert headers["content-type"] == "application/json"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_the_log_limiter_lets_a_burst_through_then_counts_what_it_dropped() -> None:
    """At most `burst` records of one template per window; the next window says how many
    were suppressed."""
    now = [0.0]
    limiter = LogLimiter(burst=3, window_s=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("x", logging.ERROR, __file__, 1, msg, None, None)

    passed = [limiter.filter(record("boom %s")) for _ in range(100)]
    assert sum(passed) == 3
    assert limiter.filter(record("other"))
    now[0] = 11.0
    first = record("boom %s")
    assert limiter.filter(first)
    assert "97 similar messages suppressed" in str(first.msg)


def test_websocket_upgrades_pass_the_guard_and_stay_counted(mock: MockServer) -> None:
    """A WebSocket upgrade is served through the guarded protocol; the open socket counts
    against the per-client cap until it closes; in no-key mode a foreign Host is refused."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    settings = Settings(
        api_key="sk-up",
        base_url=mock.url,
        gateway=GatewaySettings(max_connections_per_client=2, head_timeout_s=0.5),
    )
    app = create_app(settings)
    with ServerThread(
        app, lifespan="on", http=guarded_protocol(app.guard), ws="websockets-sansio"
    ) as server:
        ws_url = server.url.replace("http://", "ws://") + "/v1/chat/ws"
        with ws_connect(ws_url, open_timeout=5) as socket_:
            with connect(server) as held, connect(server) as extra:
                status, _, body = parse(read_all(extra, 5.0))
                assert status == 503
                assert body["error"]["code"] == "too_many_client_connections"
                held.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert held.recv(12).startswith(b"HTTP/1.1 200")
            # Past the head timeout the socket is still open: timers stop at the upgrade.
            time.sleep(0.8)  # outlasting the head timeout is what is under test
            socket_.ping().wait(5)
        assert app.guard.n_connections <= 1
        rebinding = ws_url.replace("127.0.0.1", "localhost")
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(rebinding, open_timeout=5, additional_headers={"Host": "evil.example"})
        assert refused.value.response.status_code == 403


def test_a_connection_serves_requests_after_a_long_answer(mock: MockServer) -> None:
    """A streamed answer that outlasts the head timeout (the guard then lets the connection's
    parser go, between messages) is followed on the same connection by another request, sent
    while the answer still streams (pipelined) and answered after it, then by a third."""
    body = json.dumps(
        {"model": "deepseek-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    chat = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nX-Mock-Token-Ms: 40\r\nX-Mock-Tokens: 30\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with (
        guarded(mock.url, head_timeout_s=0.3, forward_headers=["x-mock-*"]) as server,
        connect(server) as sock,
    ):
        sock.sendall(chat)
        sock.settimeout(10.0)
        started = time.monotonic()
        streamed = b""
        # Past the head timeout, with the answer still streaming (30 tokens, 40 ms apart).
        while time.monotonic() - started < 0.6 and b"data: [DONE]" not in streamed:
            streamed += _recv(sock)
        assert b"data: [DONE]" not in streamed, "the answer ended before the head timeout"
        sock.sendall(health)
        # Until the answer's last chunk: the next response may come in the same read. SSE
        # keep-alives would keep a stalled answer's reads going, so the wait has an end.
        deadline = started + 20.0
        while b"\r\n0\r\n\r\n" not in streamed:
            streamed += _recv_until(sock, deadline, streamed)
        answer, _, second = streamed.partition(b"\r\n0\r\n\r\n")
        assert b"data: [DONE]" in answer
        while b'"status":"ok"' not in second:
            second += _recv_until(sock, deadline, streamed + second)
        assert second.startswith(b"HTTP/1.1 200")
        sock.sendall(health)
        assert read_response(sock)[0] == 200


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the gateway closed the connection"
    return data


def _recv_until(sock: socket.socket, deadline: float, seen: bytes) -> bytes:
    """One read, failing with the last bytes seen once `deadline` (monotonic) has passed."""
    assert time.monotonic() < deadline, f"no end by the deadline; last bytes: {seen[-600:]!r}"
    return _recv(sock)


def test_a_connection_idle_after_a_streamed_answer_closes_at_the_keep_alive_timeout(
    mock: MockServer,
) -> None:
    """The streamed answer's start lets the connection's timer go (`streaming_started`);
    the answer's end arms the keep-alive timer all the same."""
    body = json.dumps(
        {"model": "deepseek-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    chat = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nX-Mock-Token-Ms: 10\r\nX-Mock-Tokens: 20\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    with (
        guarded(mock.url, keep_alive_s=1.0, forward_headers=["x-mock-*"]) as server,
        connect(server) as sock,
    ):
        sock.sendall(chat)
        sock.settimeout(10.0)
        streamed = b""
        while b"\r\n0\r\n\r\n" not in streamed:
            streamed += _recv(sock)
        idle_s, rest = closed_after(sock, 5.0)
    assert b"data: [DONE]" in streamed
    assert rest == b""
    assert 0.5 < idle_s < 3.0  # ~1 s after the answer's end


def _chat(tokens: int, *, close: bool = False) -> bytes:
    body = json.dumps(
        {"model": "deepseek-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n%bX-Mock-Tokens: %d\r\n" % (
        b"Connection: close\r\n" if close else b"",
        tokens,
    ) + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def _answers(raw: bytes) -> list[int]:
    """The content chunks of each streamed response in `raw`, in order."""
    return [
        part.count(b'"content":"') - part.count(b'"content":""')
        for part in raw.split(b"HTTP/1.1 200 OK")[1:]
    ]


def test_requests_sharing_reads_get_their_own_header_fields(mock: MockServer) -> None:
    """Each request is answered by its own header fields (here, the mock's token count
    forwarded from `X-Mock-Tokens`) however the client's writes cut them: two in one
    write, a body ending in the write that holds the next request whole, a head cut in
    two, a head arriving with half its body."""
    first, second, third, fourth = _chat(2), _chat(5), _chat(3), _chat(4, close=True)
    with (
        guarded(mock.url, forward_headers=["x-mock-*"]) as server,
        connect(server) as sock,
    ):
        # Writes sent at once (no Nagle delay): mostly separate reads, which may also
        # come together; each request is answered by its own fields either way.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(first + second + third[:-7])
        sock.sendall(third[-7:] + fourth[:30])
        sock.sendall(fourth[30:-5])
        sock.sendall(fourth[-5:])
        raw = read_all(sock)
    assert _answers(raw) == [2, 5, 3, 4]
