"""Unit tests of core.resume: continuation requests per dialect, rejected parameters and
overlap removal."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.core.resume import (
    CONTINUE_INSTRUCTION,
    DROPPABLE_PARAMS,
    Continuation,
    OverlapTrimmer,
    plan_continuation,
    rejected_param,
)

USER = {"role": "user", "content": "hi"}


def request(**extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [USER], "stream": True, **extra}


# -- plan_continuation ----------------------------------------------------------------------


def test_deepseek_continues_with_a_beta_prefix() -> None:
    """deepseek: `/beta`, the answer so far as an assistant prefix; `n` and `fallbacks` go."""
    body = request(n=2, fallbacks=["x"], temperature=0.5)
    before = copy.deepcopy(body)
    plan = plan_continuation(body, dialect="deepseek", content="Hel", reasoning="")
    assert plan == Continuation(
        body={
            "model": "deepseek-chat",
            "messages": [USER, {"role": "assistant", "content": "Hel", "prefix": True}],
            "stream": True,
            "temperature": 0.5,
        },
        beta=True,
    )
    assert body == before  # the caller's body is not modified


def test_deepseek_reasoner_sends_the_reasoning_so_far() -> None:
    """deepseek reasoner: the reasoning so far goes in `reasoning_content` (content may be "")."""
    plan = plan_continuation(request(), dialect="deepseek", content="", reasoning="Think")
    assert plan is not None
    assert plan.body["messages"][-1] == {
        "role": "assistant",
        "content": "",
        "prefix": True,
        "reasoning_content": "Think",
    }
    assert (plan.beta, plan.hide_reasoning, plan.trim_overlap) == (True, False, False)


@pytest.mark.parametrize("reasoning", ["", "Think"])
def test_vllm_continues_the_final_message(reasoning: str) -> None:
    """vllm: the partial message last plus vLLM's flags; new reasoning is hidden."""
    plan = plan_continuation(request(), dialect="vllm", content="Hel", reasoning=reasoning)
    assert plan == Continuation(
        body={
            "model": "deepseek-chat",
            "messages": [USER, {"role": "assistant", "content": "Hel"}],
            "stream": True,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "echo": False,
        },
        hide_reasoning=bool(reasoning),
    )


@pytest.mark.parametrize("reasoning", ["", "Think"])
def test_instruction_asks_to_continue_and_trims_overlap(reasoning: str) -> None:
    """instruction: assistant turn + a user turn asking to continue; overlap is trimmed."""
    plan = plan_continuation(request(), dialect="instruction", content="Hel", reasoning=reasoning)
    assert plan == Continuation(
        body={
            "model": "deepseek-chat",
            "messages": [
                USER,
                {"role": "assistant", "content": "Hel"},
                {"role": "user", "content": CONTINUE_INSTRUCTION},
            ],
            "stream": True,
        },
        trim_overlap=True,
        hide_reasoning=bool(reasoning),
    )


def test_none_cannot_continue() -> None:
    """none: no continuation request exists."""
    assert plan_continuation(request(), dialect="none", content="Hel", reasoning="") is None


@pytest.mark.parametrize("dialect", ["deepseek", "vllm", "instruction"])
def test_max_tokens_is_what_remains(dialect: Any) -> None:
    """max_tokens becomes what is left after the estimated tokens already delivered."""
    plan = plan_continuation(
        request(max_tokens=100), dialect=dialect, content="abcdefghij", reasoning="你好"
    )
    assert plan is not None
    assert plan.body["max_tokens"] == 100 - 3 - 2
    assert not plan.max_tokens_spent


@pytest.mark.parametrize("max_tokens", [3, 2])
def test_max_tokens_spent_needs_no_request(max_tokens: int) -> None:
    """When the delivered text used up max_tokens, the plan says so and has no body."""
    plan = plan_continuation(
        request(max_tokens=max_tokens), dialect="deepseek", content="abcdefghij", reasoning=""
    )
    assert plan == Continuation(max_tokens_spent=True)
    assert plan.body == {}


@pytest.mark.parametrize("max_tokens", [True, 10.5, None, "7"])
def test_non_integer_max_tokens_is_left_alone(max_tokens: object) -> None:
    """Only a real int max_tokens is reduced (a bool or float is passed through unchanged)."""
    plan = plan_continuation(
        request(max_tokens=max_tokens), dialect="deepseek", content="abc", reasoning=""
    )
    assert plan is not None
    assert plan.body["max_tokens"] == max_tokens


@pytest.mark.parametrize("vllm", [False, True])
def test_caller_prefix_replaces_the_callers_prefix_message(vllm: bool) -> None:
    """A caller's own prefix message (DeepSeek `prefix: true` or vLLM's
    continue_final_message) is replaced by caller_prefix + the answer so far."""
    last: dict[str, Any] = {"role": "assistant", "content": "Once"}
    extra: dict[str, Any] = {"continue_final_message": True} if vllm else {}
    if not vllm:
        last["prefix"] = True
    body = request(messages=[USER, last], **extra)
    plan = plan_continuation(
        body, dialect="deepseek", content=" upon", reasoning="", caller_prefix="Once"
    )
    assert plan is not None
    assert plan.body["messages"] == [
        USER,
        {"role": "assistant", "content": "Once upon", "prefix": True},
    ]


