"""The pure engine (core.flow + core.attempt) against a pure simulated upstream: for every cut
point of an answer, delivered prefix + continuation == the whole answer, per dialect, for
chat and reasoner, with one or two breaks. No sockets, no clock, no sleeping."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Attempt
from unbroken.core.backoff import RetryBudget, RetryPolicy
from unbroken.core.breaker import CircuitBreaker
from unbroken.core.flow import AttemptOutcome, AttemptPlan, Connect, FlowOptions, Sleep, answer_flow
from unbroken.core.resume import CONTINUE_INSTRUCTION, Dialect
from unbroken.core.routes import Route, RouteHealth
from unbroken.core.wire import ChatCompletionChunk
from unbroken.errors import RetriesExhausted, UnbrokenError, UpstreamStatusError

CONTENT = "Hello, 世界! Streams 🚀 arrive whole, exactly once. Ünïcode too. "
REASONING = "First think: 思考 step one, step two. "
MESSAGES = [{"role": "user", "content": "hi"}]


def pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        out.append(text[i : i + n])
        i += n
    return out


def sse(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    chunk: dict[str, Any] = {
        "id": "sim",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "sim",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


_CACHE: dict[tuple[Any, ...], bytes] = {}


WRONG_PREFIX = "<a continuation of text this model never wrote>"


@dataclass
class Upstream:
    """A model that answers REASONING + CONTENT and continues any prefix exactly (or, for
    the instruction dialect, repeats `overlap` characters first, as real models do).

    A continuation's prefix is compared with the answer's own text: one that is not the
    start of it (a resume that sent the wrong text, even of the right length) is counted in
    `mismatches` and continued with WRONG_PREFIX, as a real model continues whatever it is
    given, so the consumer's text is wrong too."""

    reasoner: bool = False
    overlap: int = 0
    mismatches: int = 0

    def answer(self, plan: AttemptPlan) -> bytes:
        reasoning_done, content_done, _ = self._prefix(plan)
        if not (CONTENT.startswith(content_done) and REASONING.startswith(reasoning_done)):
            self.mismatches += 1
        key = (
            self.reasoner,
            self.overlap,
            plan.beta,
            plan.continuation is not None and plan.continuation.hide_reasoning,
            msgspec.json.encode(plan.body),
        )
        blob = _CACHE.get(key)
        if blob is None:
            blob = _CACHE[key] = self._answer(plan)
        return blob

    def _prefix(self, plan: AttemptPlan) -> tuple[str, str, str]:
        """(reasoning, content) the request says were already written, and the overlap the
        model repeats first."""
        messages = plan.body["messages"]
        last = messages[-1]
        if plan.beta and last.get("prefix"):
            return last.get("reasoning_content", ""), last["content"], ""
        if plan.body.get("continue_final_message"):
            return REASONING if self.reasoner else "", last["content"], ""
        if last.get("content") == CONTINUE_INSTRUCTION:
            content_done = messages[-2]["content"]
            repeat = (
                content_done[max(0, len(content_done) - self.overlap) :] if self.overlap else ""
            )
            return REASONING if self.reasoner else "", content_done, repeat
        return "", "", ""

    def _answer(self, plan: AttemptPlan) -> bytes:
        reasoning_done, content_done, repeat = self._prefix(plan)
        out = [sse({"role": "assistant", "content": ""})]
        if self.reasoner and plan.continuation is not None and plan.continuation.hide_reasoning:
            out.append(sse({"reasoning_content": "(a new line of thought)"}))
        if self.reasoner:
            rest = REASONING[len(reasoning_done) :]
            if not REASONING.startswith(reasoning_done):
                rest = WRONG_PREFIX
            out += [sse({"reasoning_content": p}) for p in pieces(rest, 1)]
        if repeat:
            out.append(sse({"content": repeat}))
        rest = CONTENT[len(content_done) :]
        if not CONTENT.startswith(content_done):
            rest = WRONG_PREFIX
        out += [sse({"content": p}) for p in pieces(rest, 2)]
        out.append(
            sse(
                {"content": ""},
                "stop",
                {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
            )
        )
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)


