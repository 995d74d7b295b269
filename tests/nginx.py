"""nginx for integration tests, configured by the shipped `deploy/nginx.conf` (the file
compose.yaml runs), so the tests exercise the very configuration users deploy."""

from __future__ import annotations

import re
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import free_port, require_binary

__all__ = ["NGINX_TEMPLATE", "nginx", "render_nginx_conf"]

NGINX_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


def render_nginx_conf(work: str, listen: str, backends: list[str]) -> str:
    """deploy/nginx.conf with its placeholders filled in: `work` (pid, temp files),
    `listen` (`127.0.0.1:PORT`) and one `server` line per backend `host:port`. nginx's own
    `$variables` are left as they are; a placeholder left unfilled raises KeyError."""
    text = NGINX_TEMPLATE.read_text(encoding="utf-8")
    servers = " ".join(f"server {b} max_fails=1 fail_timeout=5s;" for b in backends)
    own = {name: f"${name}" for name in re.findall(r"\$([a-z_]+)", text)}
    return string.Template(text).substitute(
        own, NGINX_WORK=work, NGINX_LISTEN=listen, UNBROKEN_GATEWAYS=servers
    )


@contextmanager
def nginx(backends: list[str], edit: Callable[[str], str] | None = None) -> Iterator[str]:
    """nginx on a free loopback port in front of `backends` (host:port); yields its URL.
    `edit` changes the rendered configuration first (a test's misconfigured proxy)."""
    binary = require_binary("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        conf = Path(work) / "nginx.conf"
        text = render_nginx_conf(work, f"127.0.0.1:{port}", backends)
        conf.write_text(edit(text) if edit is not None else text, encoding="utf-8")
        proc = subprocess.Popen(
            [binary, "-p", work, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # nginx writes its pid file once its sockets are bound: until then a connection
        # could reach another process that took the port meanwhile.
        pid_file = Path(work) / "nginx.pid"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if not pid_file.exists():
                        raise ConnectionRefusedError
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        pytest.fail(f"nginx did not start: {proc.communicate()[1]}")
                    time.sleep(0.02)  # waiting for a separate process to listen
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.communicate(timeout=10)
