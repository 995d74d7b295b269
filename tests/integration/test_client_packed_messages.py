"""An answer that streams holds its request's messages and headers as their JSON, not as
objects (client/_common.py `AnswerRun.pack_request`); a resume after that still sends the
original conversation plus the text shown, with the same headers, and the answer ends
whole."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator

import httpx
import pytest

from unbroken import AsyncClient, RetryPolicy, Timeouts
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MESSAGES = [
    {"role": "system", "content": "You answer about rivers."},
    {"role": "user", "content": "Tell me about packed messages."},
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=11)) as server:
        yield server


def _lists_holding(message: dict[str, str]) -> list[list[object]]:
    return [o for o in gc.get_objects() if type(o) is list and any(m is message for m in o)]


async def test_a_resume_after_the_messages_were_packed_sends_them_whole(
    upstream: MockServer,
) -> None:
    sent: list[dict[str, object]] = []
    keys: list[str | None] = []

    async def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))
        keys.append(request.headers.get("x-mock-fault-key"))

    messages = [dict(m) for m in MESSAGES]
    first_message = messages[0]
    fault = {"X-Mock-Fault": "reset after=8 times=1", "X-Mock-Fault-Key": "packed:resume"}
    async with (
        httpx.AsyncClient(event_hooks={"request": [record]}) as http,
        AsyncClient(
            api_key="sk-test",
            base_url=upstream.url,
            http_client=http,
            retry=RetryPolicy(attempts=4, wait_initial_s=0.01, wait_max_s=0.05),
            timeouts=Timeouts(connect_s=5, headers_s=5, first_token_s=5, idle_s=2),
        ) as client,
    ):
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=fault
        )
        del messages
        text = ""
        checked = False
        async for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and delta.content:
                text += delta.content
            if len(sent) == 1 and text:
                # Streaming: the conversation is held as its JSON only (no list of the
                # caller's message objects anywhere).
                held = stream._run._body["messages"]
                assert isinstance(held, bytes)
                assert json.loads(held) == MESSAGES
                assert _lists_holding(first_message) == []
                assert isinstance(stream._run._headers, bytes)  # and its headers too
                checked = True
        final = await stream.final()
    assert checked
    assert len(sent) == 2
    assert keys == ["packed:resume", "packed:resume"]
    assert sent[0]["messages"] == MESSAGES
    resumed = sent[1]["messages"]
    assert isinstance(resumed, list)
    assert resumed[: len(MESSAGES)] == MESSAGES
    assert resumed[len(MESSAGES)]["role"] == "assistant"
    assert resumed[len(MESSAGES)]["content"]
    _, expected = answer_text("deepseek-chat", MESSAGES, config=MockConfig(seed=11))
    assert text == expected
    assert final.choices[0].message.content == expected
    assert final.unbroken.resumes == 1