@dataclass
class Break:
    """How attempt `attempt` breaks: cut after `at` bytes, as a reset, stall or interrupt."""

    attempt: int
    at: int
    how: str = "reset"


def run(
    upstream: Upstream,
    breaks: list[Break],
    *,
    dialect: Dialect = "deepseek",
    policy: RetryPolicy | None = None,
    statuses: dict[int, int] | None = None,
    plans: list[AttemptPlan] | None = None,
) -> tuple[str, str, int, list[str], list[AttemptPlan]]:
    """Drive the flow purely; returns (text, reasoning, roles, finishes, plans); the plans
    also go to `plans` when given (to see them when the flow raises)."""
    route = Route("sim", "http://sim", dialect=dialect)
    answer = ChunkAccumulator()
    flow = answer_flow(
        {"model": "m", "messages": MESSAGES, "stream": True},
        [route],
        {"sim": RouteHealth(CircuitBreaker(100, 1))},
        answer,
        policy=policy or RetryPolicy(attempts=10, max_resumes=8),
        budget=RetryBudget(cap=100),
        rng=random.Random(0),
        now=0.0,
        options=FlowOptions(),
    )
    text, thoughts, roles, finishes = [], [], 0, []
    plans = [] if plans is None else plans
    now = 0.0
    outcome: AttemptOutcome | None = None
    action = next(flow)
    while True:
        if isinstance(action, Sleep):
            now += action.seconds
            outcome = None
        else:
            assert isinstance(action, Connect)
            plan = action.plan
            plans.append(plan)
            number = len(plans)
            attempt = Attempt(plan, answer, now=now)
            attempt.on_headers(now)
            status = (statuses or {}).get(number)
            if status is not None:
                attempt.finish(now, timed_out=True)
                error: UnbrokenError | None = UpstreamStatusError(
                    "refused", status_code=status, kind="overloaded"
                )
                outcome = AttemptOutcome(end=None, error=error, now=now)
            else:
                blob = upstream.answer(plan)
                cut = next((b for b in breaks if b.attempt == number), None)
                data = blob if cut is None else blob[: cut.at]
                if cut is not None and cut.how == "interrupt" and b'"stop"' not in data:
                    data = data[: data.rfind(b"\n\n") + 2] + sse({}, "insufficient_system_resource")
                delivered: list[ChatCompletionChunk] = []
                for i in range(0, len(data), 29):  # 29-byte reads cut inside characters
                    delivered += attempt.feed(data[i : i + 29], now)
                delivered += attempt.finish(now, timed_out=cut is not None and cut.how == "stall")
                for chunk in delivered:
                    for choice in chunk.choices:
                        if choice.delta is not None:
                            text.append(choice.delta.content or "")
                            thoughts.append(choice.delta.reasoning_content or "")
                            roles += choice.delta.role is not None
                        if choice.finish_reason:
                            finishes.append(choice.finish_reason)
                error = attempt.timeout_error("idle") if cut and cut.how == "stall" else None
                outcome = AttemptOutcome(end=attempt.verdict, error=error, now=now)
        try:
            action = flow.send(outcome)
        except StopIteration:
            break
    folded = answer.completion().choices[0].message
    assert folded.content == "".join(text)
    return "".join(text), "".join(thoughts), roles, finishes, plans


def stream_length(upstream: Upstream) -> int:
    return len(
        upstream.answer(AttemptPlan(route=Route("x", "http://x"), body={"messages": MESSAGES}))
    )


