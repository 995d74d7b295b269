"""The live fast path of streamed answers (gateway/direct.py, relay.py `LiveSink`) on a real
uvicorn with the gateway's protocol: the bytes on the wire are well-formed chunked SSE with
consecutive ids and the whole answer, the connection stays usable for the next request, a
reconnect follows live on the same path, and a client that stops reading is still cut."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import gateway_thread as gateway
from unbroken.core import ChatStreamDecoder, ChunkAccumulator
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Stream for a while."}]


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    """A fresh mock per test: one test reads its stream counters."""
    with MockServer(MockConfig(seed=4)) as server:
        yield server


def request_bytes(
    server: ServerThread, method: str, path: str, body: bytes = b"", **headers: str
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reader:
    """A strict HTTP/1.1 response reader over one socket (keep-alive kept)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError("the server closed the connection")
        self.buffer += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def response(self, stop_after: int | None = None) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and the de-chunked body (or the first `stop_after` body bytes)."""
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            return status, headers, self._exactly(int(headers["content-length"]))
        assert headers["transfer-encoding"] == "chunked"
        body = b""
        while True:
            size = int(self._line(), 16)
            data = self._exactly(size)
            assert self._exactly(2) == b"\r\n", "a chunk not followed by CRLF"
            if size == 0:
                return status, headers, body
            body += data
            if stop_after is not None and len(body) >= stop_after:
                return status, headers, body


def events(body: bytes) -> list[tuple[int, bytes]]:
    """(id, data) of each SSE event; every event must carry an id."""
    found = []
    for block in body.split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if not lines:
            continue
        assert lines[0].startswith(b"id: "), block
        assert lines[1].startswith(b"data: "), block
        found.append((int(lines[0][4:]), lines[1][6:]))
    return found


def content(datas: list[bytes]) -> str:
    answer = ChunkAccumulator()
    raw = b"".join(b"data: " + d + b"\n\n" for d in datas)
    for chunk in ChatStreamDecoder().feed(raw):
        answer.feed(chunk)
    return answer.content(0)


def expected(n_tokens: int) -> str:
    return answer_text("deepseek-chat", MESSAGES, config=MockConfig(seed=4), n_tokens=n_tokens)[1]


def metric(server: ServerThread, name: str) -> float:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request_bytes(server, "GET", "/metrics"))
        _, _, body = Reader(sock).response()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_live_answers_are_whole_and_well_framed_on_a_kept_connection(
    upstream: MockServer,
) -> None:
    """Two streamed answers on one connection: valid chunked framing, ids 1..n in order,
    the whole answer then [DONE]; most chunks went out on the direct path."""
    body = json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": True}).encode()
    with gateway(upstream.url) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            reader = Reader(sock)
            for _ in range(2):
                sock.sendall(
                    request_bytes(
                        server,
                        "POST",
                        "/v1/chat/completions",
                        body,
                        X_Mock_Tokens="60",
                        X_Mock_Token_Ms="2",
                    )
                )
                status, headers, raw = reader.response()
                assert status == 200
                assert headers["content-type"].startswith("text/event-stream")
                got = events(raw)
                assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
                assert got[-1][1] == b"[DONE]"
                chunks = [d for _, d in got if d != b"[DONE]" and b'"unbroken":' not in d]
                assert content(chunks) == expected(60)
        direct = metric(server, "unbroken_gateway_chunks_direct_total")
        total = metric(server, "unbroken_gateway_chunks_total")
    # The first events of each answer go through `send` (they carry the headers), and so
    # do its last three (the usage chunk, the final chunk and [DONE]: the response ends in
    # the same write).
    assert total >= 2 * 62
    assert direct >= total - 2 * 5, (direct, total)


def test_an_answer_failing_before_its_first_event_keeps_its_http_status(
    upstream: MockServer,
) -> None:
    """The first events start the response from the producer's task; an upstream that
    refuses the request at once still gets the client a real HTTP error status (not a 200
    with an error event), and the next answer on the connection starts normally."""
    body = json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": True}).encode()
    with (
        gateway(upstream.url) as server,
        socket.create_connection((server.host, server.port), timeout=10) as sock,
    ):
        reader = Reader(sock)
        sock.sendall(
            request_bytes(server, "POST", "/v1/chat/completions", body, X_Mock_Fault="400")
        )
        status, headers, raw = reader.response()
        assert status == 400, raw[:300]
        assert headers["content-type"] == "application/json"
        assert json.loads(raw)["error"]["code"] == "bad_request"
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions", body, X_Mock_Tokens="5"))
        status, _, raw = reader.response()
    assert status == 200
    got = events(raw)
    assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
    assert got[-1][1] == b"[DONE]"


def test_a_reconnect_follows_the_live_answer_directly(upstream: MockServer) -> None:
    """A reader that reconnects with Last-Event-ID mid-answer gets exactly the rest."""
    body = json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": True}).encode()
    with gateway(upstream.url) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as first:
            first.sendall(
                request_bytes(
                    server,
                    "POST",
                    "/v1/chat/completions",
                    body,
                    X_Mock_Tokens="150",
                    X_Mock_Token_Ms="10",
                    X_Unbroken_Resumable="1",
                )
            )
            _, headers, head = Reader(first).response(stop_after=600)
        stream_id = headers["x-unbroken-stream-id"]
        seen = events(head.rsplit(b"\n\n", 1)[0] + b"\n\n")
        last = seen[-1][0]
        with socket.create_connection((server.host, server.port), timeout=10) as second:
            second.sendall(
                request_bytes(
                    server,
                    "GET",
                    f"/v1/streams/{stream_id}",
                    Authorization="Bearer x",
                    Accept="text/event-stream",
                    Last_Event_ID=str(last),
                )
            )
            status, _, rest = Reader(second).response()
        assert status == 200
        got = seen + events(rest)
        assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
        chunks = [d for _, d in got if d != b"[DONE]" and b'"unbroken":' not in d]
        assert content(chunks) == expected(150)
        assert metric(server, "unbroken_gateway_chunks_direct_total") > 0


def test_a_client_that_stops_reading_is_still_cut(upstream: MockServer) -> None:
    """The direct path gives way when the client stops draining: the client is cut after
    send_timeout_s and the upstream cancelled, with far less than the answer pulled."""
    with gateway(upstream.url, send_timeout_s=0.5, stream_buffer_bytes=64 * 1024) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        body = json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": True})
        sock.sendall(
            request_bytes(
                server,
                "POST",
                "/v1/chat/completions",
                body.encode(),
                X_Mock_Tokens="300000",
                # Paced (about 15 s for the whole answer), so what is pulled before the
                # cut does not depend on how fast a loaded machine reads the upstream.
                X_Mock_Token_Ms="0.05",
            )
        )
        try:
            deadline = time.monotonic() + 10
            while int(upstream.stats()["streams"]["cancelled"]) < 1:
                assert time.monotonic() < deadline, "the upstream was never cancelled"
                time.sleep(0.02)  # polling the mock's counters; no event to wait on
        finally:
            sock.close()
        assert int(upstream.stats()["bytes_sent"]) < 25_000_000


class _HeldEnd:
    """A pass-through upstream in front of `mock` that holds back the end of each response
    body (its chunked terminator `0\\r\\n\\r\\n`) until `release`: the upstream's usage chunk
    and its body's end then reach the gateway in two reads, deterministically."""

    def __init__(self, mock: MockServer) -> None:
        self._mock = mock
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.all_but_end_sent = threading.Event()
        self._release = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self._server.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._server.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(65536)
                if not data:
                    return  # a connection opened ahead and never used
                request += data
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            address = self._mock.url.removeprefix("http://").rsplit(":", 1)
            with socket.create_connection((address[0], int(address[1]))) as up:
                up.sendall(head + b"\r\n\r\n" + body)
                response = b""
                while not response.endswith(b"\r\n0\r\n\r\n"):
                    data = up.recv(65536)
                    assert data, "the mock closed mid-response"
                    response += data
            conn.sendall(response[:-5])
            self.all_but_end_sent.set()
            self._release.wait()
            conn.sendall(response[-5:])
            conn.recv(1)  # until the gateway closes or reuses (then closes) it


