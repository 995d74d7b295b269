"""Resume planning: continuation requests per dialect, and overlap removal; pure.

Imports the standard library and core siblings only.

Upstream resume continues a broken generation by sending the partial answer back as the
start of the assistant message, so the model writes only the rest (protocol.md §1.10, §5):

* `deepseek`: base URL + `/beta`, last message `{"role": "assistant", "content": <answer so
  far>, "prefix": true}`; for a reasoner also `"reasoning_content": <reasoning so far>`. A
  break inside the reasoning sends the reasoning so far and `content: ""`: the model goes on
  thinking from there, then answers.
* `vllm`: the partial assistant message last, `continue_final_message: true`,
  `add_generation_prompt: false`, `echo: false`.
* `instruction`: for routes that reject assistant prefill: the partial answer as an ordinary
  assistant turn, then a user turn asking to continue it verbatim; the reply is passed
  through `OverlapTrimmer` so a repeated stretch is not shown twice.
* `none` / `restart`: no continuation; the flow starts over (`restart` only when the
  caller opted in) or falls back to a route that can resume.

Reasoning on routes other than `deepseek`: no API takes a reasoning prefix, so a break
inside the reasoning is continued with `content: ""` and the continuation's own (new)
reasoning is not shown - the consumer already has the part it saw; the answer follows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from unbroken.core.tokens import estimate_tokens

__all__ = [
    "CONTINUE_INSTRUCTION",
    "DROPPABLE_PARAMS",
    "Continuation",
    "Dialect",
    "OverlapTrimmer",
    "is_json_mode",
    "plan_continuation",
    "rejected_param",
]

Dialect = Literal["deepseek", "vllm", "instruction", "none"]

# The user turn of the `instruction` dialect. Explicit about not repeating, because models
# asked to "continue" like to restart the last sentence.
CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off. Continue it exactly where it stopped, starting with the "
    "very next character. Do not repeat anything already written and do not add any preamble."
)

# Optional parameters a server may reject as unknown (vLLM's pydantic "extra inputs are not
# permitted", OpenAI's "unrecognized request argument"). Dropping them changes nothing
# essential about the answer; everything else (model, messages, tools...) is never dropped.
# The vLLM continuation flags are not here: a route that rejects them refuses prefill, which
# the flow handles by switching that route to the `instruction` dialect.
DROPPABLE_PARAMS = (
    "stream_options",
    "user_id",
    "reasoning_effort",
    "thinking",
    "parallel_tool_calls",
    "service_tier",
    "seed",
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
)


@dataclass(frozen=True, slots=True)
class Continuation:
    """A continuation request.

    Attributes:
        body: the request body to send.
        beta: send it under the route's `/beta` path (DeepSeek prefix completion).
        trim_overlap: pass the continuation's text through an OverlapTrimmer.
        hide_reasoning: do not show the continuation's reasoning (see module docstring).
        max_tokens_spent: the original `max_tokens` is used up; the answer ends with
            finish_reason `length` and no request is needed (`body` is empty).
    """

    body: dict[str, Any] = field(default_factory=dict)
    beta: bool = False
    trim_overlap: bool = False
    hide_reasoning: bool = False
    max_tokens_spent: bool = False


def _strip_prefix_messages(messages: list[Any], body: dict[str, Any]) -> list[Any]:
    # A request that itself ended in an assistant prefix (the caller used DeepSeek's prefix
    # completion, or vLLM's continue_final_message): the partial answer extends that prefix,
    # so the old prefix message is replaced.
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return messages
    if last.get("prefix") or body.get("continue_final_message"):
        return messages[:-1]
    return messages


def plan_continuation(
    body: dict[str, Any],
    *,
    dialect: Dialect,
    content: str,
    reasoning: str,
    caller_prefix: str = "",
    spent_tokens: int | None = None,
) -> Continuation | None:
    """Build the request that continues a broken answer, or None when `dialect` cannot.

    Args:
        body: the original request body (not modified).
        dialect: how the target route continues an assistant message.
        content: the answer text delivered so far (for this choice).
        reasoning: the reasoning text delivered so far.
        caller_prefix: an assistant prefix the caller's own request ended with (prefix
            completion); the continuation's prefix is caller_prefix + content.
        spent_tokens: the completion tokens the upstream already produced for this
            choice, when known (counted as streamed); else estimated from the text. The
            continuation's `max_tokens` is what remains of the original.
    """
    if dialect == "none":
        return None
    new = {k: v for k, v in body.items() if k not in ("n", "fallbacks")}
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        if spent_tokens is None:
            spent_tokens = estimate_tokens(content) + estimate_tokens(reasoning)
        remaining = max_tokens - spent_tokens
        if remaining <= 0:
            return Continuation(max_tokens_spent=True)
        new["max_tokens"] = remaining
    messages = _strip_prefix_messages(list(body.get("messages") or []), body)
    prefix = caller_prefix + content
    if dialect == "deepseek":
        message: dict[str, Any] = {"role": "assistant", "content": prefix, "prefix": True}
        if reasoning:
            message["reasoning_content"] = reasoning
        new["messages"] = [*messages, message]
        return Continuation(body=new, beta=True)
    if dialect == "vllm":
        new["messages"] = [*messages, {"role": "assistant", "content": prefix}]
        new["continue_final_message"] = True
        new["add_generation_prompt"] = False
        new["echo"] = False
        return Continuation(body=new, hide_reasoning=bool(reasoning))
    new["messages"] = [
        *messages,
        {"role": "assistant", "content": prefix},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    return Continuation(body=new, trim_overlap=True, hide_reasoning=bool(reasoning))


def is_json_mode(body: dict[str, Any]) -> bool:
    """True when the request asks for `response_format: {"type": "json_object"}`."""
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_object"


def rejected_param(body: dict[str, Any], message: str, param: str | None) -> str | None:
    """The droppable parameter a 400/422 complains about, if the body has it (matched as a
    whole word, so `logprobs` is not found inside `top_logprobs`)."""
    text = message.lower()
    for name in DROPPABLE_PARAMS:
        if name in body and (param == name or re.search(rf"(?<![a-z_]){name}(?![a-z_])", text)):
            return name
    return None


class OverlapTrimmer:
    """Removes text a continuation repeats from the end (or the start) of the prefix.

    The first `window` characters of the continuation are held back. Once enough arrived
    (or the stream ended), the longest stretch at the start of the continuation that equals
    the end of the prefix (at least `min_overlap` characters) is dropped; a continuation
    that restarts the whole answer from its beginning has the whole prefix dropped.

    Args:
        prefix: the text delivered before the break.
        window: how many characters to hold before deciding.
        min_overlap: shorter matches are taken as coincidence and kept.
    """

    __slots__ = ("_buffer", "_decided", "_prefix", "_skip", "_window", "min_overlap")

    def __init__(self, prefix: str, *, window: int = 160, min_overlap: int = 4) -> None:
        self._prefix = prefix
        self._window = max(1, min(window, len(prefix) + 1)) if prefix else 1
        self.min_overlap = min_overlap
        self._buffer = ""
        self._decided = not prefix
        self._skip = 0  # characters of a whole-answer restart still to drop

    def _overlap(self, text: str) -> int:
        prefix = self._prefix
        if text.startswith(prefix[: len(text)]) and len(text) >= min(len(prefix), self._window):
            return -1  # restart from the beginning
        longest = 0
        for k in range(min(len(text), len(prefix)), self.min_overlap - 1, -1):
            if prefix.endswith(text[:k]):
                longest = k
                break
        return longest

    def feed(self, text: str) -> str:
        """Continuation text in; the text to show out (possibly empty while holding)."""
        if self._decided:
            if self._skip:
                dropped = min(self._skip, len(text))
                self._skip -= dropped
                text = text[dropped:]
            return text
        self._buffer += text
        if len(self._buffer) < self._window:
            return ""
        return self._decide()

    def flush(self) -> str:
        """The continuation ended: decide on what is held and release the rest."""
        return "" if self._decided else self._decide()

    def _decide(self) -> str:
        self._decided = True
        text, self._buffer = self._buffer, ""
        overlap = self._overlap(text)
        if overlap < 0:
            drop = min(len(self._prefix), len(text))
            self._skip = len(self._prefix) - drop
            return text[drop:]
        return text[overlap:]
