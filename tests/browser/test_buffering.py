"""Behind a proxy that buffers server-sent events (nothing arrives until the answer is
complete), the page still shows the answer and says why it came all at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser.conftest import ASSISTANT, MESSAGE, SEND
from unbroken.mock import MockServer, ServerThread

pytestmark = pytest.mark.browser

_HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"host"}


class BufferingProxy:
    """A reverse proxy that reads each whole response before sending any of it: what a
    misconfigured proxy or a corporate middlebox does to server-sent events."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        # The client's Host goes through, as a reverse proxy sends it (nginx's
        # `proxy_set_header Host $host`): the gateway checks it against the page's Origin.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP - {b"host"}]
        query = scope["query_string"].decode()
        url = self.upstream + scope["path"] + (f"?{query}" if query else "")
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.request(scope["method"], url, content=body, headers=headers)
            whole = response.content  # the whole answer, only now passed on
        out = [
            (k.encode(), v.encode())
            for k, v in response.headers.items()
            if k.encode() not in _HOP and k != "content-encoding"
        ]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": whole})


@pytest.fixture
def buffering_proxy(gateway: ServerThread) -> Iterator[str]:
    with ServerThread(BufferingProxy(gateway.url), "127.0.0.1", 0) as server:
        yield server.url


def test_page_says_when_a_proxy_buffers_the_stream(
    context: Any, buffering_proxy: str, mock: MockServer
) -> None:
    """The answer arrives whole after ~2 s; the page shows it and names the cause."""
    context.set_extra_http_headers({"X-Mock-Tokens": "100"})
    page = context.new_page()
    page.goto(buffering_proxy + "/")
    page.wait_for_selector('.ub-app[data-ready="true"]')
    page.fill(MESSAGE, "hello")
    page.click(SEND)
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    notice = page.locator('[role="status"]')
    assert "buffers streamed responses" in (notice.text_content() or "")
