"""The gateway instance that owns an answer dies (kill -9) mid-answer: two gateways on one
Redis behind nginx, and the page in a real browser continues to the fault-free answer
(reconnect through nginx to the survivor, which takes the stream over and resumes it)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import ASSISTANT, MESSAGE, MOCK, SEND
from tests.cluster import _wait_port, gateway_process
from tests.support import free_port, require_binary
from unbroken.mock import MockServer, answer_text

pytestmark = pytest.mark.browser

N_TOKENS = 200  # 4 s at 20 ms a token
NGINX = """
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  upstream gateways {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 60s;
      proxy_connect_timeout 2s;
      proxy_next_upstream error timeout;
      # Which instance answered, so the test knows whom to kill.
      add_header X-Served-By $upstream_addr always;
    }}
  }}
}}
"""


@contextmanager
def nginx(ports: list[int]) -> Iterator[str]:
    binary = require_binary("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in ports)
        conf = Path(work) / "nginx.conf"
        conf.write_text(NGINX.format(work=work, servers=servers, port=port))
        proc = subprocess.Popen(
            [binary, "-p", work, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, proc, "nginx")
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def test_answer_survives_the_loss_of_its_gateway_instance(
    context: Any, mock: MockServer, redis_url: str
) -> None:
    """kill -9 of the instance streaming the answer: the page reconnects through nginx to
    the other instance, which takes the stream over; the text is the fault-free answer."""
    with ExitStack() as stack:
        gateways = [
            (proc, int(base.rsplit(":", 1)[1]))
            for proc, base in (
                stack.enter_context(gateway_process(mock.url, redis_url, sessions=redis_url))
                for _ in range(2)
            )
        ]
        url = stack.enter_context(nginx([port for _, port in gateways]))
        context.set_extra_http_headers({"X-Mock-Tokens": str(N_TOKENS)})
        page = context.new_page()
        resumed: list[Any] = []
        page.on("response", lambda r: resumed.append(r) if "/v1/streams/" in r.url else None)
        page.goto(url + "/")
        page.wait_for_selector('.ub-app[data-ready="true"]')
        with page.expect_response(lambda r: r.url.endswith("/messages")) as answered:
            page.fill(MESSAGE, "hello")
            page.click(SEND)
        owner = answered.value.headers["x-served-by"]
        page.wait_for_function("() => window.unbrokenChat.messages().at(-1)?.content.length > 40")
        victim = next(proc for proc, port in gateways if owner.endswith(f":{port}"))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        shown = page.evaluate("() => window.unbrokenChat.messages().at(-1)")
        assert shown["state"] == "streaming"  # killed mid-answer
        page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=40_000)
        final = page.evaluate("() => window.unbrokenChat.messages().at(-1)")
        messages = [{"role": "user", "content": "hello"}]
        expected = answer_text("deepseek-chat", messages, n_tokens=N_TOKENS, config=MOCK)[1]
        assert final["state"] == "done"
        assert final["content"] == expected
        assert final["content"].startswith(shown["content"])
        survivors = {r.headers.get("x-served-by") for r in resumed if r.request.method == "GET"}
        assert survivors, "the page never reconnected"
        assert owner not in survivors