@pytest.mark.parametrize(
    "messages",
    [
        [USER, {"role": "assistant", "content": "earlier turn"}],
        [USER, "not a dict"],
        [USER],
    ],
    ids=["assistant_without_prefix", "non_dict", "user_last"],
)
def test_other_last_messages_are_kept(messages: list[Any]) -> None:
    """Only an assistant *prefix* message is replaced; anything else stays in the history."""
    plan = plan_continuation(request(messages=messages), dialect="vllm", content="x", reasoning="")
    assert plan is not None
    assert plan.body["messages"][:-1] == messages


@pytest.mark.parametrize("body", [{"model": "m"}, {"model": "m", "messages": None}])
def test_missing_messages(body: dict[str, Any]) -> None:
    """A body without messages still gets the assistant prefix as its only message."""
    plan = plan_continuation(body, dialect="deepseek", content="x", reasoning="")
    assert plan is not None
    assert plan.body["messages"] == [{"role": "assistant", "content": "x", "prefix": True}]


# -- rejected_param -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message", "param", "expected"),
    [
        (
            request(stream_options={}),
            "Unrecognized request argument supplied: stream_options",
            None,
            "stream_options",
        ),
        (
            request(stream_options={}),
            "STREAM_OPTIONS: Extra inputs are not permitted",
            None,
            "stream_options",
        ),
        (request(seed=1), "extra inputs are not permitted", "seed", "seed"),
        (request(seed=1), "extra inputs are not permitted", None, None),
        (request(), "Unrecognized request argument supplied: stream_options", None, None),
        (request(), "model: field required", "model", None),
        (request(max_tokens=10), "max_tokens is too large", None, None),
        (request(echo=False, seed=1), "unknown field: echo", None, None),
        (
            request(logprobs=True, top_logprobs=3),
            "top_logprobs: not supported",
            None,
            "top_logprobs",
        ),
        (request(logprobs=True), "top_logprobs: not supported", None, None),
    ],
)
def test_rejected_param(
    body: dict[str, Any], message: str, param: str | None, expected: str | None
) -> None:
    """The droppable parameter the error names (by `param` or message) if the body has it."""
    assert rejected_param(body, message, param) == expected


@given(
    keys=st.sets(st.sampled_from([*DROPPABLE_PARAMS, "model", "messages", "tools", "max_tokens"])),
    message=st.text(alphabet=st.sampled_from("abcdeghiklmnoprstuy_: "), max_size=40)
    | st.sampled_from([f"bad {p}" for p in (*DROPPABLE_PARAMS, "model", "tools")]),
    param=st.none() | st.sampled_from([*DROPPABLE_PARAMS, "model", "tools"]),
)
def test_rejected_param_finds_droppable_params_only(
    keys: set[str], message: str, param: str | None
) -> None:
    """Property: only a droppable parameter the body has and the error names is found."""
    body = dict.fromkeys(keys, 1)
    found = rejected_param(body, message, param)
    if found is not None:
        assert found in DROPPABLE_PARAMS
        assert found in body
        assert found == param or found in message.lower()
    if param in DROPPABLE_PARAMS and param in body:
        assert found is not None


# -- OverlapTrimmer -------------------------------------------------------------------------


def trim(prefix: str, pieces: list[str], **kwargs: int) -> tuple[str, list[str]]:
    """Feed the pieces, then flush; returns the whole output and the per-feed outputs."""
    trimmer = OverlapTrimmer(prefix, **kwargs)
    outs = [trimmer.feed(p) for p in pieces]
    outs.append(trimmer.flush())
    return "".join(outs), outs


def cut(text: str, points: list[int]) -> list[str]:
    """`text` split at the given points (any order, duplicates allowed)."""
    bounds = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def test_empty_prefix_passes_through() -> None:
    """With nothing delivered before the break there is nothing to trim or hold."""
    trimmer = OverlapTrimmer("")
    assert trimmer.feed("Hello") == "Hello"
    assert trimmer.flush() == ""


def test_repeated_tail_is_dropped() -> None:
    """A continuation that repeats the end of the prefix has the repeat dropped."""
    assert trim("The quick brown fox", ["brown fox", " jumps"])[0] == " jumps"


def test_text_is_held_until_the_window_fills() -> None:
    """Nothing is shown until `window` characters arrived; then the decision is made once."""
    _, outs = trim("abcdefgh", ["ef", "gh", "ij", "kl", "mn"], window=6)
    assert outs == ["", "", "ij", "kl", "mn", ""]


def test_window_is_at_most_one_more_than_the_prefix() -> None:
    """A short prefix decides after len(prefix) + 1 characters, not the whole window."""
    _, outs = trim("abcd", ["abc", "de", "f"])
    assert outs == ["", "e", "f", ""]


