"""While an attempt streams, the flow holds the request's messages as their JSON
(`AnswerFlow.pack_messages`); the next attempt (a retry, a resume, a fallback) and the final
plan get them back as they were."""

from __future__ import annotations

import random
from typing import Any

import msgspec

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Attempt
from unbroken.core.backoff import RetryPolicy
from unbroken.core.breaker import CircuitBreaker
from unbroken.core.flow import (
    AnswerFlow,
    AttemptOutcome,
    AttemptPlan,
    Connect,
    PackedMessages,
    Sleep,
)
from unbroken.core.routes import Route, RouteHealth

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "héllo"}], "name": "x"},
]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + msgspec.json.encode({**chunk, "choices": [choice]}) + b"\n\n"


BROKEN = _chunk({"role": "assistant", "content": ""}) + _chunk({"content": "Hel"})
WHOLE = _chunk({"content": "lo"}, "stop") + b"data: [DONE]\n\n"


def _flow(*routes: Route) -> tuple[AnswerFlow, dict[str, Any], ChunkAccumulator]:
    body: dict[str, Any] = {
        "model": "deepseek-chat",
        "messages": [dict(m) for m in MESSAGES],
        "stream": True,
        "max_tokens": 50,
    }
    answer = ChunkAccumulator()
    health = {r.name: RouteHealth(CircuitBreaker(100, 1.0)) for r in routes}
    flow = AnswerFlow(
        body,
        routes,
        health,
        answer,
        policy=RetryPolicy(wait_initial_s=0.0, wait_max_s=0.0),
        rng=random.Random(0),
        now=0.0,
    )
    return flow, body, answer


def _run(flow: AnswerFlow, answer: ChunkAccumulator, plan: AttemptPlan, data: bytes) -> Any:
    """One attempt of `plan` that streams `data` (packed once streaming, as the shells do);
    the flow's next action."""
    attempt = Attempt(plan, answer, now=1.0)
    attempt.on_headers(1.0)
    flow.pack_messages(plan)
    attempt.feed(data, 1.0)
    attempt.finish(1.0, timed_out=False)
    return flow.send(AttemptOutcome(end=attempt.verdict, error=None, now=1.0))


def _connect(action: Any, flow: AnswerFlow) -> AttemptPlan:
    while isinstance(action, Sleep):
        action = flow.send(None)
    assert isinstance(action, Connect)
    return action.plan


def test_a_streaming_attempt_holds_its_messages_packed() -> None:
    flow, body, _ = _flow(Route("a", "http://a"))
    plan = _connect(flow.send(None), flow)
    assert plan.body is body
    flow.pack_messages(plan)
    packed = body["messages"]
    assert type(packed) is PackedMessages
    assert msgspec.json.decode(packed) == MESSAGES
    flow.pack_messages(plan)  # packed already: unchanged
    assert body["messages"] is packed
    # Read back as objects, once.
    assert flow.unpacked_body()["messages"] == MESSAGES
    unpacked = body["messages"]
    assert flow.unpacked_body()["messages"] is unpacked


def test_a_resume_after_packing_continues_the_original_messages() -> None:
    flow, _, answer = _flow(Route("a", "http://a"))
    first = _connect(flow.send(None), flow)
    resume = _connect(_run(flow, answer, first, BROKEN), flow)
    assert resume.kind == "resume"
    sent = resume.body["messages"]
    assert type(sent) is list
    assert sent[: len(MESSAGES)] == MESSAGES
    assert sent[len(MESSAGES)]["role"] == "assistant"
    assert sent[len(MESSAGES)]["content"] == "Hel"
    assert _run(flow, answer, resume, WHOLE) is None
    assert flow.result is resume
    assert flow.unpacked_body()["messages"] == MESSAGES
    assert answer.content(0) == "Hello"


def test_a_route_copy_of_the_body_is_packed_with_it() -> None:
    """A route with its own model gets a copy of the body sharing its messages: both hold
    the same packed messages, and a retry sends them whole."""
    flow, body, answer = _flow(Route("a", "http://a", model="other"))
    first = _connect(flow.send(None), flow)
    assert first.body is not body
    assert first.body["model"] == "other"
    broken_early = _chunk({"role": "assistant", "content": ""})
    flow.pack_messages(first)
    assert first.body["messages"] is body["messages"]
    assert type(first.body["messages"]) is PackedMessages
    attempt = Attempt(first, answer, now=1.0)
    attempt.on_headers(1.0)
    attempt.feed(broken_early, 1.0)
    attempt.finish(1.0, timed_out=False)
    retry = _connect(flow.send(AttemptOutcome(end=attempt.verdict, error=None, now=1.0)), flow)
    assert retry.kind == "retry"
    assert retry.body["model"] == "other"
    assert retry.body["messages"] == MESSAGES


def test_a_continuation_body_is_left_as_it_is() -> None:
    """A resumed attempt's body has its own list: only the flow's body is packed."""
    flow, body, answer = _flow(Route("a", "http://a"))
    first = _connect(flow.send(None), flow)
    resume = _connect(_run(flow, answer, first, BROKEN), flow)
    flow.pack_messages(resume)
    assert type(body["messages"]) is PackedMessages
    assert type(resume.body["messages"]) is list


def test_a_body_without_messages_is_left_as_it_is() -> None:
    flow, body, _ = _flow(Route("a", "http://a"))
    plan = _connect(flow.send(None), flow)
    del body["messages"]
    flow.pack_messages(plan)
    assert "messages" not in body
    assert flow.unpacked_body() is body
