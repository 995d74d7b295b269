"""`AsyncClient.stream_checked` (the gateway's way into the SDK) against the public call it
stands for: the same request on the wire, the same run, the same chunks and answer."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.canned import sse_answer
from unbroken.client import AsyncClient
from unbroken.client.async_ import AsyncStream
from unbroken.core.routes import Route
from unbroken.errors import InvalidRequestError


def _client(seen: list[httpx.Request], **options: Any) -> AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_answer()

    return AsyncClient(
        api_key="sk-test",
        base_url="http://upstream.test",
        transport=httpx.MockTransport(answer),
        **options,
    )


ROUTE = Route(name="backup", base_url="http://backup.test", api_key="sk-b", model="m2")

CASES = [
    pytest.param({}, id="bare"),
    pytest.param(
        {
            "extra_body": {"temperature": 0.5, "stream_options": {"include_usage": True}},
            "extra_headers": {"X-Request-ID": "r-1", "traceparent": "00-ab-cd-01"},
            "budget_key": "key-1",
        },
        id="gateway-shaped",
    ),
    pytest.param({"extra_body": {"n": 1, "user": "u"}, "fallbacks": [ROUTE]}, id="fallbacks"),
    pytest.param({"routes": [ROUTE]}, id="routes"),
]


async def _drain(stream: AsyncStream) -> tuple[list[Any], Any]:
    chunks = [chunk async for chunk in stream]
    return chunks, await stream.final()


@pytest.mark.anyio
@pytest.mark.parametrize("options", CASES)
async def test_stream_checked_is_the_public_call(options: dict[str, Any]) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    theirs: list[httpx.Request] = []
    ours: list[httpx.Request] = []
    public = _client(theirs, default_headers={"X-Client": "c"})
    checked = _client(ours, default_headers={"X-Client": "c"})
    expected = await public.chat.completions.create(
        model="deepseek-chat", messages=messages, stream=True, **options
    )
    got = checked.stream_checked("deepseek-chat", messages, **options)
    assert got._run.body == expected._run.body
    assert list(got._run.body) == list(expected._run.body)  # the same key order
    assert got._run.extra_headers == expected._run.extra_headers
    assert got._run.routes == expected._run.routes
    assert got._run.timeouts == expected._run.timeouts
    assert got._run.usage_chunk == expected._run.usage_chunk
    expected_chunks, expected_answer = await _drain(expected)
    got_chunks, got_answer = await _drain(got)
    assert [c.model_dump() for c in got_chunks] == [c.model_dump() for c in expected_chunks]
    assert got_answer.choices == expected_answer.choices
    assert got_answer.usage == expected_answer.usage
    assert len(ours) == len(theirs) == 1
    assert ours[0].url == theirs[0].url
    assert ours[0].headers.raw == theirs[0].headers.raw
    assert ours[0].content == theirs[0].content
    # The caller's containers are not the run's.
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    await public.aclose()
    await checked.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("n", [0, -1, "2", True, 1.0])
async def test_stream_checked_refuses_a_bad_n_as_create_does(n: Any) -> None:
    client = _client([])
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="n must be a positive integer"):
        await client.chat.completions.create(
            model="m", messages=messages, stream=True, extra_body={"n": n}
        )
    with pytest.raises(InvalidRequestError, match="n must be a positive integer"):
        client.stream_checked("m", messages, extra_body={"n": n})
    with pytest.raises(InvalidRequestError, match="at least one message"):
        client.stream_checked("m", [])
    await client.aclose()
