"""Keeping a conversation inside the context window; pure.

Imports the standard library and core siblings only.

Theory of operation: a conversation is cut into *units* that must stay whole - each system
message at the start, each user message, each assistant message, and an assistant message
that calls tools together with every `tool` message answering those calls (a call without
its result, or a result without its call, is a 400 at DeepSeek and OpenAI alike). Trimming
keeps the leading system messages and then the most recent units that fit the budget, and
starts the kept history at a user message. Token counts are estimates (core.tokens) scaled
by a `Calibration` learnt from the prompt_tokens the API reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unbroken.core.tokens import MESSAGE_OVERHEAD_TOKENS, estimate_tokens

__all__ = [
    "Calibration",
    "TrimResult",
    "estimate_message_tokens",
    "messages_for_request",
    "trim_to_budget",
]

Message = Mapping[str, Any]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def estimate_message_tokens(message: Message) -> int:
    """Estimated tokens of one message: its text, reasoning, tool calls and framing."""
    tokens = MESSAGE_OVERHEAD_TOKENS + estimate_tokens(_text_of(message.get("content")))
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        tokens += estimate_tokens(reasoning)
    for call in message.get("tool_calls") or ():
        if isinstance(call, Mapping):
            function = call.get("function") or {}
            tokens += estimate_tokens(str(function.get("name", "")))
            tokens += estimate_tokens(str(function.get("arguments", ""))) + 3
    return tokens


@dataclass(frozen=True, slots=True)
class Calibration:
    """How far our estimates are from the API's counts: real = estimate * factor.

    `update` moves the factor towards the latest observation (an exponential moving
    average), clamped to [0.25, 4] so one odd response cannot wreck it.
    """

    factor: float = 1.0
    weight: float = 0.3

    def update(self, estimated: int, actual: int) -> Calibration:
        """A calibration that also accounts for one (estimated, reported) pair."""
        if estimated <= 0 or actual <= 0:
            return self
        observed = min(4.0, max(0.25, actual / estimated))
        return Calibration(self.factor + self.weight * (observed - self.factor), self.weight)

    def tokens(self, estimated: int) -> int:
        """A calibrated count."""
        return round(estimated * self.factor)


@dataclass(frozen=True, slots=True)
class TrimResult:
    """The kept messages, how many were dropped, and the calibrated token total.

    `over_budget` is True when even the system messages and the newest unit do not fit
    (they are kept anyway: there is nothing left to drop).
    """

    messages: list[Message]
    dropped: int
    tokens: int
    over_budget: bool


def _units(messages: Sequence[Message]) -> list[list[Message]]:
    units: list[list[Message]] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        unit = [message]
        i += 1
        if message.get("role") == "assistant" and message.get("tool_calls"):
            ids = {c.get("id") for c in message["tool_calls"] if isinstance(c, Mapping)}
            while i < len(messages) and messages[i].get("role") == "tool":
                if messages[i].get("tool_call_id") not in ids:
                    break
                unit.append(messages[i])
                i += 1
        units.append(unit)
    return units


def trim_to_budget(
    messages: Sequence[Message],
    budget_tokens: int,
    *,
    calibration: Calibration | None = None,
) -> TrimResult:
    """Keep the leading system messages and the newest whole units within the budget.

    Args:
        messages: the conversation, oldest first.
        budget_tokens: the most prompt tokens to send (context window minus the room kept
            for the answer).
        calibration: scales estimates to the API's counts.

    Returns:
        a TrimResult; the kept history starts (after the system messages) at a user
        message when any user message is kept, and never splits a tool call from its results.
    """
    cal = calibration or Calibration()
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    system = list(messages[:head])
    units = _units(messages[head:])
    used = cal.tokens(sum(estimate_message_tokens(m) for m in system))
    kept: list[list[Message]] = []
    for unit in reversed(units):
        cost = cal.tokens(sum(estimate_message_tokens(m) for m in unit))
        if kept and used + cost > budget_tokens:
            break
        kept.append(unit)
        used += cost
    kept.reverse()
    # Start at a user turn: a history that opens with an orphan answer confuses models.
    while len(kept) > 1 and kept[0][0].get("role") != "user":
        used -= cal.tokens(sum(estimate_message_tokens(m) for m in kept[0]))
        kept.pop(0)
    flat = system + [m for unit in kept for m in unit]
    return TrimResult(
        messages=flat,
        dropped=len(messages) - len(flat),
        tokens=used,
        over_budget=used > budget_tokens,
    )


def messages_for_request(
    history: Sequence[Message], *, is_deepseek: bool, has_tools: bool
) -> list[dict[str, Any]]:
    """The history as it may be sent (protocol.md §1.11): `reasoning_content` is kept in
    the history but sent only to DeepSeek and only when the request has tools (where V3.2+
    requires it back, else 400); never to other servers. Keys starting with `_` (our own
    bookkeeping) are dropped."""
    out: list[dict[str, Any]] = []
    for message in history:
        item = {k: v for k, v in message.items() if not k.startswith("_")}
        if "reasoning_content" in item and not (is_deepseek and has_tools):
            del item["reasoning_content"]
        out.append(item)
    return out
