"""Request features of the mock DeepSeek: tool calls with streamed arguments, JSON mode,
stop sequences and max_tokens, stream and non-stream alike."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MOCK_CONFIG
from tests.servers import raw_exchange, read_stream
from unbroken.mock import MockServer, answer_text

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["C", "F"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
ASK_BOTH = [{"role": "user", "content": "Use get_weather and get_time for Paris, please."}]
ASK_NONE = [{"role": "user", "content": "Tell me a story."}]


def post(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_prompt_naming_two_tools_gets_two_calls_non_stream(api: httpx.Client) -> None:
    """A user message naming two tools gets two calls in one turn, finish tool_calls."""
    data = post(api, model="deepseek-chat", messages=ASK_BOTH, tools=[WEATHER, TIME])
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    arguments = json.loads(calls[0]["function"]["arguments"])
    assert set(arguments) == {"city", "unit", "days"}
    assert arguments["unit"] in ("C", "F")
    assert isinstance(arguments["days"], int)
    assert choice["message"]["content"] == ""


def test_streamed_tool_calls_match_the_non_stream_ones(api: httpx.Client) -> None:
    """Streamed: first fragment has id, type, name and "" arguments; the rest only argument
    pieces; folding them gives the non-stream calls."""
    body = {"model": "deepseek-chat", "messages": ASK_BOTH, "tools": [WEATHER, TIME]}
    whole = post(api, **body)["choices"][0]["message"]["tool_calls"]
    result = read_stream(api, {**body, "stream": True})
    assert result.finish_reason == "tool_calls"
    folded = result.accumulator.completion().choices[0].message.tool_calls
    assert folded is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in folded] == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole
    ]
    fragments = [
        call
        for chunk in result.chunks
        for choice in chunk.choices
        if choice.delta is not None
        for call in choice.delta.tool_calls or ()
    ]
    firsts = [f for f in fragments if f.id is not None]
    assert [(f.index, f.type, f.function and f.function.arguments) for f in firsts] == [
        (0, "function", ""),
        (1, "function", ""),
    ]
    rest = [f for f in fragments if f.id is None]
    assert len(rest) > 4  # the arguments arrive in pieces
    assert all(f.function is not None and f.function.name is None for f in rest)


def test_tool_choice_rules(api: httpx.Client) -> None:
    """required calls the first tool, a named choice calls that tool, none never calls,
    and a prompt naming no tool gets text under auto."""
    tools = [WEATHER, TIME]
    required = post(
        api, model="deepseek-chat", messages=ASK_NONE, tools=tools, tool_choice="required"
    )
    assert [c["function"]["name"] for c in required["choices"][0]["message"]["tool_calls"]] == [
        "get_weather"
    ]
    named = post(
        api,
        model="deepseek-chat",
        messages=ASK_NONE,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [c["function"]["name"] for c in named["choices"][0]["message"]["tool_calls"]] == [
        "get_time"
    ]
    none = post(api, model="deepseek-chat", messages=ASK_BOTH, tools=tools, tool_choice="none")
    assert none["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in none["choices"][0]["message"]
    auto = post(api, model="deepseek-chat", messages=ASK_NONE, tools=tools)
    assert auto["choices"][0]["finish_reason"] == "stop"


def test_tool_result_gets_a_text_answer_and_reasoner_rules(api: httpx.Client) -> None:
    """After the tool results the model answers in text; in thinking mode an assistant
    tool-call message without reasoning_content is DeepSeek's 400."""
    first = post(api, model="deepseek-reasoner", messages=ASK_BOTH, tools=[WEATHER, TIME])
    message = first["choices"][0]["message"]
    assert message["reasoning_content"]  # reasoning precedes the calls
    calls = message["tool_calls"]
    history = [
        *ASK_BOTH,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": message["reasoning_content"],
            "tool_calls": calls,
        },
        *({"role": "tool", "tool_call_id": c["id"], "content": "22 °C"} for c in calls),
    ]
    answer = post(api, model="deepseek-reasoner", messages=history, tools=[WEATHER, TIME])
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"]

    del history[1]["reasoning_content"]
    refused = api.post(
        "/chat/completions",
        json={"model": "deepseek-reasoner", "messages": history, "tools": [WEATHER, TIME]},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith(
        "Missing `reasoning_content` field in the assistant message at message index 1."
    )


def test_json_mode_answers_a_json_object(api: httpx.Client) -> None:
    """response_format json_object: the content parses as a JSON object, stream or not."""
    messages = [{"role": "user", "content": 'Reply in json: {"answer": ...}'}]
    body = {
        "model": "deepseek-chat",
        "messages": messages,
        "response_format": {"type": "json_object"},
    }
    whole = post(api, **body)["choices"][0]["message"]["content"]
    assert isinstance(json.loads(whole), dict)
    streamed = read_stream(api, {**body, "stream": True})
    assert streamed.content == whole
    assert whole == answer_text("deepseek-chat", messages, config=MOCK_CONFIG, json_object=True)[1]


def test_json_mode_needs_the_word_json(api: httpx.Client) -> None:
    """Without "json" in the prompt, json_object mode is a 400 naming the rule."""
    response = api.post(
        "/chat/completions",
        json={
            "model": "deepseek-chat",
            "messages": ASK_NONE,
            "response_format": {"type": "json_object"},
        },
    )
    assert response.status_code == 400
    assert "json" in response.json()["error"]["message"]


def test_stop_sequence_cuts_before_it(api: httpx.Client) -> None:
    """A stop sequence ends the content right before its first occurrence (not included)."""
    full = answer_text("deepseek-chat", ASK_NONE, config=MOCK_CONFIG)[1]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    body = {"model": "deepseek-chat", "messages": ASK_NONE, "stop": [stop, "never-there"]}
    assert post(api, **body)["choices"][0]["message"]["content"] == cut
    streamed = read_stream(api, {**body, "stream": True})
    assert (streamed.content, streamed.finish_reason) == (cut, "stop")
    assert answer_text("deepseek-chat", ASK_NONE, config=MOCK_CONFIG, stop=stop)[1] == cut


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_max_tokens_ends_with_length(mock: MockServer, model: str) -> None:
    """max_tokens caps completion tokens (reasoning included) and ends with `length`."""
    body = {"model": model, "messages": ASK_NONE, "max_tokens": 7, "stream": True}
    raw = raw_exchange(mock.url, body).body.decode()
    chunks = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
    assert len(chunks) == 1 + 7 + 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    whole = raw_exchange(mock.url, {**body, "stream": False}).json()
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 7
    reasoning, content = answer_text(model, ASK_NONE, config=MOCK_CONFIG, max_tokens=7)
    message = whole["choices"][0]["message"]
    assert (message.get("reasoning_content", ""), message["content"]) == (reasoning, content)


def test_arguments_follow_the_schema(api: httpx.Client) -> None:
    """Tool arguments follow the JSON schema: numbers, booleans, arrays, nested objects,
    nullable types; a text-parts prompt names the tool too."""
    schema = {
        "type": "object",
        "properties": {
            "price": {"type": "number"},
            "urgent": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            "note": {"type": ["string", "null"]},
            "free": {},
        },
    }
    tool = {"type": "function", "function": {"name": "book", "parameters": schema}}
    bare = {"type": "function", "function": {"name": "ping"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "please book and ping"}]}]
    data = post(api, model="deepseek-chat", messages=messages, tools=[tool, bare])
    calls = data["choices"][0]["message"]["tool_calls"]
    arguments = json.loads(calls[0]["function"]["arguments"])
    assert isinstance(arguments["price"], float)
    assert isinstance(arguments["urgent"], bool)
    assert isinstance(arguments["tags"], list)
    assert all(isinstance(t, str) for t in arguments["tags"])
    assert set(arguments["where"]) == {"lat"}
    assert isinstance(arguments["note"], str)
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    limited = post(api, model="deepseek-chat", messages=messages, tools=[tool], max_tokens=3)
    choice = limited["choices"][0]
    assert choice["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 3
    assert len(choice["message"]["tool_calls"][0]["function"]["arguments"]) <= 12
