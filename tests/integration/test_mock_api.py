"""The mock DeepSeek's API over loopback: endpoints, auth, the wire shapes of protocol.md
§1.4/§1.5, determinism, usage and the context cache, and the official `openai` SDK."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import MOCK_CONFIG
from tests.servers import raw_exchange, read_stream
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.mock.tokens import message_tokens

pytestmark = pytest.mark.integration

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain streaming, 请用中文和英文。"},
]
SDK_MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain streaming, 请用中文和英文。"},
]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def events_of(raw: bytes) -> list[str]:
    """The data of each `data: ` event of a well-formed LF-framed stream."""
    assert raw.endswith(b"\n\n")
    blocks = raw.decode("utf-8").split("\n\n")[:-1]
    assert all(block.startswith("data: ") for block in blocks), blocks[:3]
    return [block[len("data: ") :] for block in blocks]


def test_models_lists_both_models(api: httpx.Client) -> None:
    """GET /models (and /v1/models) returns DeepSeek's list."""
    for path in ("/models", "/v1/models"):
        response = api.get(path)
        assert response.status_code == 200
        assert response.json() == {
            "object": "list",
            "data": [
                {"id": "deepseek-chat", "object": "model", "owned_by": "deepseek"},
                {"id": "deepseek-reasoner", "object": "model", "owned_by": "deepseek"},
            ],
        }


