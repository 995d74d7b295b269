"""The attempt state machine of one answer: retry, resume, fall back or fail; pure.

Written once as a generator that yields actions and is sent outcomes (httpx `auth_flow`
style); `Client`, `AsyncClient` and the gateway only drive it. Imports the standard library,
`unbroken.errors` and core siblings only; time and chance come in as arguments.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.backoff import Decision, RetryBudget, RetryPolicy, classify
from unbroken.core.resume import Continuation, is_json_mode, plan_continuation, rejected_param
from unbroken.core.routes import Route, RouteHealth
from unbroken.core.stream import EndState, StreamEnd
from unbroken.errors import (
    UnbrokenError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamTruncated,
    retries_exhausted,
)

__all__ = [
    "Action",
    "AttemptKind",
    "AttemptOutcome",
    "AttemptPlan",
    "Connect",
    "EndChoice",
    "FlowOptions",
    "Sleep",
    "answer_flow",
]

AttemptKind = Literal["first", "retry", "resume", "fallback", "restart", "param_dropped"]


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """Everything the shell needs to run one attempt.

    Attributes:
        route: where to send it.
        body: the JSON body (stream on).
        beta: use the route's `/beta` base (DeepSeek prefix completion).
        kind: why this attempt exists (first, retry, resume, fallback, restart...).
        number: 1 for the first attempt of the answer.
        choice_index: the answer's choice this attempt produces (its choice 0 maps here)
            when a single choice is continued; None when the attempt produces all choices.
        continuation: the resume plan when the attempt continues a broken answer.
        reason: the error that caused this attempt (None for the first).
        waited_s: the backoff slept before it.
        from_route: the route used before a fallback.
    """

    route: Route
    body: dict[str, Any]
    beta: bool = False
    kind: AttemptKind = "first"
    number: int = 1
    choice_index: int | None = None
    continuation: Continuation | None = None
    reason: UnbrokenError | None = None
    waited_s: float = 0.0
    from_route: str | None = None


@dataclass(frozen=True, slots=True)
class Connect:
    """Action: run the attempt described by `plan`, then send its AttemptOutcome."""

    plan: AttemptPlan


@dataclass(frozen=True, slots=True)
class Sleep:
    """Action: wait `seconds` (a backoff or Retry-After), then send None."""

    seconds: float
    reason: UnbrokenError


@dataclass(frozen=True, slots=True)
class EndChoice:
    """Action: choice `index` ends with `finish_reason` and no further request (what was
    shown already used up its `max_tokens`). Show the consumer that finish, then send None."""

    index: int
    finish_reason: str = "length"


Action = Connect | Sleep | EndChoice


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What happened to an attempt, reported by the shell.

    Attributes:
        end: how the stream ended (None when it never started: connection or HTTP error).
        error: the failure (HTTP status, connection, timeout...), None for a clean end.
        now: monotonic time when the attempt ended.
    """

    end: StreamEnd | None
    error: UnbrokenError | None
    now: float


@dataclass(frozen=True, slots=True)
class FlowOptions:
    """Per-answer choices of the caller.

    Attributes:
        restart: when a broken answer cannot be continued anywhere, start over (the
            consumer gets a `restarted` event and must discard what it showed).
        n_choices: the request's `n`.
        caller_prefix: the assistant prefix the caller's own request ended with.
    """

    restart: bool = False
    n_choices: int = 1
    caller_prefix: str = ""


@dataclass(slots=True)
class _State:
    route_index: int = 0
    number: int = 0
    resumes: int = 0
    retries: int = 0
    first_error: UnbrokenError | None = None
    last_error: UnbrokenError | None = None
    silent: set[str] = field(default_factory=set)


_SILENT_PHASES = frozenset({"connect", "headers", "first_token", "idle"})


def _is_silent(error: UnbrokenError | None) -> bool:
    return isinstance(error, UpstreamTimeout) and error.phase in _SILENT_PHASES


