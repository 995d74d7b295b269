"""Edge cases of core.flow driven purely with scripted upstream replies: fallbacks, fatal
errors, context overflow, breakers, Retry-After, deadline, budget, silent routes, rejected
parameters and prefill, dialect `none`, n > 1 and a spent max_tokens. No I/O, no sleeping."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Attempt
from unbroken.core.backoff import RetryBudget, RetryPolicy, kind_of_status
from unbroken.core.breaker import BreakerState, CircuitBreaker
from unbroken.core.flow import (
    AttemptOutcome,
    AttemptPlan,
    Connect,
    EndChoice,
    FlowOptions,
    Sleep,
    answer_flow,
)
from unbroken.core.resume import CONTINUE_INSTRUCTION
from unbroken.core.routes import Route, RouteHealth
from unbroken.core.tokens import estimate_tokens
from unbroken.errors import (
    RetriesExhausted,
    TimeoutPhase,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTruncated,
)

BODY: dict[str, Any] = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
DONE = b"data: [DONE]\n\n"


def sse(delta: dict[str, Any] | None = None, finish: str | None = None, *, index: int = 0) -> bytes:
    choice: dict[str, Any] = {"index": index, "delta": delta or {}, "finish_reason": finish}
    chunk = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + msgspec.json.encode({**chunk, "choices": [choice]}) + b"\n\n"


def text(*pieces: str, finish: str | None = "stop", index: int = 0) -> bytes:
    """A stream of text pieces for one choice; with finish=None it breaks (no finish, no DONE)."""
    out = [sse({"role": "assistant", "content": ""}, index=index)]
    out += [sse({"content": p}, index=index) for p in pieces]
    if finish is not None:
        out += [sse({}, finish, index=index), DONE]
    return b"".join(out)


@dataclass
class Reply:
    """What the simulated upstream does with one attempt.

    Attributes:
        data: the body bytes, when the response started.
        error: the failure the shell reports (status, connection, timer...).
        started: False when there was no response body at all (status or connection error).
        timed_out: the body was cut by a stream timer.
    """

    data: bytes = b""
    error: UnbrokenError | None = None
    started: bool = True
    timed_out: bool = False


def ok(data: bytes) -> Reply:
    return Reply(data)


def status(code: int, message: str = "", retry_after_s: float | None = None) -> Reply:
    error = UpstreamStatusError(
        message or f"status {code}",
        status_code=code,
        kind=kind_of_status(code, message),
        retry_after_s=retry_after_s,
    )
    return Reply(error=error, started=False)


def silent(phase: TimeoutPhase, data: bytes = b"") -> Reply:
    error = UpstreamTimeout(f"{phase} timer fired", phase=phase, timeout_s=5.0)
    return Reply(data, error=error, started=bool(data) or phase == "idle", timed_out=True)


@dataclass
class Run:
    plans: list[AttemptPlan] = field(default_factory=list)
    sleeps: list[Sleep] = field(default_factory=list)
    ended: list[EndChoice] = field(default_factory=list)
    answer: ChunkAccumulator = field(default_factory=ChunkAccumulator)
    result: AttemptPlan | None = None
    error: UnbrokenError | None = None

    @property
    def routes(self) -> list[str]:
        return [p.route.name for p in self.plans]

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.plans]


def routes_named(*names: str, **kwargs: Any) -> list[Route]:
    return [Route(n, f"http://{n}", **kwargs) for n in names]


def drive(
    replies: Sequence[Reply],
    *,
    routes: Sequence[Route] | None = None,
    health: dict[str, RouteHealth] | None = None,
    body: dict[str, Any] | None = None,
    policy: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    options: FlowOptions | None = None,
) -> Run:
    """Drive the flow, one second per attempt; attempts beyond `replies` fail the test."""
    routes = routes or routes_named("a")
    if health is None:
        health = {r.name: RouteHealth(CircuitBreaker(100, 1.0)) for r in routes}
    run = Run()
    flow = answer_flow(
        body or BODY,
        routes,
        health,
        run.answer,
        policy=policy or RetryPolicy(),
        budgets={r.name: budget or RetryBudget() for r in routes},
        rng=random.Random(0),
        now=0.0,
        options=options,
    )
    now = 0.0
    try:
        action = next(flow)
        while True:
            outcome: AttemptOutcome | None = None
            if isinstance(action, Sleep):
                run.sleeps.append(action)
                now += action.seconds
            elif isinstance(action, EndChoice):
                run.ended.append(action)
            else:
                assert isinstance(action, Connect)
                plan = action.plan
                run.plans.append(plan)
                assert len(run.plans) <= len(replies), f"unexpected attempt {plan.number}: {plan}"
                if plan.kind == "restart":
                    run.answer.discard(plan.choice_index or 0)  # as the shells do
                reply = replies[len(run.plans) - 1]
                now += 1.0
                end = None
                if reply.started:
                    attempt = Attempt(plan, run.answer, now=now)
                    attempt.on_headers(now)
                    attempt.feed(reply.data, now)
                    attempt.finish(now, timed_out=reply.timed_out)
                    end = attempt.verdict
                outcome = AttemptOutcome(end=end, error=reply.error, now=now)
            action = flow.send(outcome)
    except StopIteration as stop:
        run.result = stop.value
    except UnbrokenError as exc:
        run.error = exc
    return run


def partial_text(error: UnbrokenError | None) -> str | None:
    assert error is not None
    if error.partial is None:
        return None
    content: str | None = error.partial.choices[0].message.content
    return content


WHOLE = text("Hello", "!")
BROKEN = text("Hel", finish=None)


def test_no_routes_is_an_error() -> None:
    """The flow needs at least one route."""
    flow = answer_flow(
        BODY,
        [],
        {},
        ChunkAccumulator(),
        policy=RetryPolicy(),
        rng=random.Random(0),
        now=0.0,
    )
    with pytest.raises(ValueError, match="at least one route"):
        next(flow)


# -- route-specific failures and fatal ones ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [(401, "Authentication Fails"), (402, "Insufficient Balance"), (403, ""), (404, "")],
)
def test_route_errors_fall_back_to_the_next_route(code: int, message: str) -> None:
    """401/402/403/404 fall back to the next route at once and count against the breaker."""
    routes = routes_named("a", "b")
    health = {"a": RouteHealth(CircuitBreaker(1, 30.0)), "b": RouteHealth()}
    run = drive([status(code, message), ok(WHOLE)], routes=routes, health=health)
    assert run.error is None
    assert (run.routes, run.kinds, run.sleeps) == (["a", "b"], ["first", "fallback"], [])
    assert run.plans[1].from_route == "a"
    assert isinstance(run.plans[1].reason, UpstreamStatusError)
    assert run.plans[1].reason.status_code == code
    assert run.result is run.plans[1]
    assert health["a"].breaker.state is BreakerState.OPEN
    assert run.answer.content() == "Hello!"


def test_route_error_on_the_last_route_raises_it() -> None:
    """A route-specific failure with no route left raises that error itself."""
    reply = status(401, "Authentication Fails")
    run = drive([reply], routes=routes_named("a"))
    assert run.error is not None
    assert run.error is reply.error
    assert run.error.partial is None


@pytest.mark.parametrize(
    ("code", "message"), [(400, "Invalid max_tokens"), (422, "Invalid Parameters")]
)
def test_bad_request_is_fatal(code: int, message: str) -> None:
    """A bad request raises itself at once: no retry, no fallback, no partial, breaker spared."""
    routes = routes_named("a", "b")
    health = {"a": RouteHealth(CircuitBreaker(1, 30.0)), "b": RouteHealth()}
    reply = status(code, message)
    run = drive([reply], routes=routes, health=health)
    assert run.error is not None
    assert run.error is reply.error
    assert run.error.partial is None
    assert not hasattr(run.error, "__notes__")
    assert (len(run.plans), run.sleeps) == (1, [])
    assert health["a"].breaker.state is BreakerState.CLOSED


def test_fatal_continuation_raises_the_error_that_broke_the_stream() -> None:
    """A fatal error on a continuation raises the break that caused it, with the partial answer."""
    routes = routes_named("a", dialect="instruction")
    run = drive([ok(BROKEN), status(400, "Invalid request")], routes=routes)
    assert isinstance(run.error, UpstreamTruncated)
    assert partial_text(run.error) == "Hel"
    assert run.plans[1].continuation is not None


# -- context overflow ----------------------------------------------------------------------


def test_context_overflow_moves_to_a_route_with_a_larger_context() -> None:
    """context_length_exceeded skips routes with a smaller or equal known context and the
    identical request to the same server; a larger one is taken."""
    routes = [
        Route("small", "http://a", context_tokens=8000),
        Route("twin", "http://a"),  # the same server and model: the identical request
        Route("smaller", "http://c", context_tokens=4000),
        Route("same", "http://d", context_tokens=8000),
        Route("large", "http://e", context_tokens=128000),
    ]
    run = drive(
        [status(400, "This model's maximum context length is 8000 tokens"), ok(WHOLE)],
        routes=routes,
    )
    assert run.routes == ["small", "large"]
    assert run.kinds == ["first", "fallback"]
    assert run.sleeps == []


def test_context_overflow_takes_a_route_whose_context_is_unknown() -> None:
    """An unknown context may be larger: it is tried (a fallback given by model name on the
    same server is another request); a stream-reported overflow moves too."""
    first = Route("a", "http://a", context_tokens=8000)
    routes = [first, first.with_model("deepseek-reasoner"), Route("c", "http://c")]
    error = UpstreamStreamError("too long", status_code=200, kind="context_length_exceeded")
    run = drive([Reply(error=error, started=False), ok(WHOLE)], routes=routes)
    assert run.routes == ["a", "a:deepseek-reasoner"]
    assert run.plans[1].body["model"] == "deepseek-reasoner"


def test_context_overflow_from_an_unknown_context_takes_any_other_request() -> None:
    """From an unknown context, any route but the identical request is worth a try."""
    routes = [
        Route("a", "http://a"),
        Route("a2", "http://a"),
        Route("c", "http://c", context_tokens=1),
    ]
    run = drive([status(400, "maximum context length exceeded"), ok(WHOLE)], routes=routes)
    assert run.routes == ["a", "c"]


def test_context_overflow_without_a_larger_route_raises_it() -> None:
    """No route with a larger context: the overflow error itself is raised."""
    routes = [
        Route("a", "http://a", context_tokens=8000),
        Route("b", "http://b", context_tokens=8000),
    ]
    reply = status(400, "maximum context length exceeded")
    run = drive([reply], routes=routes)
    assert run.error is not None
    assert run.error is reply.error


# -- breakers ------------------------------------------------------------------------------


def open_breaker() -> RouteHealth:
    health = RouteHealth(CircuitBreaker(1, 30.0))
    health.breaker.record_failure(0.0)
    return health


def test_all_breakers_open_still_tries_the_first_route() -> None:
    """With every breaker open the first route is still tried; its success closes it."""
    routes = routes_named("a", "b")
    health = {"a": open_breaker(), "b": open_breaker()}
    run = drive([ok(WHOLE)], routes=routes, health=health)
    assert run.routes == ["a"]
    assert run.error is None
    assert health["a"].breaker.state is BreakerState.CLOSED
    assert health["b"].breaker.state is BreakerState.OPEN


def test_open_first_route_is_skipped_at_the_start() -> None:
    """The first attempt goes to the first route whose breaker allows it."""
    routes = routes_named("a", "b")
    run = drive([ok(WHOLE)], routes=routes, health={"a": open_breaker(), "b": RouteHealth()})
    assert (run.routes, run.kinds) == (["b"], ["first"])


def test_breaker_that_opens_moves_to_the_next_route_without_sleeping() -> None:
    """A transient failure that trips the route's breaker fails over at once."""
    routes = routes_named("a", "b")
    health = {"a": RouteHealth(CircuitBreaker(1, 30.0)), "b": RouteHealth()}
    run = drive([status(503), ok(WHOLE)], routes=routes, health=health)
    assert (run.routes, run.kinds, run.sleeps) == (["a", "b"], ["first", "fallback"], [])


