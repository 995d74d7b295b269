"""An answer's stream, its engine and the run behind them are freed by reference counting
when the caller lets go of the stream, not left for the garbage collector: a gateway opens
one per answer, and what each left behind waited for a full collection (gateway/server.py
raises the thresholds) in its peak memory."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeGuard

import httpx
import pytest

from tests.canned import sse_answer
from unbroken.client import AsyncClient
from unbroken.client._common import AnswerRun
from unbroken.client._engine import Engine
from unbroken.client.async_ import AsyncStream
from unbroken.core.routes import Route
from unbroken.core.wire import ChatCompletionChunk


def _answer(request: httpx.Request) -> httpx.Response:
    return sse_answer()


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()  # only reference counting frees what the answer leaves
    try:
        yield
    finally:
        gc.enable()


def _live() -> list[int]:
    """How many streams, engines and runs exist."""
    kinds = [AsyncStream, Engine, AnswerRun]
    counts = [0, 0, 0]
    # (A plain loop: a comprehension's closure cell would hold the list in a cycle.)
    for o in gc.get_objects():
        if type(o) in kinds:
            counts[kinds.index(type(o))] += 1
    return counts


async def _through(finish: Callable[[AsyncStream], Awaitable[Any]]) -> list[int]:
    client = AsyncClient(
        routes=[Route(name="r", base_url="http://127.0.0.1:9/v1", api_key="sk")],
        transport=httpx.MockTransport(_answer),
    )
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert stream._engine is not None  # attached: the stream iterates it directly
    assert _live() == [1, 1, 1]
    await finish(stream)
    del stream
    try:
        return _live()
    finally:
        await client.close()


def _has_delta(chunk: ChatCompletionChunk) -> TypeGuard[Any]:
    return bool(chunk.choices) and chunk.choices[0].delta is not None


async def _read_to_the_end(stream: AsyncStream) -> None:
    text = "".join([c.choices[0].delta.content or "" async for c in stream if _has_delta(c)])
    assert text == "Hi there"
    assert (await stream.final()).choices[0].message.content == "Hi there"


async def _stopped_after_one(stream: AsyncStream) -> None:
    async for _ in stream:
        break
    await stream.aclose()


async def _closed_unread(stream: AsyncStream) -> None:
    await stream.aclose()


@pytest.mark.anyio
@pytest.mark.usefixtures("no_collector")
@pytest.mark.parametrize("finish", [_read_to_the_end, _stopped_after_one, _closed_unread])
async def test_a_stream_let_go_is_freed_without_the_collector(
    finish: Callable[[AsyncStream], Awaitable[Any]],
) -> None:
    assert _live() == [0, 0, 0]
    assert await _through(finish) == [0, 0, 0]


@pytest.mark.anyio
async def test_a_closed_stream_iterates_as_before() -> None:
    """Once closed, the stream gives what it gave before the engine let go of it: the
    usage chunk due (OpenAI's include_usage shape), then nothing."""
    client = AsyncClient(
        routes=[Route(name="r", base_url="http://127.0.0.1:9/v1", api_key="sk")],
        transport=httpx.MockTransport(_answer),
    )
    stream = await client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    first = await stream.__anext__()
    assert _has_delta(first)
    assert first.choices[0].delta.content == "Hi"
    await stream.aclose()
    rest = [chunk async for chunk in stream]
    # (No usage arrived before the close: the usage chunk carries none.)
    assert [(c.id, c.choices, c.usage) for c in rest] == [("a", [], None)]
    assert [chunk async for chunk in stream] == []
    await client.close()