def _failure(end: StreamEnd | None, error: UnbrokenError | None) -> UnbrokenError | None:
    """The error of an attempt, or None when it completed. A stream whose every choice
    finished is complete even if it then broke or stalled before `[DONE]` or its usage."""
    if end is not None and end.state is EndState.COMPLETE:
        return None
    if error is not None:
        return error
    if end is None:  # a shell reported neither an end nor an error: treat it as cut short
        return UpstreamTruncated("the attempt ended without a stream or an error")
    if end.state is EndState.ERROR:
        return end.error
    if end.state is EndState.INTERRUPTED:
        return UpstreamError(
            "the upstream interrupted the answer (finish_reason insufficient_system_resource "
            "or error)",
            kind="server_error",
        )
    if end.state is EndState.STALLED:
        return UpstreamTimeout("the stream stalled", phase="idle", timeout_s=0.0)
    return UpstreamTruncated("the stream ended before a finish_reason (truncated)")


def answer_flow(
    body: dict[str, Any],
    routes: Sequence[Route],
    health: Mapping[str, RouteHealth],
    answer: ChunkAccumulator,
    *,
    policy: RetryPolicy,
    budget: RetryBudget,
    rng: random.Random,
    now: float,
    options: FlowOptions | None = None,
) -> Generator[Action, AttemptOutcome | None, AttemptPlan]:
    """Drive one answer to completion.

    Yields `Connect` (run an attempt, send back its `AttemptOutcome`), `Sleep` (wait, send
    back None) and `EndChoice` (show a finish without a request, send back None). Returns
    the plan of the attempt that completed the answer; raises the error that ends it
    otherwise, with the partial answer attached (`error.partial`).

    Args:
        body: the caller's request body (stream on; not modified).
        routes: the routes in order of preference (configured ones, then per-request
            fallbacks); at least one.
        health: what is known about each route, by name (breakers are updated here).
        answer: the accumulator of what the consumer was shown, fed by the shell.
        policy: attempts, backoff and deadline.
        budget: the client-wide retry budget.
        rng: the source of jitter.
        now: monotonic time at the start.
        options: restart opt-in, `n`, a caller's own assistant prefix.

    Theory of operation: the answer has a queue of choices still to produce (all of them
    at first). Each attempt targets either all pending choices (nothing shown yet: a plain
    retry of the whole request) or one choice that was shown in part (a continuation that
    carries that choice's partial text, with `n` = 1, its choice 0 mapped to the index).
    After an attempt the outcome is classified: complete -> the next pending choice or the
    end; a parameter the route rejects -> drop it and resend at once; a continuation the
    route rejects (400) -> remember that it refuses prefill, continue by instruction; a
    transient failure -> backoff (or Retry-After) and the same route, except that a silent
    route (timeout) or one whose breaker opened is left for the next route at once; a
    route-specific failure (401, 402, 403, 404, context overflow) -> the next route; a bad
    request -> fail. Every failure of a continuation keeps the first error that broke the
    stream, so a later refusal never hides the real cause.
    """
    if not routes:
        raise ValueError("answer_flow needs at least one route")
    opts = options or FlowOptions()
    deadline = None if policy.deadline_s is None else now + policy.deadline_s
    state = _State()
    budget.on_request(now)
    state.route_index = _first_allowed(routes, health, now, 0)
    kind: AttemptKind = "first"
    waited = 0.0
    from_route: str | None = None
    pending = list(range(max(1, opts.n_choices)))

    while True:
        route = routes[state.route_index]
        route_health = health[route.name]
        plan = _plan(
            body, route, route_health, answer, opts, pending, state, kind, waited, from_route
        )
        if plan is None:
            # max_tokens was used up by what was already shown: that choice ends in "length".
            yield EndChoice(pending.pop(0))
            if not pending:
                return AttemptPlan(route=route, body=body, kind=kind, number=state.number)
            continue
        state.number += 1
        outcome = yield Connect(plan)
        assert outcome is not None  # noqa: S101 - the shell must send an outcome for Connect
        failure = _failure(outcome.end, outcome.error)
        now = outcome.now
        if failure is None:
            route_health.breaker.record_success(now)
            # `[DONE]` while a choice had no finish_reason: the server chose to end; resuming
            # would ask again forever (core.stream StreamEnd.missing_finish).
            ended = outcome.end is not None and outcome.end.missing_finish
            if plan.choice_index is None:
                pending = [] if ended else [i for i in pending if answer.finish_reason(i) is None]
            elif ended or answer.finish_reason(plan.choice_index) is not None:
                pending.pop(0)
            if not pending:
                return plan
            if state.number >= policy.attempts:
                error = UpstreamTruncated(
                    f"choice {pending[0]} is still unfinished after {state.number} attempts"
                )
                _give_up(error, answer, state, f"gave up after {state.number} attempts")
            kind, waited, from_route = "resume", 0.0, None
            continue

        shown = answer.has_output
        if state.first_error is None and shown:
            state.first_error = failure
        state.last_error = failure
        cause = state.first_error or failure

        if isinstance(failure, UpstreamTimeout) and failure.phase == "deadline":
            _give_up(failure, answer, state, None)

        # A route that rejects a parameter it does not know gets the request without it.
        if (
            isinstance(failure, UpstreamStatusError)
            and failure.status_code in (400, 422)
            and failure.kind != "context_length_exceeded"
        ):
            param = rejected_param(plan.body, failure.message, None)
            if param is not None and param not in route_health.dropped_params:
                route_health.dropped_params.add(param)
                kind, waited, from_route = "param_dropped", 0.0, None
                continue
            if plan.continuation is not None and route_health.dialect(route) != "instruction":
                # The route refuses assistant prefill: continue by instruction from now on.
                route_health.dialect_override = "instruction"
                kind, waited, from_route = "resume", 0.0, None
                continue

        decision = classify(failure)
        if plan.choice_index is None:
            pending = [i for i in pending if answer.finish_reason(i) is None] or pending
        if decision is Decision.FATAL:
            _give_up(failure if plan.continuation is None else cause, answer, state, None)
        if decision is Decision.FALLBACK:
            route_health.breaker.record_failure(now)
            nxt = _next_route(routes, health, now, state.route_index, failure, route)
            if nxt is None:
                _give_up(failure, answer, state, None)
            from_route, state.route_index = route.name, nxt
            kind, waited = "fallback", 0.0
            continue

        # Transient failure.
        route_health.breaker.record_failure(now)
        if state.number >= policy.attempts:
            _give_up(cause, answer, state, f"gave up after {state.number} attempts")
        if shown and state.resumes >= policy.max_resumes:
            _give_up(cause, answer, state, f"gave up after {state.resumes} continuations")
        if not budget.try_retry(now):
            _give_up(cause, answer, state, "the retry budget is spent (too many recent retries)")
        switch = None
        if len(routes) > 1 and (_is_silent(failure) or not route_health.breaker.allow(now)):
            # Failing over after a silent upstream beats waiting on it again (LESSONS.md).
            switch = _next_route(routes, health, now, state.route_index, None, route)
        if switch is not None:
            from_route, state.route_index = route.name, switch
            kind, waited = "fallback", 0.0
        else:
            delay = _delay(failure, policy, state.retries + 1, rng)
            if delay is None:
                nxt = _next_route(routes, health, now, state.route_index, None, route)
                if nxt is None:
                    _give_up(cause, answer, state, "the server asked to retry too late")
                from_route, state.route_index = route.name, nxt
                kind, waited = "fallback", 0.0
            else:
                if deadline is not None and now + delay >= deadline:
                    _give_up(cause, answer, state, "the deadline leaves no time for a retry")
                state.retries += 1
                yield Sleep(delay, failure)
                kind, waited, from_route = "retry", delay, None
        if answer.has_output:
            state.resumes += 1
            kind = "resume" if kind == "retry" else kind


