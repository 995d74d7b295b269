"""Unit tests of core.window: trimming keeps system + newest whole units, never splits a
tool call from its results; calibration; what may be sent back."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.window import (
    Calibration,
    _units,
    estimate_message_tokens,
    messages_for_request,
    trim_to_budget,
)


def call(i: int) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(st.text(max_size=40))})
    for i in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["user", "assistant", "tools"]))
        if kind == "tools":
            messages.append(call(i))
            messages.append(
                {"role": "tool", "tool_call_id": f"c{i}", "content": draw(st.text(max_size=30))}
            )
        else:
            messages.append({"role": kind, "content": draw(st.text(max_size=60))})
    messages.append({"role": "user", "content": draw(st.text(max_size=30))})
    return messages


@given(conversations(), st.integers(0, 400))
def test_trim_properties(messages: list[dict[str, Any]], budget: int) -> None:
    """Kept = leading system + a suffix of the rest, newest message always kept, tool calls
    and results never separated, within budget unless nothing more can go."""
    result = trim_to_budget(messages, budget)
    kept = result.messages
    system = [m for m in messages[:1] if m["role"] == "system"]
    assert kept[: len(system)] == system
    rest = kept[len(system) :]
    assert messages[len(messages) - len(rest) :] == rest
    assert kept[-1] is messages[-1]
    assert result.dropped == len(messages) - len(kept)
    ids_called = {c["id"] for m in kept for c in m.get("tool_calls", ())}
    for m in kept:
        if m["role"] == "tool":
            assert m["tool_call_id"] in ids_called
    for i, m in enumerate(kept):
        if m.get("tool_calls"):
            assert kept[i + 1]["role"] == "tool"
    if len(rest) > 1:
        assert rest[0]["role"] == "user"
    total = sum(estimate_message_tokens(m) for m in kept)
    assert result.tokens == total
    assert result.over_budget == (total > budget)
    # Tight: exactly the newest units that fit are kept. The oracle groups units itself (the
    # generator puts each tool result right after its call) and counts by brute force.
    units: list[list[dict[str, Any]]] = []
    for m in messages[len(system) :]:
        if m["role"] == "tool":
            units[-1].append(m)
        else:
            units.append([m])
    fixed = sum(estimate_message_tokens(m) for m in system)

    def fits(k: int) -> bool:
        tail = [m for unit in units[-k:] for m in unit]
        return fixed + sum(estimate_message_tokens(m) for m in tail) <= budget

    best = max(
        k
        for k in range(1, len(units) + 1)
        if k == 1 or (fits(k) and units[-k][0]["role"] == "user")
    )
    assert len(rest) == sum(len(unit) for unit in units[-best:])


def test_trim_drops_oldest_turns_first() -> None:
    """With room for two turns, the two newest are kept."""
    messages = (
        [{"role": "system", "content": "be brief"}]
        + [{"role": r, "content": "x" * 100} for r in ["user", "assistant"] * 5]
        + [{"role": "user", "content": "last"}]
    )
    cost = estimate_message_tokens(messages[1])
    result = trim_to_budget(messages, estimate_message_tokens(messages[0]) + 3 * cost + 10)
    assert [m["content"] for m in result.messages][-1] == "last"
    assert result.messages[0]["role"] == "system"
    assert result.messages[1]["role"] == "user"
    assert len(result.messages) == 4


def test_calibration_moves_towards_reports_and_is_clamped() -> None:
    """Estimates are scaled by what the API reported, within [0.25, 4]."""
    cal = Calibration()
    cal = cal.update(100, 150)
    assert 1.0 < cal.factor < 1.5
    assert cal.update(0, 10) is cal
    wild = Calibration(weight=1.0).update(10, 10_000)
    assert wild.factor == 4.0
    assert wild.tokens(10) == 40


def test_reasoning_sent_only_to_deepseek_with_tools() -> None:
    """reasoning_content stays in history but is sent only to DeepSeek with tools."""
    history = [{"role": "assistant", "content": "a", "reasoning_content": "r", "_meta": 1}]
    assert messages_for_request(history, is_deepseek=True, has_tools=True) == [
        {"role": "assistant", "content": "a", "reasoning_content": "r"}
    ]
    for deepseek, tools in [(True, False), (False, True), (False, False)]:
        assert messages_for_request(history, is_deepseek=deepseek, has_tools=tools) == [
            {"role": "assistant", "content": "a"}
        ]


def test_content_parts_and_tool_calls_are_counted() -> None:
    """OpenAI content parts and tool-call arguments count toward the estimate."""
    parts = {"role": "user", "content": [{"type": "text", "text": "hello " * 10}]}
    assert estimate_message_tokens(parts) > estimate_message_tokens({"role": "user", "content": ""})
    assert estimate_message_tokens(call(1)) > estimate_message_tokens(
        {"role": "assistant", "content": ""}
    )
    assert estimate_message_tokens({"role": "user", "content": None}) == 4


def test_reasoning_counts_and_odd_tool_call_entries_are_skipped() -> None:
    """Reasoning counts toward the estimate; a non-object tool-call entry is skipped."""
    plain = {"role": "assistant", "content": "a"}
    base = estimate_message_tokens(plain)
    assert estimate_message_tokens({**plain, "reasoning_content": "abcdefghij"}) == base + 3
    assert estimate_message_tokens({**plain, "tool_calls": ["junk"]}) == base


def test_tool_result_for_another_call_is_not_glued_to_the_call() -> None:
    """A tool message answering another call id starts a unit of its own."""
    user = {"role": "user", "content": "q"}
    mine = {"role": "tool", "tool_call_id": "c1", "content": "ok"}
    other = {"role": "tool", "tool_call_id": "c9", "content": "x"}
    assert _units([user, call(1), mine, other]) == [[user], [call(1), mine], [other]]