def test_balance_has_string_amounts(api: httpx.Client) -> None:
    """GET /user/balance: is_available and string amounts in CNY."""
    body = api.get("/user/balance").json()
    assert body["is_available"] is True
    info = body["balance_infos"][0]
    assert info["currency"] == "CNY"
    assert {type(info[k]) for k in ("total_balance", "granted_balance", "topped_up_balance")} == {
        str
    }


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Authentication Fails (auth header format should be Bearer sk-...)"),
        ({"Authorization": "Basic abc"}, "auth header format should be Bearer"),
        ({"Authorization": "Bearer"}, "auth header format should be Bearer"),
    ],
)
def test_missing_or_malformed_auth_is_401(
    mock: MockServer, headers: dict[str, str], message: str
) -> None:
    """Without a Bearer key every API route answers DeepSeek's 401 body."""
    for method, path in (("POST", "/chat/completions"), ("GET", "/models")):
        response = httpx.request(
            method, mock.url + path, headers=headers, json={"model": "deepseek-chat"}
        )
        assert response.status_code == 401
        error = response.json()["error"]
        assert message in error["message"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_request_error"
        assert error["param"] is None


def test_configured_keys_reject_others_naming_the_last_four() -> None:
    """With api_keys set, an unknown key gets `Your api key: ****abcd is invalid`."""
    with MockServer(MockConfig(api_keys=frozenset({"sk-good"}))) as server:
        bad = httpx.get(server.url + "/models", headers={"Authorization": "Bearer sk-wxyz"})
        good = httpx.get(server.url + "/models", headers={"Authorization": "Bearer sk-good"})
    assert bad.status_code == 401
    assert bad.json()["error"]["message"] == (
        "Authentication Fails, Your api key: ****wxyz is invalid"
    )
    assert good.status_code == 200


def test_unknown_path_and_wrong_method(api: httpx.Client) -> None:
    """Unknown paths are 404 and wrong methods 405, both with a JSON error body."""
    missing = api.get("/nope")
    assert missing.status_code == 404
    assert "Not Found" in missing.json()["error"]["message"]
    wrong = api.get("/chat/completions")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert "POST" in wrong.json()["error"]["message"]


def test_non_stream_shape_and_text(api: httpx.Client) -> None:
    """A non-stream chat answer has DeepSeek's shape and the deterministic text."""
    body = api.post("/chat/completions", json={"model": "deepseek-chat", "messages": MESSAGES})
    assert body.status_code == 200
    assert body.headers["content-type"] == "application/json"
    data = body.json()
    assert UUID.fullmatch(data["id"])
    assert data["object"] == "chat.completion"
    assert data["model"] == "deepseek-chat"
    assert data["system_fingerprint"].startswith("fp_")
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {
        "role": "assistant",
        "content": answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)[1],
    }
    usage = data["usage"]
    assert (
        usage["prompt_tokens"]
        == usage["prompt_cache_hit_tokens"] + (usage["prompt_cache_miss_tokens"])
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_cache_hit_tokens"]}
    assert "completion_tokens_details" not in usage


def test_stream_shape_chat(mock: MockServer) -> None:
    """A deepseek-chat stream: role chunk, one chunk per token, the usage chunk, [DONE]."""
    result = raw_exchange(
        mock.url, {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
    )
    assert result.status == 200
    assert result.header("content-type") == "text/event-stream; charset=utf-8"
    assert result.ending == "eof"
    assert result.is_complete
    events = events_of(result.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks[:-1])
    first, *middle, last = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert all(list(c["choices"][0]["delta"]) == ["content"] for c in middle)
    assert last["choices"] == [
        {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop"}
    ]
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert text == answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)[1]
    assert last["usage"]["completion_tokens"] == len(middle)
    # DeepSeek writes raw UTF-8 (no \\u escapes for non-ASCII).
    assert "\\u" not in result.body.decode("utf-8").replace("\\u2028", "").replace("\\u0085", "")


def test_stream_shape_reasoner(mock: MockServer) -> None:
    """A deepseek-reasoner stream: reasoning_content chunks first, then content chunks."""
    result = raw_exchange(
        mock.url, {"model": "deepseek-reasoner", "messages": MESSAGES, "stream": True}
    )
    chunks = [json.loads(e) for e in events_of(result.body)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None, "reasoning_content": ""}
    kinds = [
        "r" if d.get("content") is None else "c" for d in deltas[1:-1]
    ]  # content null = reasoning chunk
    assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c")
    assert kinds.count("r") > 0
    assert kinds.count("c") > 0
    assert all(d["reasoning_content"] is None for d in deltas[1:-1] if d["content"] is not None)
    assert deltas[-1] == {"content": "", "reasoning_content": None}
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": kinds.count("r")}
    assert usage["completion_tokens"] == len(kinds)
    reasoning = "".join(d["reasoning_content"] for d in deltas[1:-1] if d["content"] is None)
    content = "".join(d["content"] for d in deltas[1:-1] if d["content"] is not None)
    assert (reasoning, content) == answer_text("deepseek-reasoner", MESSAGES, config=MOCK_CONFIG)


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_include_usage_puts_null_usage_on_every_other_chunk(mock: MockServer, model: str) -> None:
    """include_usage true: `"usage":null` on each chunk but the last; false: key absent."""
    for flag in (True, False):
        body = {
            "model": model,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": flag},
        }
        chunks = [json.loads(e) for e in events_of(raw_exchange(mock.url, body).body)[:-1]]
        assert chunks[-1]["usage"]["total_tokens"] > 0
        assert all(c["choices"] for c in chunks)  # no OpenAI-style usage-only chunk
        if flag:
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
        else:
            assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
@pytest.mark.parametrize(
    "path", ["/chat/completions", "/v1/chat/completions", "/beta/chat/completions"]
)
def test_stream_and_non_stream_give_the_same_text(api: httpx.Client, model: str, path: str) -> None:
    """Streamed and non-streamed answers equal answer_text, on every path."""
    expected = answer_text(model, MESSAGES, config=MOCK_CONFIG)
    streamed = read_stream(api, {"model": model, "messages": MESSAGES, "stream": True}, path=path)
    whole = read_stream(api, {"model": model, "messages": MESSAGES}, path=path)
    assert streamed.end.state.value == "complete"
    assert whole.end.state.value == "complete"
    assert (streamed.reasoning, streamed.content) == expected
    assert (whole.reasoning, whole.content) == expected
    assert streamed.accumulator.usage is not None
    assert whole.accumulator.usage is not None
    assert streamed.accumulator.usage.completion_tokens == whole.accumulator.usage.completion_tokens


def test_answer_depends_on_seed_model_and_conversation(api: httpx.Client) -> None:
    """The seed field, the model's mode and the conversation each change the answer."""

    def content(**extra: Any) -> str:
        body = {"model": "deepseek-chat", "messages": MESSAGES, **extra}
        return str(
            api.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        )

    base = content()
    assert content() == base
    assert content(seed=5) == base  # the server's seed is 5
    assert content(seed=6) != base
    assert content(seed=6) == answer_text("deepseek-chat", MESSAGES, 6)[1]
    other = [*MESSAGES[:-1], {"role": "user", "content": "Something else"}]
    assert content(messages=other) != base
    assert content(temperature=1.5, top_p=0.5) == base  # sampling knobs change nothing


def test_text_mixes_scripts_and_multibyte_widths(api: httpx.Client) -> None:
    """A long answer holds 1-, 2-, 3- and 4-byte UTF-8 characters and U+2028."""
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    text = api.post("/chat/completions", json=body, headers={"X-Mock-Tokens": "3000"}).json()[
        "choices"
    ][0]["message"]["content"]
    widths = {len(c.encode()) for c in text}
    assert widths == {1, 2, 3, 4}
    assert "\u2028" in text
    assert any("\u4e00" <= c <= "\u9fff" for c in text)


def test_x_mock_tokens_sets_the_length(api: httpx.Client) -> None:
    """X-Mock-Tokens is the answer's length in chunks, past the default max_tokens."""
    result = read_stream(
        api,
        {"model": "deepseek-chat", "messages": MESSAGES, "stream": True},
        headers={"X-Mock-Tokens": "20000"},
    )
    assert result.end.state.value == "complete"
    assert len(result.chunks) == 20000 + 2
    assert result.finish_reason == "stop"
    assert (
        result.content
        == answer_text("deepseek-chat", MESSAGES, n_tokens=20000, config=MOCK_CONFIG)[1]
    )


def test_thinking_switch_turns_chat_into_thinking_mode(api: httpx.Client) -> None:
    """`thinking: enabled` on deepseek-chat answers like deepseek-reasoner."""
    body = {"model": "deepseek-chat", "messages": MESSAGES, "thinking": {"type": "enabled"}}
    message = api.post("/chat/completions", json=body).json()["choices"][0]["message"]
    expected = answer_text("deepseek-reasoner", MESSAGES, config=MOCK_CONFIG)
    assert (message["reasoning_content"], message["content"]) == expected
    off = {"model": "deepseek-reasoner", "messages": MESSAGES, "thinking": {"type": "disabled"}}
    message = api.post("/chat/completions", json=off).json()["choices"][0]["message"]
    assert "reasoning_content" not in message


def test_cache_hits_when_messages_start_with_an_earlier_request(api: httpx.Client) -> None:
    """Prompt tokens of a persisted prefix (earlier messages, and their answer) are hits."""
    first = api.post("/chat/completions", json={"model": "deepseek-chat", "messages": MESSAGES})
    usage1 = first.json()["usage"]
    assert usage1["prompt_cache_hit_tokens"] == 0
    assert usage1["prompt_cache_miss_tokens"] == usage1["prompt_tokens"]
    assert usage1["prompt_tokens"] == sum(message_tokens(m) for m in MESSAGES)

    again = api.post("/chat/completions", json={"model": "deepseek-chat", "messages": MESSAGES})
    assert again.json()["usage"]["prompt_cache_hit_tokens"] == usage1["prompt_tokens"]

    answer = {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]}
    turn2 = [*MESSAGES, answer, {"role": "user", "content": "And then?"}]
    usage2 = api.post(
        "/chat/completions", json={"model": "deepseek-chat", "messages": turn2}
    ).json()["usage"]
    assert usage2["prompt_cache_hit_tokens"] == usage1["prompt_tokens"] + message_tokens(answer)
    assert usage2["prompt_cache_miss_tokens"] == message_tokens(turn2[-1])

    other_model = api.post(
        "/chat/completions", json={"model": "deepseek-reasoner", "messages": MESSAGES}
    ).json()["usage"]
    assert other_model["prompt_cache_hit_tokens"] == 0  # each model has its own cache


def test_openai_sdk_non_stream(mock: MockServer) -> None:
    """The official openai SDK reads a non-streamed answer, reasoning included."""
    client = openai.OpenAI(base_url=mock.url, api_key="sk-test", max_retries=0)
    completion = client.chat.completions.create(model="deepseek-reasoner", messages=SDK_MESSAGES)
    message = completion.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert (reasoning, message.content) == answer_text(
        "deepseek-reasoner", MESSAGES, config=MOCK_CONFIG
    )
    assert completion.usage is not None
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_openai_sdk_stream(mock: MockServer, model: str) -> None:
    """The official openai SDK streams from the mock; usage arrives on the last chunk."""
    client = openai.OpenAI(base_url=mock.url, api_key="sk-test", max_retries=0)
    stream = client.chat.completions.create(
        model=model,
        messages=SDK_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    content: list[str] = []
    reasoning: list[str] = []
    usages = []
    finish = []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert ("".join(reasoning), "".join(content)) == answer_text(
        model, MESSAGES, config=MOCK_CONFIG
    )
    assert finish == ["stop"]
    assert len(usages) == 1