def _delay(failure: UnbrokenError, policy: RetryPolicy, n: int, rng: random.Random) -> float | None:
    retry_after = failure.retry_after_s if isinstance(failure, UpstreamError) else None
    if retry_after is not None:
        return retry_after if retry_after <= policy.retry_after_max_s else None
    return policy.delay(n, rng)


def _first_allowed(
    routes: Sequence[Route], health: Mapping[str, RouteHealth], now: float, start: int
) -> int:
    for offset in range(len(routes)):
        index = (start + offset) % len(routes)
        if health[routes[index].name].breaker.allow(now):
            return index
    # Every breaker is open: the route that has no alternative is still tried (failing
    # fast with no route at all would turn a brown-out into an outage).
    return start


def _next_route(
    routes: Sequence[Route],
    health: Mapping[str, RouteHealth],
    now: float,
    current: int,
    failure: UnbrokenError | None,
    route: Route,
) -> int | None:
    needs_context = isinstance(failure, UpstreamError) and failure.kind == "context_length_exceeded"
    for index in range(current + 1, len(routes)):
        candidate = routes[index]
        if needs_context and not (
            candidate.context_tokens is not None
            and (route.context_tokens is None or candidate.context_tokens > route.context_tokens)
        ):
            continue
        if health[candidate.name].breaker.allow(now):
            return index
    return None


