"""The gateway's lifecycle with real servers: a client that leaves cancels its upstream
request within a second, keep-alives flow while the upstream is queued, a client that stops
reading is cut after the send timeout (and its upstream cancelled), SIGTERM drains a real
subprocess, and a public bind without keys is refused."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.servers import raw_exchange
from tests.support import gateway_thread as gateway
from unbroken.core import ChatStreamDecoder, ChunkAccumulator
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Stream for a while."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
SERVE = (
    "import sys, typer; from unbroken.cli.gateway_cmds import serve; "
    "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
)


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    """A fresh mock per test: these tests read its stream counters."""
    with MockServer(MockConfig(seed=4)) as server:
        yield server


def wait_for(predicate: Any, timeout_s: float) -> float:
    """Poll `predicate` until true; returns the seconds it took (fails past the timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.02)  # polling another server's counters; no event to wait on
    return time.monotonic() - start


def cancelled(mock: MockServer) -> int:
    return int(mock.stats()["streams"]["cancelled"])


def test_client_leaving_mid_stream_cancels_upstream(upstream: MockServer) -> None:
    """Closing the downstream connection mid-stream cancels the upstream in under 1 s."""
    with gateway(upstream.url) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        headers = {"X-Mock-Tokens": "2000", "X-Mock-Token-Ms": "20"}
        with client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: {")
                if seen == 5:
                    break
        left = time.monotonic()
        took = wait_for(lambda: cancelled(upstream) == 1, 3.0)
        assert took < 1.0, f"upstream cancelled {took:.2f} s after the client left"
        assert time.monotonic() - left < 3.0
        metrics = client.get("/metrics").text
    assert 'unbroken_gateway_streams_total{outcome="client_gone"} 1.0' in metrics


def test_client_leaving_while_queued_cancels_upstream(upstream: MockServer) -> None:
    """A client that leaves before the first token (upstream queued) cancels it too."""
    with gateway(upstream.url, keepalive_s=0.2) as server:
        parts = server.url.removeprefix("http://").split(":")
        with socket.create_connection((parts[0], int(parts[1]))) as sock:
            payload = b'{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"q"}]}'
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"X-Mock-Queue-Ms: 10000\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload
            )
            sock.settimeout(5)
            assert b"keep-alive" in sock.recv(4096) + sock.recv(4096)
        took = wait_for(lambda: cancelled(upstream) == 1, 3.0)
        assert took < 1.0


def test_keepalives_while_the_upstream_is_queued(upstream: MockServer) -> None:
    """While the upstream queues the request, the client gets headers and keep-alive
    comments every keepalive_s, then the whole answer."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MockConfig(seed=4))
    with gateway(upstream.url, keepalive_s=0.15) as server:
        result = raw_exchange(
            server.url, BODY, path="/v1/chat/completions", headers={"X-Mock-Queue-Ms": "1000"}
        )
    assert result.status == 200
    assert result.first_byte_s is not None
    assert result.first_byte_s < 0.6
    first_data = result.body.index(b"data: {")
    assert result.body[:first_data].count(b": keep-alive\n") >= 4
    assert result.body.endswith(b"data: [DONE]\n\n")
    answer = ChunkAccumulator()
    for chunk in ChatStreamDecoder().feed(result.body):
        answer.feed(chunk)
    assert answer.content(0) == content


def test_client_that_stops_reading_is_cut_and_its_upstream_cancelled(
    upstream: MockServer,
) -> None:
    """A client that never reads is cut after send_timeout_s; the upstream is cancelled
    and far less than the whole answer was ever pulled from it."""
    with gateway(upstream.url, send_timeout_s=0.5, stream_buffer_bytes=64 * 1024) as server:
        parts = server.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((parts[0], int(parts[1])))
        payload = (
            b'{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"x"}]}'
        )
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            # Paced (about 15 s for the whole answer), so what is pulled before the cut does
            # not depend on how fast the machine reads the upstream.
            b"X-Mock-Tokens: 300000\r\nX-Mock-Token-Ms: 0.05\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        try:
            wait_for(lambda: cancelled(upstream) == 1, 10.0)
        finally:
            sock.close()
        sent = int(upstream.stats()["bytes_sent"])
    # The whole answer is ~45 MB; socket buffers on loopback hold a few MB at most.
    assert sent < 25_000_000, sent


def _start_gateway(mock_url: str, *args: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    environ = {
        **os.environ,
        "DEEPSEEK_API_KEY": "sk-up",
        "UNBROKEN_GATEWAY_FORWARD_HEADERS": "x-mock-*",
        **env,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "--port",
            "0",
            "--upstream",
            mock_url,
            "--log-level",
            "warning",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "unbroken gateway on " not in line:
        _, errors = proc.communicate(timeout=10)
        pytest.fail(f"the gateway did not start: {line!r} {errors}")
    url = line.split("unbroken gateway on ")[1].split()[0]
    return proc, url


def test_sigterm_drains_in_flight_streams(upstream: MockServer) -> None:
    """After SIGTERM the gateway refuses new connections, lets an in-flight stream finish
    whole, and exits cleanly."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MockConfig(seed=4))
    proc, url = _start_gateway(
        upstream.url, UNBROKEN_GATEWAY_DRAIN_TIMEOUT_S="20", UNBROKEN_GATEWAY_DRAIN_GRACE_S="0.5"
    )
    try:
        with (
            httpx.Client(base_url=url, timeout=20) as client,
            client.stream(
                "POST", "/v1/chat/completions", json=BODY, headers={"X-Mock-Token-Ms": "15"}
            ) as response,
        ):
            # Raw bytes: the answer holds U+2028, which line-splitting helpers break on.
            reads = response.iter_raw()
            body = [next(reads)]
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _refused(url), 5.0)
            body.extend(reads)
        raw = b"".join(body)
        assert raw.endswith(b"data: [DONE]\n\n")
        # uvicorn re-raises the SIGTERM after its graceful shutdown (the Unix convention).
        assert proc.wait(10) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)
    answer = ChunkAccumulator()
    for chunk in ChatStreamDecoder().feed(raw):
        answer.feed(chunk)
    assert answer.content(0) == content


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=1)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        # A connection that raced the listener's close is accepted by the kernel and then
        # closed unanswered, or reset when the listener closes with it still queued: both
        # are refusals (the callers check when it happened).
        return True
    return False


