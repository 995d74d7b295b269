"""Continuations (chat prefix completion on /beta, and vLLM's continue_final_message): the
delivered prefix plus the continuation is the unbroken answer, byte for byte, at any cut."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.conftest import MOCK_CONFIG
from tests.servers import read_stream
from unbroken.mock import answer_text
from unbroken.mock.tokens import message_tokens

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Write about resuming streams, 中文 too 🚀"}]


def cuts(text: str) -> list[int]:
    """Cut points: the edges, inside the text, and next to multi-byte characters."""
    points = {1, 2, len(text) // 3, len(text) // 2, len(text) - 1}
    multibyte = [i for i, c in enumerate(text) if len(c.encode()) > 1]
    points.update(multibyte[:2] + multibyte[-2:])
    points.update(i + 1 for i in multibyte[:2])
    return sorted(p for p in points if 0 < p < len(text))


def continue_(
    api: httpx.Client,
    model: str,
    prefix: dict[str, Any],
    *,
    stream: bool,
    vllm: bool = False,
    **extra: Any,
) -> Any:
    body: dict[str, Any] = {
        "model": model,
        "messages": [*MESSAGES, {"role": "assistant", **prefix}],
        "stream": stream,
        **extra,
    }
    if vllm:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        path = "/v1/chat/completions"
    else:
        body["messages"][-1]["prefix"] = True
        path = "/beta/chat/completions"
    return read_stream(api, body, path=path)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("vllm", [False, True])
def test_chat_continuation_is_byte_identical_at_every_cut(
    api: httpx.Client, stream: bool, vllm: bool
) -> None:
    """deepseek-chat: prefix + continuation == the unbroken answer for each cut point."""
    _, full = answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)
    for cut in cuts(full):
        result = continue_(api, "deepseek-chat", {"content": full[:cut]}, stream=stream, vllm=vllm)
        assert result.status == 200
        assert result.finish_reason == "stop"
        assert (full[:cut] + result.content).encode() == full.encode(), cut


@pytest.mark.parametrize("stream", [True, False])
def test_reasoner_continuation_in_reasoning_and_in_content(api: httpx.Client, stream: bool) -> None:
    """deepseek-reasoner: a cut in the reasoning continues the reasoning then the answer; a cut
    in the answer (full reasoning sent back) continues only the answer."""
    reasoning, content = answer_text("deepseek-reasoner", MESSAGES, config=MOCK_CONFIG)
    for cut in cuts(reasoning):
        prefix = {"content": "", "reasoning_content": reasoning[:cut]}
        result = continue_(api, "deepseek-reasoner", prefix, stream=stream)
        assert reasoning[:cut] + result.reasoning == reasoning, cut
        assert result.content == content
    at_boundary = continue_(
        api, "deepseek-reasoner", {"content": "", "reasoning_content": reasoning}, stream=stream
    )
    assert (at_boundary.reasoning, at_boundary.content) == ("", content)
    for cut in cuts(content):
        prefix = {"content": content[:cut], "reasoning_content": reasoning}
        result = continue_(api, "deepseek-reasoner", prefix, stream=stream)
        assert result.reasoning == ""
        assert content[:cut] + result.content == content, cut


def test_continuation_usage_counts_only_new_tokens(api: httpx.Client) -> None:
    """Usage of a continuation: completion = the continuation's chunks; the prefix is
    prompt (the original messages hit the cache persisted by the first attempt)."""
    first = read_stream(api, {"model": "deepseek-chat", "messages": MESSAGES, "stream": True})
    assert first.accumulator.usage is not None
    n_total = first.accumulator.usage.completion_tokens
    text_chunks = [
        c for c in first.chunks if c.choices and c.choices[0].delta and c.choices[0].delta.content
    ]
    delivered = "".join(
        delta.content or "" for c in text_chunks[:5] if (delta := c.choices[0].delta) is not None
    )
    prefix = {"role": "assistant", "content": delivered, "prefix": True}
    result = read_stream(
        api,
        {"model": "deepseek-chat", "messages": [*MESSAGES, prefix], "stream": True},
        path="/beta/chat/completions",
    )
    usage = result.accumulator.usage
    assert usage is not None
    assert usage.completion_tokens == n_total - 5
    assert usage.prompt_tokens == message_tokens(MESSAGES[0]) + message_tokens(prefix)
    assert usage.prompt_cache_hit_tokens == message_tokens(MESSAGES[0])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_continuation_max_tokens_counts_from_the_cut(api: httpx.Client) -> None:
    """max_tokens on a continuation bounds only the continuation, so an unbroken answer cut
    by max_tokens M equals prefix(k tokens) + continuation with max_tokens M - k."""
    body = {"model": "deepseek-chat", "messages": MESSAGES, "max_tokens": 12, "stream": True}
    unbroken = read_stream(api, body)
    assert unbroken.finish_reason == "length"
    pieces = [
        c.choices[0].delta.content
        for c in unbroken.chunks
        if c.choices and c.choices[0].delta is not None and c.choices[0].delta.content
    ]
    delivered = "".join(p or "" for p in pieces[:4])
    prefix = {"role": "assistant", "content": delivered, "prefix": True}
    rest = read_stream(
        api,
        {**body, "messages": [*MESSAGES, prefix], "max_tokens": 8},
        path="/beta/chat/completions",
    )
    assert rest.finish_reason == "length"
    assert delivered + rest.content == unbroken.content


def test_prefix_rules_and_the_noprefill_model(api: httpx.Client) -> None:
    """prefix off /beta, prefix not last, vLLM flags misused and a -noprefill model all get a
    400 that names the problem; the -noprefill model answers like its base otherwise."""
    prefix = {"role": "assistant", "content": "Hel", "prefix": True}

    def error(path: str, **body: Any) -> str:
        response = api.post(path, json={"model": "deepseek-chat", "messages": MESSAGES, **body})
        assert response.status_code == 400, response.text
        return str(response.json()["error"]["message"])

    assert "/beta" in error("/chat/completions", messages=[*MESSAGES, prefix])
    assert "last message" in error(
        "/beta/chat/completions", messages=[*MESSAGES, prefix, {"role": "user", "content": "x"}]
    )
    assert "add_generation_prompt" in error(
        "/v1/chat/completions",
        messages=[*MESSAGES, {"role": "assistant", "content": "Hel"}],
        continue_final_message=True,
    )
    assert "assistant" in error(
        "/v1/chat/completions", continue_final_message=True, add_generation_prompt=False
    )
    assert "prefill" in error(
        "/beta/chat/completions", model="deepseek-chat-noprefill", messages=[*MESSAGES, prefix]
    )
    plain = api.post(
        "/chat/completions", json={"model": "deepseek-chat-noprefill", "messages": MESSAGES}
    ).json()
    assert plain["model"] == "deepseek-chat-noprefill"
    assert (
        plain["choices"][0]["message"]["content"]
        == answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)[1]
    )


@pytest.mark.parametrize("model", ["deepseek-chat-noprefill", "deepseek-chat"])
def test_instruction_continuation_continues_the_cut_answer(api: httpx.Client, model: str) -> None:
    """An assistant turn followed by "your answer was cut off, continue" is continued like a
    prefix, on any route: what a well-behaved model does for the `instruction` dialect."""
    _, full = answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)
    cut = len(full) // 3
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": full[:cut]},
        {"role": "user", "content": "Your answer was cut off. Continue exactly where it stopped."},
    ]
    result = read_stream(api, {"model": model, "messages": messages, "stream": True})
    assert full[:cut] + result.content == full
    assert answer_text(model, messages, config=MOCK_CONFIG)[1] == full


def _wrong(text: str) -> str:
    """The same length, one character changed in the middle."""
    i = len(text) // 2
    return text[:i] + ("x" if text[i] != "x" else "y") + text[i + 1 :]


@pytest.mark.parametrize("dialect", ["beta", "vllm", "instruction", "reasoning"])
def test_a_wrong_prefix_of_the_right_length_is_refused_and_counted(
    api: httpx.Client, dialect: str
) -> None:
    """The mock compares a continuation's prefix with the answer's own text: the right text
    is continued (mismatches stay 0); the wrong text of the same length is a 400 naming the
    position, counted in /_mock/stats `prefix_mismatches`, on every resume style."""
    _, full = answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)
    reasoning, _ = answer_text("deepseek-reasoner", MESSAGES, config=MOCK_CONFIG)
    cut = len(full) // 2

    def send(text: str) -> Any:
        if dialect == "beta":
            return continue_(api, "deepseek-chat", {"content": text}, stream=True)
        if dialect == "vllm":
            return continue_(api, "deepseek-chat", {"content": text}, stream=True, vllm=True)
        if dialect == "reasoning":
            prefix = {"content": "", "reasoning_content": text}
            return continue_(api, "deepseek-reasoner", prefix, stream=True)
        messages = [
            *MESSAGES,
            {"role": "assistant", "content": text},
            {
                "role": "user",
                "content": "Your answer was cut off. Continue exactly where it stopped.",
            },
        ]
        return read_stream(api, {"model": "deepseek-chat", "messages": messages, "stream": True})

    good_text = reasoning[: len(reasoning) // 2] if dialect == "reasoning" else full[:cut]
    good = send(good_text)
    assert good.status == 200
    assert api.get("/_mock/stats").json()["prefix_mismatches"] == 0
    bad = send(_wrong(good_text))
    assert bad.status == 400
    assert f"at character {len(good_text) // 2}" in bad.raw.decode()
    assert api.get("/_mock/stats").json()["prefix_mismatches"] == 1
    log = api.get("/_mock/log").json()["entries"]
    assert log[-1]["outcome"] == "prefix_mismatch"