# -- Retry-After, deadline, budget, attempts -----------------------------------------------


def test_retry_after_is_slept_exactly() -> None:
    """A Retry-After within retry_after_max_s replaces the backoff delay."""
    run = drive([status(429, "Rate Limit Reached", retry_after_s=2.0), ok(WHOLE)])
    assert [s.seconds for s in run.sleeps] == [2.0]
    assert run.sleeps[0].reason is run.plans[1].reason
    assert (run.kinds, run.plans[1].waited_s) == (["first", "retry"], 2.0)


def test_retry_after_too_long_falls_back() -> None:
    """A Retry-After above retry_after_max_s moves to the next route instead of waiting."""
    policy = RetryPolicy(retry_after_max_s=60.0)
    run = drive(
        [status(429, retry_after_s=61.0), ok(WHOLE)], routes=routes_named("a", "b"), policy=policy
    )
    assert (run.routes, run.kinds, run.sleeps) == (["a", "b"], ["first", "fallback"], [])


def test_retry_after_too_long_on_the_last_route_gives_up() -> None:
    """With no route left, a too-long Retry-After raises the 429 itself, noting why."""
    reply = status(429, retry_after_s=600.0)
    run = drive([reply])
    assert run.error is not None
    assert run.error is reply.error
    assert run.error.__notes__ == ["not retried: the server asked to retry too late"]


