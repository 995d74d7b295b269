"""A canned streamed answer for SDK unit tests on `httpx.MockTransport`: two chunks ("Hi",
" there") with usage on the last, then `[DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

EVENTS = [
    b'{"id":"a","object":"chat.completion.chunk","created":1,"model":"deepseek-chat",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}',
    b'{"id":"a","object":"chat.completion.chunk","created":1,"model":"deepseek-chat",'
    b'"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}',
]
BODY = b"".join(b"data: " + e + b"\n\n" for e in EVENTS) + b"data: [DONE]\n\n"


class _Body(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield BODY


def sse_answer() -> httpx.Response:
    """A fresh 200 response streaming `BODY` as server-sent events."""
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Body())