def test_short_matches_are_kept_as_coincidence() -> None:
    """A match shorter than min_overlap (a shared space or letter) is not dropped."""
    assert trim("say hi", ["hi there"], min_overlap=4)[0] == "hi there"
    assert trim("say hi", ["hi there"], min_overlap=2)[0] == " there"


def test_longest_overlap_wins_on_ambiguous_text() -> None:
    """On self-repeating text the longest matching stretch is dropped (it is ambiguous)."""
    assert trim("xaaaaaa", ["aaaaaab"])[0] == "b"


def test_long_restart_is_skipped_across_feeds() -> None:
    """A restart of a prefix longer than the window is dropped piece by piece."""
    prefix = "".join(chr(0x4E00 + i) for i in range(300))
    pieces = [prefix[i : i + 7] for i in range(0, 300, 7)] + ["!"]
    output, outs = trim(prefix, pieces)
    assert output == "!"
    assert set(outs[:-2]) == {""}


def test_restart_is_recognised_at_the_window_or_at_the_end() -> None:
    """A restart is dropped when the window fills, or at flush after the whole prefix."""
    assert trim("Hello wor", ["Hello", " world"]) == ("ld", ["", "ld", ""])
    assert trim("Hello", ["Hel", "lo"]) == ("", ["", "", ""])


def test_flush_after_decision_releases_nothing() -> None:
    """flush() after the decision has nothing more to give."""
    trimmer = OverlapTrimmer("ab", window=1)
    assert trimmer.feed("xyz") == "xyz"
    assert trimmer.flush() == ""


distinct_text = st.lists(st.characters(), unique=True, max_size=60).map("".join)


@given(
    text=distinct_text,
    data=st.data(),
    window=st.integers(1, 200),
    min_overlap=st.integers(1, 6),
)
def test_prefix_plus_trimmed_continuation_is_the_text(
    text: str, data: st.DataObject, window: int, min_overlap: int
) -> None:
    """Property: T[:c] + trimmed(T[c-k:]) == T for any cut c and repeat k >= min_overlap."""
    c = data.draw(st.integers(0, len(text)))
    limit = min(c, window)
    k = data.draw(st.integers(min(min_overlap, limit), limit)) if c else 0
    if 0 < k < min_overlap:
        k = 0  # the prefix is too short for any repeat to count: none is made
    continuation = text[c - k :]
    pieces = cut(continuation, data.draw(st.lists(st.integers(0, 100), max_size=8)))
    output, _ = trim(text[:c], pieces, window=window, min_overlap=min_overlap)
    assert text[:c] + output == text


@given(text=st.text(max_size=400), data=st.data(), window=st.integers(1, 200))
def test_full_restart_is_dropped(text: str, data: st.DataObject, window: int) -> None:
    """Property: for any text T and cut c, T[:c] + trimmed(T) == T (a full restart)."""
    c = data.draw(st.integers(0, len(text)))
    pieces = cut(text, data.draw(st.lists(st.integers(0, 500), max_size=8)))
    output, _ = trim(text[:c], pieces, window=window)
    assert text[:c] + output == text


# Repetitive text over a tiny alphabet: many stretches match, so the trimmer's choice (the
# longest repeat, or a restart) is exercised where unique characters never reach it.
repetitive_text = st.lists(st.sampled_from(["ab", "a", "b", "ab ", "🚀", "ä"]), max_size=40).map(
    "".join
)


@settings(max_examples=300)  # cheap, and ambiguous repeats are what it is here for
@given(
    text=repetitive_text,
    data=st.data(),
    window=st.integers(1, 200),
    min_overlap=st.integers(1, 6),
)
def test_trimming_repetitive_text_drops_only_a_real_repeat(
    text: str, data: st.DataObject, window: int, min_overlap: int
) -> None:
    """Property on repetitive text: the output is the continuation less a leading stretch
    that is either nothing, a real repeat of the prefix's end (>= min_overlap), or a
    restart (it begins like the prefix, as far as the window sees, and is as long); and
    never less than the repeat actually made."""
    c = data.draw(st.integers(0, len(text)))
    limit = min(c, window)
    k = data.draw(st.integers(min(min_overlap, limit), limit)) if c else 0
    if 0 < k < min_overlap:
        k = 0
    prefix, continuation = text[:c], text[c - k :]
    pieces = cut(continuation, data.draw(st.lists(st.integers(0, 100), max_size=8)))
    output, _ = trim(prefix, pieces, window=window, min_overlap=min_overlap)
    assert continuation.endswith(output)
    dropped = continuation[: len(continuation) - len(output)]
    is_repeat = len(dropped) >= min_overlap and prefix.endswith(dropped)
    # A restart is recognised on the first `window` characters; the rest of the prefix's
    # length is then skipped unseen (documented: it is dropped piece by piece).
    seen = min(window, c)
    is_restart = (
        len(dropped) == min(c, len(continuation))
        and dropped[:seen] == prefix[: len(dropped)][:seen]
    )
    assert dropped == "" or is_repeat or is_restart, (prefix, continuation, dropped)
    assert len(dropped) >= k