def test_an_answers_usage_chunk_goes_out_with_its_end_when_the_upstream_ends_later(
    upstream: MockServer,
) -> None:
    """The upstream's usage chunk and its body's end come in two reads: the live reader
    writes the usage event, the final event, [DONE] and the chunked body's end in one write
    when the answer ends (not the usage event alone as it comes, then the rest); the
    connection stays usable."""
    held = _HeldEnd(upstream)
    body = json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": True}).encode()
    try:
        with (
            gateway(held.url) as server,
            socket.create_connection((server.host, server.port), timeout=10) as sock,
        ):
            sock.sendall(
                request_bytes(server, "POST", "/v1/chat/completions", body, X_Mock_Tokens="8")
            )
            assert held.all_but_end_sent.wait(10)
            # Everything the gateway writes before the upstream's end: no usage event
            # (a second's grace for a write that should not come).
            early = b""
            sock.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                while b'"prompt_tokens"' not in early:
                    data = sock.recv(65536)
                    assert data
                    early += data
            assert b'"prompt_tokens"' not in early
            assert early.startswith(b"HTTP/1.1 200 ")
            held.release()
            sock.settimeout(10)
            last = sock.recv(65536)  # the answer's end: one write
            assert b'"prompt_tokens"' in last
            assert last.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            reader = Reader(sock)
            reader.buffer = early + last
            status, _, sse = reader.response()
            assert status == 200
            assert reader.buffer == b""
            got = events(sse)
            assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
            assert got[-1][1] == b"[DONE]"
            assert content([d for _, d in got[:-1]]) == expected(8)
            # The connection is kept for the next request.
            sock.sendall(request_bytes(server, "GET", "/metrics"))
            status, _, _ = reader.response()
            assert status == 200
    finally:
        held.close()