def _plan(
    body: dict[str, Any],
    route: Route,
    route_health: RouteHealth,
    answer: ChunkAccumulator,
    opts: FlowOptions,
    pending: list[int],
    state: _State,
    kind: AttemptKind,
    waited: float,
    from_route: str | None,
) -> AttemptPlan | None:
    base = {k: v for k, v in body.items() if k not in route_health.dropped_params}
    if route.model is not None:
        base["model"] = route.model

    def plan(
        payload: dict[str, Any],
        how: AttemptKind,
        index: int | None = None,
        continuation: Continuation | None = None,
    ) -> AttemptPlan:
        return AttemptPlan(
            route=route,
            body=payload,
            beta=continuation is not None and continuation.beta,
            kind=how,
            number=state.number + 1,
            choice_index=index,
            continuation=continuation,
            reason=state.last_error,
            waited_s=waited,
            from_route=from_route,
        )

    if not answer.has_output:
        return plan(base, kind)
    index = pending[0]
    content = answer.content(index)
    reasoning = answer.reasoning(index)
    single = {**base, "n": 1} if opts.n_choices > 1 else base
    if not reasoning and (not content or (not content.strip() and is_json_mode(base))):
        # Nothing to continue (a blank JSON-mode answer is asked again from scratch; the
        # spaces already shown keep the new JSON valid).
        return plan(single, kind, index)
    continuation = plan_continuation(
        single,
        dialect=route_health.dialect(route),
        content=content,
        reasoning=reasoning,
        caller_prefix=opts.caller_prefix,
    )
    if continuation is None:
        if not opts.restart:
            error = state.first_error or state.last_error
            raise UpstreamError(
                f"route {route.name!r} cannot continue a broken answer (dialect 'none') and "
                f"restart is off; the answer broke with: {error.message if error else '?'}",
                partial=answer.completion(),
            )
        return plan(single, "restart", index)
    if continuation.max_tokens_spent:
        return None
    return plan(continuation.body, kind, index, continuation)


def _give_up(
    error: UnbrokenError,
    answer: ChunkAccumulator,
    state: _State,
    why: str | None,
) -> NoReturn:
    """Raise the error that ends the answer, with the partial answer attached: the error
    itself when it is final or no retry was made, else RetriesExhausted chained to it."""
    partial = answer.completion() if answer.has_output else None
    if why is None or state.number <= 1:
        error.partial = partial
        if why is not None:
            error.add_note(f"not retried: {why}")
        raise error
    raise retries_exhausted(
        f"{why}: {error.message}", attempts=state.number, last=error, partial=partial
    ) from error
