"""What the mock DeepSeek will answer: `answer_text`, for tests that assert byte-identical
results. Imports mock siblings only (no server, no I/O).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from unbroken.mock.config import MockConfig
from unbroken.mock.request import MODELS, asks_to_continue
from unbroken.mock.text import apply_stop, generate_answer, limit_answer

__all__ = ["answer_text"]


def answer_text(
    model: str,
    messages: Sequence[Mapping[str, object]],
    seed: int | None = None,
    *,
    n_tokens: int | None = None,
    config: MockConfig | None = None,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    tools: Sequence[Mapping[str, object]] = (),
    tool_choice: object = None,
    json_object: bool = False,
    thinking: bool | None = None,
) -> tuple[str, str]:
    """The whole answer the mock gives to a conversation, as (reasoning, content).

    The same function the server uses, so a stream, a non-stream answer and any resumed
    answer (prefix + continuation) must equal it byte for byte.

    Args:
        model: the model id (`deepseek-chat`, `deepseek-reasoner`, a `-noprefill` variant).
        messages: the request's messages; a trailing assistant message with `prefix: true`
            (or an assistant turn followed by a "cut off ... continue" user turn) is ignored,
            as the server ignores it when choosing the answer.
        seed: the request's `seed` field; None means the server's (`config.seed`).
        n_tokens: the `X-Mock-Tokens` header, if the request sends one.
        config: the server's configuration (its seed and answer-length ranges).
        max_tokens: the request's `max_tokens`; without it and without `n_tokens` the
            mode's default applies (4096 for chat, 32768 in thinking mode).
        stop: the request's stop sequences.
        tools: the request's tools (an answer that calls tools has empty content).
        tool_choice: the request's tool_choice.
        json_object: `response_format` json_object.
        thinking: the request's `thinking` switch; None keeps the model's mode.

    Returns:
        (reasoning, content); reasoning is "" outside thinking mode.

    Raises:
        ValueError: the model id is unknown.
    """
    info = MODELS.get(model)
    if info is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    config = config or MockConfig()
    is_thinking = info.thinking if thinking is None else thinking
    conversation = list(messages)
    last = conversation[-1] if conversation else {}
    if last.get("role") == "assistant" and last.get("prefix"):
        conversation.pop()
    elif asks_to_continue([dict(m) for m in conversation]):
        del conversation[-2:]
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    answer = generate_answer(
        is_thinking,
        conversation,
        config.seed if seed is None else seed,
        n_tokens=n_tokens,
        answer_tokens=config.answer_tokens,
        reasoning_tokens=config.reasoning_tokens,
        tools=tools,
        tool_choice=tool_choice,
        json_mode=json_object,
    )
    answer, _ = apply_stop(answer, stops)
    if max_tokens is None and n_tokens is None:
        max_tokens = 32768 if is_thinking else 4096
    answer, _ = limit_answer(answer, max_tokens)
    return answer.reasoning_text, answer.content_text