@contextlib.contextmanager
def long_answer(url: str, timeout: float = 30) -> Iterator[httpx.Response]:
    """A chat answer streaming from the gateway at `url`: 5,000 tokens 20 ms apart, longer
    than any drain a test sets."""
    with (
        httpx.Client(base_url=url, timeout=timeout) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=BODY,
            headers={"X-Mock-Tokens": "5000", "X-Mock-Token-Ms": "20"},
        ) as response,
    ):
        yield response


def test_sigterm_ends_streams_past_the_drain_timeout(upstream: MockServer) -> None:
    """A stream still running at the drain deadline gets a shutting_down error event and
    the process exits soon after."""
    proc, url = _start_gateway(
        upstream.url, UNBROKEN_GATEWAY_DRAIN_TIMEOUT_S="0.5", UNBROKEN_GATEWAY_DRAIN_GRACE_S="0"
    )
    try:
        with long_answer(url, timeout=20) as response:
            lines = response.iter_lines()
            next(lines)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        ended = time.monotonic() - signalled
        assert any("shutting_down" in line for line in rest)
        assert 0.4 < ended < 3.0
        # uvicorn re-raises the SIGTERM after its graceful shutdown (the Unix convention).
        assert proc.wait(10) in (0, -signal.SIGTERM)
        assert cancelled(upstream) == 1
    finally:
        _stop(proc)


def test_sigterm_keeps_the_listener_open_for_the_grace_period(upstream: MockServer) -> None:
    """Right after SIGTERM /readyz is 503 and a new chat gets 503 with Retry-After on a
    listener that still accepts; once the grace period is over connections are refused."""
    proc, url = _start_gateway(upstream.url, UNBROKEN_GATEWAY_DRAIN_GRACE_S="2")
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            assert client.get("/readyz").status_code == 200
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            ready = wait_for(lambda: client.get("/readyz").status_code == 503, 1.0)
            # A new connection after SIGTERM is still accepted, and told to go elsewhere.
            with httpx.Client(base_url=url, timeout=5) as fresh:
                chat = fresh.post("/v1/chat/completions", json=BODY)
            asked = time.monotonic() - signalled
            refused_after = wait_for(lambda: _refused(url), 8.0) + asked
        assert ready < 1.0
        assert chat.status_code == 503
        assert chat.headers["retry-after"] == "1"
        assert chat.json()["error"]["code"] == "shutting_down"
        assert 1.8 < refused_after < 6.0
        assert proc.wait(10) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)


def test_public_bind_without_keys_is_refused() -> None:
    """Serving a non-loopback address without gateway keys exits 2 with the reason."""
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, "--host", "0.0.0.0", "--port", "0"],  # noqa: S104 - refused before binding
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")},
    )
    assert proc.returncode == 2
    assert "refusing to serve 0.0.0.0 without gateway keys" in " ".join(proc.stderr.split())