@pytest.mark.parametrize(
    ("dialect", "how", "step"),
    [
        ("deepseek", "reset", 1),  # every single byte
        ("deepseek", "stall", 4),
        ("deepseek", "interrupt", 4),
        ("vllm", "reset", 3),
        ("instruction", "reset", 3),
        ("instruction", "stall", 5),
    ],
)
def test_every_cut_point_gives_the_whole_answer(dialect: Dialect, how: str, step: int) -> None:
    """For every byte at which the first attempt can break, the consumer gets the whole
    answer once: one role, one finish, no repeat, no gap."""
    upstream = Upstream(overlap=6 if dialect == "instruction" else 0)
    for at in range(0, stream_length(upstream), step):
        text, _, roles, finishes, _ = run(upstream, [Break(1, at, how)], dialect=dialect)
        assert text == CONTENT, (dialect, how, at)
        assert roles == 1
        assert finishes == ["stop"]
    assert upstream.mismatches == 0


@settings(deadline=None)
@given(st.data())
def test_reasoner_two_breaks_anywhere(data: st.DataObject) -> None:
    """A reasoner's answer broken twice anywhere (inside the reasoning or the answer)
    arrives whole, reasoning included, on DeepSeek's prefix dialect."""
    upstream = Upstream(reasoner=True)
    size = stream_length(upstream)
    first = data.draw(st.integers(0, size - 1))
    second = data.draw(st.integers(0, size // 2))
    how = data.draw(st.sampled_from(["reset", "stall", "interrupt"]))
    text, reasoning, roles, finishes, plans = run(
        upstream, [Break(1, first, how), Break(2, second)]
    )
    assert (text, reasoning) == (CONTENT, REASONING)
    assert roles == 1
    assert finishes == ["stop"]
    assert all(p.beta for p in plans if p.continuation is not None)
    assert upstream.mismatches == 0


@settings(deadline=None)
@given(st.integers(0, 4000), st.sampled_from(["vllm", "instruction"]))
def test_other_dialects_hide_a_second_line_of_thought(at: int, dialect: Dialect) -> None:
    """Without a reasoning prefix, a continuation's new reasoning is not shown; the answer
    text still arrives whole."""
    upstream = Upstream(reasoner=True, overlap=4 if dialect == "instruction" else 0)
    at = at % stream_length(upstream)
    text, reasoning, roles, _, _ = run(upstream, [Break(1, at)], dialect=dialect)
    assert text == CONTENT
    assert REASONING.startswith(reasoning)
    assert "new line of thought" not in reasoning
    assert roles == 1
    assert upstream.mismatches == 0


def test_break_before_any_output_is_a_plain_retry() -> None:
    """Nothing shown yet: the retry is the original request, not a continuation."""
    upstream = Upstream()
    text, _, _, _, plans = run(upstream, [Break(1, 10)])
    assert text == CONTENT
    assert [p.kind for p in plans] == ["first", "retry"]
    assert plans[1].continuation is None
    assert plans[1].body["messages"] == MESSAGES


def test_retries_then_success_after_status_errors() -> None:
    """503s before any output are retried with backoff; then the answer arrives."""
    text, _, _, _, plans = run(Upstream(), [], statuses={1: 503, 2: 503})
    assert text == CONTENT
    assert [p.kind for p in plans] == ["first", "retry", "retry"]
    assert plans[1].waited_s <= 0.25
    assert plans[2].waited_s <= 0.5


def test_resume_cap_raises_with_the_partial_answer() -> None:
    """Repeated breaks stop at max_resumes with a typed error carrying what was shown."""
    breaks = [Break(n, 400) for n in range(1, 10)]
    with pytest.raises(RetriesExhausted) as info:
        run(Upstream(), breaks, policy=RetryPolicy(attempts=10, max_resumes=2))
    partial = info.value.partial
    assert partial is not None
    shown = partial.choices[0].message.content or ""
    assert shown
    assert CONTENT.startswith(shown)


def test_attempt_cap_raises() -> None:
    """attempts bounds the number of requests of one answer."""
    plans: list[AttemptPlan] = []
    with pytest.raises(RetriesExhausted) as info:
        run(
            Upstream(),
            [],
            statuses=dict.fromkeys(range(1, 9), 503),
            policy=RetryPolicy(attempts=3),
            plans=plans,
        )
    assert [p.kind for p in plans] == ["first", "retry", "retry"]
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, UpstreamStatusError)
    assert info.value.__cause__.status_code == 503