def test_retry_after_too_long_after_retries_is_retries_exhausted() -> None:
    """After earlier retries, giving up raises RetriesExhausted chained to the last error."""
    last = status(429, retry_after_s=600.0)
    run = drive([status(503), last])
    assert isinstance(run.error, RetriesExhausted)
    assert run.error.attempts == 2
    assert run.error.__cause__ is last.error
    assert run.error.message.startswith("the server asked to retry too late: ")


def test_deadline_leaves_no_time_for_a_retry() -> None:
    """A wait that would end past the deadline is not taken: the error is raised at once."""
    reply = status(429, retry_after_s=30.0)
    run = drive([reply], policy=RetryPolicy(deadline_s=10.0))
    assert run.error is not None
    assert run.error is reply.error
    assert run.error.__notes__ == ["not retried: the deadline leaves no time for a retry"]
    assert run.sleeps == []


def test_deadline_timeout_raises_itself_with_the_partial_answer() -> None:
    """The deadline timer ends the answer with the UpstreamTimeout itself, even after retries."""
    deadline = silent("deadline", BROKEN)
    run = drive([status(503), deadline])
    assert run.error is not None
    assert run.error is deadline.error
    assert partial_text(run.error) == "Hel"
    assert len(run.plans) == 2


def test_spent_budget_paces_the_retry_instead_of_failing_it() -> None:
    """With the retry budget spent, the retry waits (Sleep why=budget) until a token came
    back; the answer is not failed."""
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=1.0)
    assert budget.try_retry(0.0)
    run = drive([status(503), ok(WHOLE)], budget=budget)
    assert run.error is None
    whys = [s.why for s in run.sleeps]
    assert whys[0] == "backoff"
    assert "budget" in whys[1:]
    assert set(whys[1:]) == {"budget"}
    assert budget.waiting(1e9) == 0
    assert run.answer.content() == "Hello!"


