"""Run the mock DeepSeek in its own process for benchmarks, so its CPU and GIL are not
counted against the client under test."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mock_process(config_expr: str = "MockConfig(seed=1)") -> Iterator[str]:
    """Start `unbroken.mock.serve(<config_expr>)` in a subprocess; yield its base URL."""
    port = free_port()
    code = (
        "from unbroken.mock import Latency, MockConfig, serve;"
        f"serve({config_expr}, host='127.0.0.1', port={port})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/models", headers={"Authorization": "Bearer sk"}, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)  # waiting for the mock process to listen
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
