"""The gateway on its compiled chunk path (mypyc, tools/compile_native.py): a real
`unbroken serve` process that loads the extensions - checked in the process's memory map,
not only in what it logs - relays answers that are cut mid-stream and resumed from the log
byte-identical, cuts a client that stops reading, cancels the upstream when a client
disconnects, and books the answers' usage. The rest of the suite runs the sources (coverage
measures them); this is where the build's extensions run.

Without a build (no C compiler) these tests skip; CI (UNBROKEN_REQUIRE_BINARIES=1) builds
the extensions and fails them instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import FaultProxy, Reader, read_answer
from tests.integration.test_gateway_streams import fold, parse_events
from tests.unit.test_native import built
from unbroken import _native
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.settings import hash_key

pytestmark = pytest.mark.integration

SERVE = "from unbroken.cli import main; main()"
MOCK = MockConfig(seed=13)
KEY = "sk-gw-native-3f9a1c"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Relay this through compiled code."}]
BODY = {
    "model": "deepseek-chat",
    "messages": MESSAGES,
    "stream": True,
    "stream_options": {"include_usage": True},
}
TOKENS = 60
PACED = {"X-Mock-Tokens": str(TOKENS), "X-Mock-Token-Ms": "15"}


@dataclass
class Gateway:
    """An `unbroken serve` process: its pid, URL and stderr (the log) file."""

    proc: subprocess.Popen[str]
    url: str
    log: Path

    def mapped(self) -> set[str]:
        """The files mapped into the process's memory (loaded shared objects among them)."""
        lines = Path(f"/proc/{self.proc.pid}/maps").read_text(encoding="utf-8").splitlines()
        return {parts[5] for line in lines if len(parts := line.split(maxsplit=5)) == 6}


# Modules every streamed answer runs through. unbroken/_native.py loads all the build's
# modules compiled or none, so these being loaded from the build means all the others are.
# (Only those imported first by the sources: a module that a compiled one imports first,
# as gateway/relay.py does stores/streamlog.py, is made from mypyc's shared library, whose
# mapping is checked too, without its own file being mapped.)
RELAYING = (
    "unbroken.core.stream",
    "unbroken.gateway.direct",
    "unbroken.gateway.relay",
    "unbroken.gateway.upstream",
)


def extensions(names: tuple[str, ...] | None = None) -> set[str]:
    """The extension files of the build: those of the modules `names` (all by default) and
    mypyc's shared library."""
    manifest = json.loads(_native.MANIFEST.read_text(encoding="utf-8"))
    modules = manifest["modules"]
    files = [entry["file"] for name, entry in modules.items() if names is None or name in names]
    files += list(manifest["shared"].values())
    return {str(_native.DIRECTORY / file) for file in files}


@contextmanager
def serve(upstream: str, log: Path, *, pure: bool) -> Iterator[Gateway]:
    """`unbroken serve` on a free port with one gateway key, compiled or (`pure`) not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
    env.update(
        PYTHONPATH=os.pathsep.join(sys.path),
        DEEPSEEK_API_KEY="sk-up",
        UNBROKEN_GATEWAY_KEYS=f"ci={hash_key(KEY)}",
        UNBROKEN_GATEWAY_FORWARD_HEADERS="x-mock-*",
        # A client that stops reading is cut after half a second (the default is 30 s).
        UNBROKEN_GATEWAY_SEND_TIMEOUT_S="0.5",
        UNBROKEN_GATEWAY_STREAM_BUFFER_BYTES=str(64 * 1024),
    )
    if pure:
        env[_native.PURE_ENV] = "1"
    command = [sys.executable, "-c", SERVE, "serve", "--port", "0", "--upstream", upstream]
    with log.open("w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "unbroken gateway on " not in line:
            proc.kill()
            pytest.fail(f"the gateway did not start: {line!r} {log.read_text(encoding='utf-8')}")
        yield Gateway(proc, line.split("unbroken gateway on ")[1].split()[0], log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def read(client: httpx.Client, headers: dict[str, str]) -> list[tuple[int, bytes]]:
    """One whole streamed answer: its events (id, data)."""
    with client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as response:
        assert response.status_code == 200
        return parse_events(response.read())


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MOCK) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One compiled gateway for the module, checked to run the extensions after an answer
    (by then every chunk-path module is imported)."""
    built()
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/<pid>/maps (Linux) to see what the gateway loaded")
    log = tmp_path_factory.mktemp("native") / "gateway.log"
    with serve(upstream.url, log, pure=False) as served:
        with httpx.Client(base_url=served.url, timeout=20) as client:
            read(client, AUTH)
        missing = extensions(RELAYING) - served.mapped()
        assert not missing, f"the gateway did not load {sorted(missing)}"
        n = len(json.loads(_native.MANIFEST.read_text(encoding="utf-8"))["modules"])
        assert f"chunk path: compiled with mypyc ({n} modules)" in log.read_text(encoding="utf-8")
        yield served