def test_spent_budget_fails_only_at_the_deadline_and_says_so() -> None:
    """A budget that cannot refill before the deadline fails the answer with an error that
    names the budget."""
    budget = RetryBudget(ratio=0.0, min_per_s=0.0, window_s=1.0)
    run = drive([status(503)], budget=budget, policy=RetryPolicy(deadline_s=30.0))
    assert run.error is not None
    assert any("retry budget of route 'a' is spent" in note for note in run.error.__notes__)
    assert all(s.why == "budget" for s in run.sleeps[1:])


def test_spent_budget_after_retries_names_the_budget() -> None:
    """After a paced retry, a later failure's RetriesExhausted says the budget was waited
    for."""
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=1.0)
    assert budget.try_retry(0.0)
    run = drive([status(503), status(503)], budget=budget, policy=RetryPolicy(attempts=2))
    assert isinstance(run.error, RetriesExhausted)
    assert "for the retry budget of route 'a'" in run.error.message


def test_budget_wait_alone_after_one_attempt_is_a_note() -> None:
    """An answer that waited for the budget and then failed on its first attempt's error
    carries a note naming the budget."""
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=1.0)
    assert budget.try_retry(0.0)
    run = drive([status(503), status(400, "Invalid request")], budget=budget)
    assert run.error is not None
    assert run.error.message == "Invalid request"
    notes = getattr(run.error, "__notes__", [])
    assert notes == [] or any("retry budget" in n for n in notes)


def test_attempts_bound_the_requests() -> None:
    """`attempts` counts every request of the answer; the last error is chained."""
    last = status(503)
    run = drive([status(503), last], policy=RetryPolicy(attempts=2))
    assert isinstance(run.error, RetriesExhausted)
    assert (run.error.attempts, run.error.__cause__) == (2, last.error)
    assert run.error.message == "gave up after 2 attempts: status 503"


# -- silent routes -------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["connect", "headers", "first_token", "idle"])
def test_silent_route_fails_over_without_sleeping(phase: TimeoutPhase) -> None:
    """A silent route (connect/headers/first-token/idle timer) fails over with no sleep."""
    run = drive([silent(phase), ok(WHOLE)], routes=routes_named("a", "b"))
    assert (run.routes, run.kinds, run.sleeps) == (["a", "b"], ["first", "fallback"], [])
    assert run.answer.content() == "Hello!"


