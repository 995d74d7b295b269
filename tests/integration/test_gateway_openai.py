"""The official `openai` SDK pointed at the gateway: streams, non-streams, tools,
include_usage, the gateway's errors as the SDK's exception types, and a stream that the
upstream breaks arriving whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text
from unbroken.settings import GatewaySettings, KeySettings, LimitSettings, Settings, hash_key

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=13)
GATEWAY_KEY = "sk-gw-openai-sdk-test-000111"
# Typed loosely: the SDK types messages and tools as TypedDicts; users pass dicts.
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with MockServer(MOCK) as mock:
        settings = Settings(
            api_key="sk-up",
            base_url=mock.url,
            gateway=GatewaySettings(
                keys=(
                    KeySettings("sdk", hash_key(GATEWAY_KEY)),
                    KeySettings(
                        "slow",
                        hash_key("sk-gw-slow-key-9999"),
                        LimitSettings(requests_per_minute=1),
                    ),
                ),
                forward_headers=("x-mock-*",),
                retry_wait_initial_s=0.01,
                retry_wait_max_s=0.05,
            ),
        )
        with ServerThread(create_app(settings), lifespan="on") as server:
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)
            yield sdk
            sdk.close()


def test_stream_with_include_usage(client: openai.OpenAI) -> None:
    """The SDK streams the whole answer and sees the usage on the last chunk."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK)
    stream = client.chat.completions.create(
        model="deepseek-chat",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage, finishes = [], None, []
    for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        usage = chunk.usage or usage
    assert "".join(texts) == content
    assert finishes == ["stop"]
    assert usage is not None
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_non_stream(client: openai.OpenAI) -> None:
    """A non-streamed completion parses into the SDK's types."""
    reasoning, content = answer_text("deepseek-reasoner", MESSAGES, config=MOCK)
    completion = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=MESSAGES,
    )
    assert completion.choices[0].message.content == content
    assert completion.model_extra is not None
    assert completion.choices[0].message.model_extra == {"reasoning_content": reasoning}
    assert completion.usage is not None


def test_tools_stream_and_non_stream(client: openai.OpenAI) -> None:
    """Tool calls come through whole, streamed and not."""
    completion = client.chat.completions.create(
        model="deepseek-chat",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls
    first = calls[0]
    assert isinstance(first, openai.types.chat.ChatCompletionMessageFunctionToolCall)
    assert first.function.name == "get_weather"
    expected_args = first.function.arguments
    json.loads(expected_args)

    stream = client.chat.completions.create(
        model="deepseek-chat",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        stream=True,
    )
    names, args, finish = [], [], None
    for chunk in stream:
        for c in chunk.choices:
            for call in c.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    args.append(call.function.arguments)
            finish = c.finish_reason or finish
    assert names == ["get_weather"]
    assert "".join(args) == expected_args
    assert finish == "tool_calls"


def test_upstream_reset_is_invisible_to_the_sdk(client: openai.OpenAI) -> None:
    """An upstream reset mid-stream is healed by the gateway; the SDK sees one answer."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK)
    stream = client.chat.completions.create(
        model="deepseek-chat",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Mock-Fault": "reset after=6 times=1", "X-Mock-Fault-Key": "sdk-reset"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == content


def test_gateway_errors_are_sdk_exceptions(client: openai.OpenAI) -> None:
    """Unknown model, bad key and a rate limit raise the SDK's matching exceptions."""
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="sk-wrong").models.list()
    slow = client.with_options(api_key="sk-gw-slow-key-9999")
    slow.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited:
        slow.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert limited.value.response.headers["retry-after"]
    assert [m.id for m in client.models.list()] == ["deepseek-chat", "deepseek-reasoner"]