def metric(client: httpx.Client, line: str) -> float:
    """The value of one sample of the gateway's /metrics (0 when absent)."""
    for sample in client.get("/metrics").text.splitlines():
        if sample.startswith(line + " "):
            return float(sample.rsplit(" ", 1)[1])
    return 0.0


def wait_cancelled(upstream: MockServer, n: int) -> None:
    deadline = time.monotonic() + 10
    while int(upstream.stats()["streams"]["cancelled"]) < n:
        assert time.monotonic() < deadline, "the upstream was never cancelled"
        time.sleep(0.02)  # polling the mock's counters; no event to wait on


def test_a_pure_gateway_loads_no_extension(upstream: MockServer, tmp_path: Path) -> None:
    """What the fixture's check tells apart: with UNBROKEN_PURE_PYTHON=1 the same gateway
    maps none of the build's files and says it runs the sources."""
    built()
    with serve(upstream.url, tmp_path / "gateway.log", pure=True) as served:
        with httpx.Client(base_url=served.url, timeout=20) as client:
            read(client, AUTH)
        assert not extensions() & served.mapped()
        log = served.log.read_text(encoding="utf-8")
        assert f"chunk path: pure Python ({_native.PURE_ENV}=1)" in log


def test_answers_cut_mid_stream_resume_byte_identical(
    upstream: MockServer, gateway: Gateway
) -> None:
    """A fault proxy resets each of 8 streams once at a random byte offset; each client
    reconnects with its last event id and gets the rest from the log: the whole answer,
    the same bytes as the log's replay, with no second upstream request."""
    upstream.reset()
    n = 8
    rng = random.Random(13)
    posts = iter([rng.randrange(600, 6000) for _ in range(n)])

    def cut(_: int, head: bytes) -> int | None:
        return next(posts, None) if head.startswith(b"POST ") else None

    async def answers(url: str) -> list[Reader]:
        headers = {**PACED, "X-Unbroken-Resumable": "1"}
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=AUTH) as client:
            return list(
                await asyncio.gather(*(read_answer(client, BODY, headers) for _ in range(n)))
            )

    host, port = gateway.url.removeprefix("http://").split(":")
    with FaultProxy((host, int(port)), cut) as proxy:
        readers = asyncio.run(answers(proxy.url))
        assert proxy.n_cut == n
    _, text = answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=TOKENS)
    with httpx.Client(base_url=gateway.url, timeout=20, headers=AUTH) as client:
        for reader in readers:
            assert reader.done
            assert reader.reconnects >= 1
            payloads = [reader.events[i] for i in sorted(reader.events)]
            assert fold(payloads).content(0) == text
            replay = parse_events(client.get(f"/v1/streams/{reader.stream_id}").content)
            assert replay == sorted(reader.events.items())
    assert upstream.stats()["requests_total"] == n


def test_a_client_that_stops_reading_is_cut(upstream: MockServer, gateway: Gateway) -> None:
    """A client that stops draining is cut after send_timeout_s and the upstream
    cancelled, with far less than the answer pulled."""
    upstream.reset()
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        before = metric(client, 'unbroken_gateway_streams_total{outcome="slow_client"}')
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps(BODY).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer {KEY}\r\n"
        # Paced (about 15 s for the whole answer), so what is pulled before the cut does
        # not depend on how fast a loaded machine reads the upstream.
        "X-Mock-Tokens: 300000\r\nX-Mock-Token-Ms: 0.05\r\n\r\n"
    )
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(head.encode() + body)
        wait_cancelled(upstream, 1)
    assert int(upstream.stats()["bytes_sent"]) < 25_000_000
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        after = metric(client, 'unbroken_gateway_streams_total{outcome="slow_client"}')
    assert after == before + 1


