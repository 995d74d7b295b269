"""`unbroken serve --workers N` as a real process tree on loopback: connections spread
over the workers, a stream started on one worker is read back through any of them (the
log is in Redis), a killed worker is replaced, SIGTERM stops them all cleanly, and a
memory store with several workers is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from unbroken.mock import MockConfig, MockServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]

BODY = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "Where is my parcel?"}],
    "stream": True,
    "unbroken": {"resumable": True},
}


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "unbroken.cli", "serve", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    with MockServer(MockConfig(seed=4)) as mock:
        config = tmp_path / "unbroken.toml"
        config.write_text(
            f'[gateway]\nstore = "{redis_url}"\nsessions = "sqlite:{tmp_path / "s.db"}"\n'
        )
        proc = _serve(
            ["--workers", "2", "--port", "0", "--upstream", mock.url, "-c", str(config),
             "--log-level", "warning"],
            {"DEEPSEEK_API_KEY": "sk-test"},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "2 workers" in line, line + (proc.stderr.read() if proc.stderr else "")
            url = line.split(" on ", 1)[1].split(" ", 1)[0]
            _wait_healthy(url)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the supervisor stops its workers
            proc.communicate(timeout=30)  # reaps it and closes its pipes


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the workers did not come up")
        time.sleep(0.05)  # polling a process that is starting


def _pids(url: str, n: int) -> set[int]:
    """Worker pids seen over `n` fresh connections."""
    seen = set()
    for _ in range(n):
        with httpx.Client(timeout=5) as client:  # a new connection each time
            seen.add(client.get(url + "/healthz").json()["pid"])
    return seen


def test_workers_share_the_port_and_the_stream_log(
    workers: tuple[subprocess.Popen[str], str],
) -> None:
    """Connections reach both workers; a stream's log reads the same through either."""
    proc, url = workers
    pids = _pids(url, 60)
    assert len(pids) == 2
    assert proc.pid not in pids
    with httpx.Client(timeout=20) as client:
        response = client.post(url + "/v1/chat/completions", json=BODY)
        stream_id = response.headers["x-unbroken-stream-id"]
        first = response.text
    replays = set()
    for _ in range(10):
        with httpx.Client(timeout=20) as client:  # any worker
            replays.add(client.get(f"{url}/v1/streams/{stream_id}").text)
    assert replays == {first}
    assert first.endswith("data: [DONE]\n\n")


def test_a_killed_worker_is_replaced_and_sigterm_stops_all(
    workers: tuple[subprocess.Popen[str], str],
) -> None:
    """kill -9 of one worker: the supervisor starts another; SIGTERM then ends every
    process with exit status 0."""
    proc, url = workers
    before = _pids(url, 40)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = _pids(url, 20)
        if victim not in now and len(now) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement worker: {now}"
        time.sleep(0.1)  # polling for the respawn
    assert (
        httpx.post(url + "/v1/chat/completions", json={**BODY, "stream": False}).status_code == 200
    )
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    for pid in now:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_several_workers_on_memory_state_are_refused(tmp_path: Path) -> None:
    """--workers 2 with the memory store exits 2 and says what to configure."""
    proc = _serve(["--workers", "2", "--port", "0"], {"DEEPSEEK_API_KEY": "sk-test"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "redis://" in err
    assert "--workers 2" in err