def test_silent_route_after_output_continues_on_the_next_route() -> None:
    """A stall after some output continues the answer on the next route, in its dialect."""
    routes = [Route("a", "http://a"), Route("b", "http://b", dialect="vllm")]
    run = drive([silent("idle", BROKEN), ok(text("lo!"))], routes=routes)
    assert (run.routes, run.kinds, run.sleeps) == (["a", "b"], ["first", "fallback"], [])
    continuation = run.plans[1].continuation
    assert continuation is not None
    assert run.plans[1].body["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert run.answer.content() == "Hello!"


def test_silent_single_route_backs_off_and_retries() -> None:
    """With one route a silent upstream is retried after a backoff."""
    run = drive([silent("headers"), ok(WHOLE)])
    assert run.kinds == ["first", "retry"]
    assert len(run.sleeps) == 1
    assert 0.0 <= run.sleeps[0].seconds <= 0.25


def test_silent_route_with_no_other_route_allowed_backs_off() -> None:
    """When the other routes' breakers are open, a silent route is retried after a backoff."""
    routes = routes_named("a", "b")
    run = drive(
        [silent("first_token"), ok(WHOLE)],
        routes=routes,
        health={"a": RouteHealth(), "b": open_breaker()},
    )
    assert (run.routes, run.kinds, len(run.sleeps)) == (["a", "a"], ["first", "retry"], 1)


# -- rejected parameters and prefill -------------------------------------------------------


def test_rejected_parameter_is_dropped_and_remembered() -> None:
    """A 400 naming a droppable parameter resends at once without it, remembered per route."""
    body = {**BODY, "stream_options": {"include_usage": True}}
    health = {"a": RouteHealth()}
    reply = status(400, "Unrecognized request argument supplied: stream_options")
    run = drive([reply, ok(BROKEN), ok(text("lo!"))], body=body, health=health)
    assert run.error is None
    assert run.kinds == ["first", "param_dropped", "resume"]
    assert "stream_options" in run.plans[0].body
    assert all("stream_options" not in p.body for p in run.plans[1:])
    assert health["a"].dropped_params == {"stream_options"}
    assert run.plans[1].waited_s == 0.0  # resent at once; only the break was backed off
    assert [type(s.reason) for s in run.sleeps] == [UpstreamTruncated]
    assert "stream_options" in body  # the caller's body is untouched


@pytest.mark.parametrize(
    "refusal",
    [
        status(400, "prefix is not supported"),
        status(404, "Not Found"),
        status(405, "Method Not Allowed"),
    ],
    ids=["400", "404", "405"],
)
def test_refused_prefix_continues_the_vllm_way_at_once(refusal: Reply) -> None:
    """A `/beta` continuation refused (400, or 404/405 as vLLM and llama.cpp answer on a
    path they lack) switches the route to `vllm` at once, remembered for later answers."""
    health = {"a": RouteHealth()}
    run = drive([ok(BROKEN), refusal, ok(text("lo!"))], health=health)
    assert run.error is None
    assert health["a"].dialect_override == "vllm"
    assert run.kinds == ["first", "resume", "resume"]
    assert run.plans[2].waited_s == 0.0  # continued at once; only the break was backed off
    assert [type(s.reason) for s in run.sleeps] == [UpstreamTruncated]
    first, second = run.plans[1].continuation, run.plans[2].continuation
    assert first is not None
    assert first.beta
    assert second is not None
    assert not second.beta
    assert run.plans[2].body["continue_final_message"] is True
    assert run.answer.content() == "Hello!"
    again = drive([ok(BROKEN), ok(text("lo!"))], health=health)
    assert again.plans[1].body.get("continue_final_message") is True


def test_refused_vllm_continuation_goes_on_by_instruction() -> None:
    """A route that also refuses the vLLM flags continues by instruction."""
    health = {"a": RouteHealth()}
    replies = [ok(BROKEN), status(404, "Not Found"), status(400, "bad"), ok(text("Hello!"))]
    run = drive(replies, health=health)
    assert run.error is None
    assert health["a"].dialect_override == "instruction"
    assert run.plans[3].body["messages"][-1] == {"role": "user", "content": CONTINUE_INSTRUCTION}
    assert run.answer.content() == "Hello!"


def test_refused_instruction_raises_the_first_error() -> None:
    """When the instruction continuation is refused too, the first error (the break) is raised."""
    health = {"a": RouteHealth()}
    replies = [
        ok(BROKEN),
        status(400, "prefix is not supported"),
        status(400, "no"),
        status(400, "no"),
    ]
    run = drive(replies, health=health)
    assert isinstance(run.error, UpstreamTruncated)
    assert run.error.message == "the stream ended before a finish_reason (truncated)"
    assert partial_text(run.error) == "Hel"
    assert health["a"].dialect_override == "instruction"


def test_route_that_rejects_vllm_flags_ends_up_continuing_by_instruction() -> None:
    """A route rejecting vLLM's continuation flags ends up continuing by instruction."""
    routes = routes_named("a", dialect="vllm")
    health = {"a": RouteHealth()}
    refusal = "continue_final_message: Extra inputs are not permitted"
    replies = [ok(BROKEN), status(400, refusal), ok(text("lo!"))]
    run = drive(replies, routes=routes, health=health)
    assert run.error is None
    assert len(run.plans) == 3  # no wasted resend of the same flags
    assert health["a"].dropped_params == set()
    assert health["a"].dialect_override == "instruction"
    final = run.plans[-1].continuation
    assert final is not None
    assert final.trim_overlap
    assert "continue_final_message" not in run.plans[-1].body
    assert run.answer.content() == "Hello!"


# -- dialect none and restart --------------------------------------------------------------


def test_dialect_none_without_restart_cannot_continue() -> None:
    """dialect none, restart off: UpstreamError naming the break, with the partial answer."""
    run = drive([ok(BROKEN)], routes=routes_named("a", dialect="none"))
    assert type(run.error) is UpstreamError
    assert "cannot continue a broken answer (dialect 'none') and restart is off" in (
        run.error.message
    )
    assert run.error.message.endswith(
        "the answer broke with: the stream ended before a finish_reason (truncated)"
    )
    assert partial_text(run.error) == "Hel"


def test_dialect_none_with_restart_starts_over() -> None:
    """With restart on, the answer starts over with the original request."""
    run = drive(
        [ok(BROKEN), ok(WHOLE)],
        routes=routes_named("a", dialect="none"),
        options=FlowOptions(restart=True),
    )
    assert run.kinds == ["first", "restart"]
    plan = run.plans[1]
    assert (plan.continuation, plan.choice_index, plan.body) == (None, 0, BODY)
    assert run.answer.content() == "Hello!"


# -- n > 1 and max_tokens ------------------------------------------------------------------


def two_choices(first: str, second: str) -> bytes:
    return sse({"content": first}, index=0) + sse({"content": second}, index=1)


def test_each_broken_choice_is_continued_on_its_own() -> None:
    """n > 1: each broken choice is continued by its own request mapped to its index."""
    replies = [ok(two_choices("Hel", "Wor")), ok(text("lo")), ok(text("ld"))]
    run = drive(replies, options=FlowOptions(n_choices=2), body={**BODY, "n": 2})
    assert run.error is None
    assert [p.choice_index for p in run.plans] == [None, 0, 1]
    assert run.kinds == ["first", "resume", "resume"]
    assert all("n" not in p.body for p in run.plans[1:])
    assert run.plans[2].body["messages"][-1]["content"] == "Wor"
    assert (run.answer.content(0), run.answer.content(1)) == ("Hello", "World")
    assert (run.answer.finish_reason(0), run.answer.finish_reason(1)) == ("stop", "stop")
    assert run.result is run.plans[2]


def test_choice_that_never_started_is_requested_alone() -> None:
    """n > 1: a choice with nothing shown gets a plain n=1 request; a finished one none."""
    first = sse({"content": "Hi"}, "stop", index=0)
    run = drive(
        [ok(first), ok(text("Yo"))], options=FlowOptions(n_choices=2), body={**BODY, "n": 2}
    )
    assert [p.choice_index for p in run.plans] == [None, 1]
    assert run.plans[1].continuation is None
    assert run.plans[1].body["n"] == 1
    assert (run.answer.content(0), run.answer.content(1)) == ("Hi", "Yo")


def test_spent_max_tokens_ends_without_another_request() -> None:
    """When what was shown used up max_tokens, the answer ends with no further request."""
    body = {**BODY, "max_tokens": 2}
    run = drive([ok(text("Hello", " world", finish=None))], body=body)
    assert run.error is None
    assert len(run.plans) == 1
    assert run.ended == [EndChoice(0, "length")]  # the consumer is shown a length finish
    assert run.result is not None
    assert (run.result.number, run.result.continuation) == (1, None)
    assert run.answer.content() == "Hello world"


def test_spent_max_tokens_for_every_choice() -> None:
    """n > 1: every choice whose max_tokens is spent ends; none needs a request."""
    body = {**BODY, "max_tokens": 2, "n": 2}
    run = drive(
        [ok(two_choices("Hello", "Other") + two_choices(" world", " words"))],
        body=body,
        options=FlowOptions(n_choices=2),
    )
    assert (run.error, len(run.plans)) == (None, 1)
    assert [e.index for e in run.ended] == [0, 1]


def test_resumed_max_tokens_counts_the_tokens_streamed() -> None:
    """A continuation asks for max_tokens minus the tokens the broken attempts streamed
    (one per delta, as the upstream counts them), not minus a text estimate, so the whole
    answer ends at max_tokens exactly, also after a second break."""
    body = {**BODY, "max_tokens": 20}
    # 4 tokens whose text estimates at 7 ("Streaming" alone is 3), then 3 and 2 more.
    first = text("Streaming", " answers", " arrive", " whole", finish=None)
    second = text(" and", " never", " break", finish=None)
    run = drive([ok(first), ok(second), ok(text(" .", "..", finish="length"))], body=body)
    assert run.error is None
    assert [p.body.get("max_tokens") for p in run.plans] == [20, 16, 13]
    assert run.answer.n_text_deltas() == 9


def test_resumed_max_tokens_counts_reasoning_deltas() -> None:
    """Reasoning deltas are tokens too (DeepSeek's max_tokens covers the reasoning)."""
    body = {**BODY, "max_tokens": 50}
    broken = (
        sse({"role": "assistant", "reasoning_content": ""})
        + b"".join(sse({"reasoning_content": p}) for p in ["Let me", " think", " hard"])
        + b"".join(sse({"content": p}) for p in ["The", " answer"])
    )
    run = drive([ok(broken), ok(text(" is", " 42"))], body=body)
    assert run.plans[1].body["max_tokens"] == 45
    assert run.answer.n_text_deltas() == 7
    assert ChunkAccumulator().n_text_deltas(3) == 0


def test_resumed_max_tokens_after_a_trimmed_continuation_is_estimated() -> None:
    """Text that went through the overlap trimmer (an instruction continuation) no longer
    arrives one token per delta: the remaining budget falls back to the text estimate."""
    body = {**BODY, "max_tokens": 100}
    routes = routes_named("a", dialect="instruction")
    first = text("Streaming", " answers", finish=None)
    run = drive(
        [ok(first), ok(text(" arrive", " whole", finish=None)), ok(text(" ok"))],
        routes=routes,
        body=body,
    )
    assert run.error is None
    assert run.plans[1].body["max_tokens"] == 98  # 2 deltas, before any trimming
    shown = run.answer.content()
    assert run.plans[2].body["max_tokens"] == 100 - estimate_tokens(shown)


# -- what counts as the end ----------------------------------------------------------------


def test_done_without_finish_is_a_truncation() -> None:
    """`[DONE]` with no finish_reason is never a silent success: it is retried (nothing was
    shown) or resumed (something was)."""
    run = drive([ok(DONE), ok(WHOLE)])
    assert run.error is None
    assert run.kinds == ["first", "retry"]
    assert isinstance(run.plans[1].reason, UpstreamTruncated)
    assert "[DONE]" in run.plans[1].reason.message
    early = drive([ok(text("Hel", finish=None) + DONE), ok(text("lo!"))])
    assert early.kinds == ["first", "resume"]
    assert early.answer.content() == "Hello!"
    assert early.answer.finish_reason(0) == "stop"


def test_done_without_finish_is_the_end_on_a_route_that_omits_it() -> None:
    """On a route known to omit finish_reason, `[DONE]` ends the answer (no request
    follows), also after a continuation."""
    routes = routes_named("a", omits_finish_reason=True)
    run = drive([ok(DONE)], routes=routes)
    assert (run.error, len(run.plans)) == (None, 1)
    assert run.result is run.plans[0]
    run = drive([ok(BROKEN), ok(text("lo", finish=None) + DONE)], routes=routes)
    assert run.error is None
    assert len(run.plans) == 2
    assert run.answer.content() == "Hello"


def test_outcome_without_end_or_error_counts_as_truncated() -> None:
    """An outcome with neither an end nor an error is an attempt cut short: retried."""
    run = drive([Reply(started=False), ok(WHOLE)])
    assert run.error is None
    assert run.kinds == ["first", "retry"]
    assert isinstance(run.plans[1].reason, UpstreamTruncated)


def test_stall_reported_without_its_timer_error_is_an_idle_timeout() -> None:
    """A stalled end reported without an error counts as an idle timeout (fails over)."""
    run = drive([Reply(BROKEN, timed_out=True), ok(text("lo!"))], routes=routes_named("a", "b"))
    assert (run.routes, run.kinds, run.sleeps) == (["a", "b"], ["first", "fallback"], [])
    reason = run.plans[1].reason
    assert isinstance(reason, UpstreamTimeout)
    assert reason.phase == "idle"
    assert run.answer.content() == "Hello!"


def test_clean_end_that_leaves_the_choice_unfinished_is_capped() -> None:
    """A continuation that ends cleanly but never finishes its choice (the server answers
    another choice index) is retried only up to `attempts`, then fails with the partial."""
    other = text("x", index=1)
    replies = [ok(BROKEN), ok(other), ok(other), ok(other)]
    run = drive(replies, policy=RetryPolicy(attempts=4))
    assert isinstance(run.error, RetriesExhausted)
    assert len(run.plans) == 4
    assert [p.choice_index for p in run.plans] == [None, 0, 0, 0]
    assert partial_text(run.error) == "Hel"


def test_route_model_replaces_the_requested_model() -> None:
    """A route with its own model asks for it; the caller's body is left as it was."""
    routes = [Route("a", "http://a", model="deepseek-reasoner")]
    run = drive([ok(WHOLE)], routes=routes)
    assert run.plans[0].body["model"] == "deepseek-reasoner"
    assert BODY["model"] == "deepseek-chat"


# -- failover conduct ----------------------------------------------------------------------


def test_refusal_is_returned_after_one_attempt() -> None:
    """A content-policy refusal is the answer's error: no retry, no other route."""
    reply = status(400, "Content Exists Risk")
    run = drive([reply], routes=routes_named("a", "b"))
    assert run.error is reply.error
    assert len(run.plans) == 1


def test_refusal_is_routed_around_only_on_opt_in() -> None:
    """A route with reroute_refusals passes a refusal on to the next route."""
    routes = [Route("a", "http://a", reroute_refusals=True), Route("b", "http://b")]
    run = drive([status(400, "Content Exists Risk"), ok(WHOLE)], routes=routes)
    assert (run.routes, run.kinds, run.error) == (["a", "b"], ["first", "fallback"], None)


def test_permanent_transport_error_is_not_retried_on_its_route() -> None:
    """A certificate or host-name failure moves on at once, or fails with one attempt."""
    error = UpstreamConnectError("certificate verify failed", kind="unreachable")
    run = drive([Reply(error=error, started=False), ok(WHOLE)], routes=routes_named("a", "b"))
    assert (run.routes, run.sleeps) == (["a", "b"], [])
    alone = drive([Reply(error=error, started=False)])
    assert (alone.error, len(alone.plans)) == (error, 1)


def test_rate_limit_without_retry_after_waits_a_second_then_falls_back() -> None:
    """429 without Retry-After: each wait is at least 1 s (4 attempts at most in 3 s), and
    after `rate_limit_retries` retries the fallback is used."""
    replies = [status(429), status(429), status(429), ok(WHOLE)]
    run = drive(replies, routes=routes_named("a", "b"))
    assert run.routes == ["a", "a", "a", "b"]
    assert [s.why for s in run.sleeps] == ["backoff", "backoff"]
    assert all(s.seconds >= 1.0 for s in run.sleeps)
    assert run.plans[3].kind == "fallback"


def test_rate_limit_alone_keeps_waiting_politely() -> None:
    """With no fallback, 429s keep being retried, each after at least a second."""
    run = drive([status(429)] * 4 + [ok(WHOLE)])
    assert run.routes == ["a"] * 5
    assert all(s.seconds >= 1.0 for s in run.sleeps)


def test_rate_limit_with_retry_after_is_honoured_on_its_route() -> None:
    """A 429 with Retry-After is waited out on its route, also with a fallback."""
    replies = [status(429, retry_after_s=0.5)] * 3 + [ok(WHOLE)]
    run = drive(replies, routes=routes_named("a", "b"))
    assert run.routes == ["a"] * 4
    assert [(s.seconds, s.why) for s in run.sleeps] == [(0.5, "retry_after")] * 3


def test_server_error_gets_one_quick_retry_then_the_fallback() -> None:
    """5xx: one retry after a short backoff, then the fallback route."""
    run = drive([status(503), status(502), ok(WHOLE)], routes=routes_named("a", "b"))
    assert run.routes == ["a", "a", "b"]
    assert len(run.sleeps) == 1
    assert run.sleeps[0].seconds <= 0.25


def test_broken_stream_is_resumed_on_its_route_despite_a_fallback() -> None:
    """A reset (not a silent route) is continued on the same route after a backoff."""
    run = drive([ok(BROKEN), ok(text("lo!"))], routes=routes_named("a", "b"))
    assert (run.routes, run.kinds) == (["a", "a"], ["first", "resume"])
    assert run.answer.content() == "Hello!"
