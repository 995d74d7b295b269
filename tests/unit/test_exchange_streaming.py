"""An Exchange whose streamed answer has started holds neither the request's headers nor
its own response headers (they are out in the head) for the answer's life."""

from __future__ import annotations

from typing import Any

import pytest

from unbroken.gateway.asgi import Exchange

pytestmark = pytest.mark.anyio


async def test_the_head_carries_the_common_headers_which_then_go() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    request_headers = [(b"authorization", b"Bearer x"), (b"x-request-id", b"r-1")]
    scope: Any = {"type": "http", "headers": request_headers}
    common = [(b"x-request-id", b"r-1"), (b"x-unbroken-gateway", b"1")]
    ex = Exchange(scope, receive, send, common, 1024)
    assert ex.header(b"x-request-id") == b"r-1"
    await ex.start(200, [(b"content-type", b"text/event-stream")])
    ex.started_streaming()
    # The head went out whole, before the headers were let go.
    assert sent[0]["headers"] == [
        (b"content-type", b"text/event-stream"),
        (b"x-request-id", b"r-1"),
        (b"x-unbroken-gateway", b"1"),
    ]
    assert ex.headers_out == []
    assert request_headers == []