def test_a_disconnect_cancels_the_upstream(upstream: MockServer, gateway: Gateway) -> None:
    """Without the resumable opt-in, a client that goes away mid-answer has its upstream
    cancelled."""
    upstream.reset()
    slow = {**AUTH, "X-Mock-Tokens": "2000", "X-Mock-Token-Ms": "20"}
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        before = metric(client, 'unbroken_gateway_streams_total{outcome="client_gone"}')
        with client.stream("POST", "/v1/chat/completions", json=BODY, headers=slow) as response:
            raw = b""
            for data in response.iter_raw():
                raw += data
                if raw.count(b"\n\n") >= 3:
                    break
        wait_cancelled(upstream, 1)
        after = metric(client, 'unbroken_gateway_streams_total{outcome="client_gone"}')
    assert after == before + 1
    assert upstream.stats()["streams"]["cancelled"] == 1


def test_usage_is_sent_and_booked(upstream: MockServer, gateway: Gateway) -> None:
    """Each answer ends with its usage chunk, and /v1/usage books what those chunks say."""
    usage_path = "/v1/usage?days=1"
    with httpx.Client(base_url=gateway.url, timeout=20, headers=AUTH) as client:
        before = client.get(usage_path).json()["total"]
        sent: list[dict[str, Any]] = []
        for _ in range(3):
            events = read(client, PACED)
            chunks = [json.loads(data) for _, data in events if data != b"[DONE]"]
            usage = [c["usage"] for c in chunks if c.get("usage")]
            assert len(usage) == 1
            assert usage[0]["completion_tokens"] > 0
            sent.append(usage[0])
        deadline = time.monotonic() + 10
        while (total := client.get(usage_path).json()["total"])["requests"] < (
            before["requests"] + 3
        ):
            assert time.monotonic() < deadline, "the usage was not booked"
            time.sleep(0.05)  # the booking is written after the answer's end
    for field in ("prompt_tokens", "completion_tokens"):
        assert total[field] - before[field] == sum(u[field] for u in sent)


def test_upstream_faults_are_healed_by_the_compiled_sdk_run(
    upstream: MockServer, gateway: Gateway
) -> None:
    """A 503 before the answer and a reset mid-answer are healed on the compiled chunk path
    (the SDK's engine, the attempt, the relay): the client reads the whole answer once, and
    the gateway counts the retry and the resume."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=TOKENS)
    faults = [("503 times=1", "retries"), ("reset after=20 times=1", "resumes")]
    with httpx.Client(base_url=gateway.url, timeout=20, headers=AUTH) as client:
        for spec, counted in faults:
            name = f'unbroken_{counted}_total{{route="default"}}'
            before = metric(client, name)
            headers = {**PACED, "X-Mock-Fault": spec, "X-Mock-Fault-Key": f"native-{counted}"}
            events = read(client, headers)
            assert events[-1][1] == b"[DONE]"
            datas = [data for _, data in events[:-1]]
            assert fold(datas).content(0) == content
            assert metric(client, name) == before + 1


def test_a_live_follower_and_a_stop_run_compiled(upstream: MockServer, gateway: Gateway) -> None:
    """A second client follows a live answer from another connection (GET
    /v1/streams/{id}, reading the log the compiled relay appends to) and DELETE stops it; the follower's response ends with the stop finish and [DONE], the
    upstream is cancelled, and the log replays exactly the ids 1..n."""
    upstream.reset()
    slow = {**AUTH, "X-Mock-Tokens": "2000", "X-Mock-Token-Ms": "20", "X-Unbroken-Resumable": "1"}
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        raw = b""
        with client.stream("POST", "/v1/chat/completions", json=BODY, headers=slow) as response:
            stream_id = response.headers["x-unbroken-stream-id"]
            for data in response.iter_raw():
                raw += data
                if raw.count(b"\n\n") >= 3:
                    break
        first = parse_events(raw[: raw.rindex(b"\n\n") + 2])
        after = {**AUTH, "Last-Event-ID": str(first[-1][0])}
        followed = b""
        with (
            httpx.Client(base_url=gateway.url, timeout=20) as other,
            other.stream("GET", f"/v1/streams/{stream_id}", headers=after) as live,
        ):
            assert live.status_code == 200
            for data in live.iter_raw():
                followed += data
                if followed.count(b"\n\n") == 2:
                    stopped = client.delete(f"/v1/streams/{stream_id}", headers=AUTH)
                    assert stopped.json() == {"id": stream_id, "object": "stream", "stopped": True}
        events = first + parse_events(followed)
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert events[-1][1] == b"[DONE]"
        assert fold([d for _, d in events]).finish_reason(0) == "stop"
        assert upstream.stats()["streams"]["cancelled"] == 1
        replay = parse_events(client.get(f"/v1/streams/{stream_id}", headers=AUTH).content)
        assert replay == events
