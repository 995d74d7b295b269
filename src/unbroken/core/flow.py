"""The attempt state machine of one answer: retry, resume, fall back or fail; pure.

Written once as a generator that yields actions and is sent outcomes (httpx `auth_flow`
style); `Client`, `AsyncClient` and the gateway only drive it. Imports the standard library,
msgspec (a streaming answer's messages held as their JSON), `unbroken.errors` and core
siblings only; time and chance come in as arguments.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import msgspec

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.backoff import Failure, RetryBudget, RetryPolicy, failure_class
from unbroken.core.records import quick_init
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
    "AnswerFlow",
    "AttemptKind",
    "AttemptOutcome",
    "AttemptPlan",
    "Connect",
    "EndChoice",
    "FlowOptions",
    "PackedMessages",
    "Sleep",
    "WaitReason",
    "answer_flow",
]

AttemptKind = Literal["first", "retry", "resume", "fallback", "restart", "param_dropped"]
# Why a Sleep: a backoff, the server's Retry-After, or the retry budget being spent.
WaitReason = Literal["backoff", "retry_after", "budget"]


@quick_init
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
        has_fallback: a route after this one exists (shorter first-token and headers
            limits apply, see `Timeouts.failover_s`).
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
    has_fallback: bool = False


@quick_init
@dataclass(frozen=True, slots=True)
class Connect:
    """Action: run the attempt described by `plan`, then send its AttemptOutcome."""

    plan: AttemptPlan


@quick_init
@dataclass(frozen=True, slots=True)
class Sleep:
    """Action: wait `seconds`, then send None.

    Attributes:
        seconds: how long.
        reason: the error that caused the wait.
        why: `backoff`, `retry_after` (the server's) or `budget` (the route's retry budget
            is spent; the wait paces the retry).
    """

    seconds: float
    reason: UnbrokenError
    why: WaitReason = "backoff"


@quick_init
@dataclass(frozen=True, slots=True)
class EndChoice:
    """Action: choice `index` ends with `finish_reason` and no further request (what was
    shown already used up its `max_tokens`). Show the consumer that finish, then send None."""

    index: int
    finish_reason: str = "length"


Action = Connect | Sleep | EndChoice


@quick_init
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


_SILENT_PHASES = frozenset({"connect", "headers", "first_token", "idle"})
_TRANSIENT = frozenset({Failure.RATE_LIMITED, Failure.SERVER, Failure.BROKEN})


def _is_silent(error: UnbrokenError | None) -> bool:
    return isinstance(error, UpstreamTimeout) and error.phase in _SILENT_PHASES


def _failure(end: StreamEnd | None, error: UnbrokenError | None) -> UnbrokenError | None:
    """The error of an attempt that did not complete (`AnswerFlow._after` tells)."""
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
    if end.ended_early:
        return UpstreamTruncated(
            "the stream ended ([DONE] or the end of the body) before a finish_reason "
            "(truncated; set omits_finish_reason on routes that never send one)"
        )
    return UpstreamTruncated("the stream ended before a finish_reason (truncated)")


@dataclass(frozen=True, slots=True)
class _Next:
    """One decision about a failed attempt: where the next one goes and what precedes it.

    Attributes:
        route_index: the route of the next attempt.
        kind: why it exists (a `retry` becomes a `resume` when output was shown).
        delay: the backoff or Retry-After to sleep first.
        why: what the delay is (`backoff`, `retry_after`).
        charge: a retry or continuation on the same route: it takes a retry-budget token.
    """

    route_index: int
    kind: AttemptKind
    delay: float = 0.0
    why: WaitReason = "backoff"
    charge: bool = False


class _Recovery:
    """What an answer's flow keeps about its failures and the waits and continuations they
    caused (see `_Flow.rec`)."""

    __slots__ = (
        "budget_route",
        "budget_wait_s",
        "failure",
        "first_error",
        "from_route",
        "last_error",
        "resumes",
        "retries",
        "same_route",
        "step",
        "trimmed",
        "wait",
        "waited",
    )

    def __init__(self) -> None:
        self.resumes = 0
        self.retries = 0  # backoff sleeps (the n of the delay formula)
        self.same_route = 0  # retries on the current route since it was chosen
        self.first_error: UnbrokenError | None = None
        self.last_error: UnbrokenError | None = None
        self.budget_wait_s = 0.0
        self.budget_route = ""
        # Choices whose shown text went through the overlap trimmer: their deltas no
        # longer count tokens, so their remaining max_tokens is estimated from the text.
        # A tuple: rarely more than empty, and an empty set is 216 bytes per live answer.
        self.trimmed: tuple[int, ...] = ()
        # The last failure's decision and the waits before the next attempt.
        self.step: _Next | None = None
        self.failure: UnbrokenError | None = None
        self.wait = 0.0  # the retry budget's pacing wait being slept
        self.waited = 0.0  # the backoff slept before the next attempt
        self.from_route: str | None = None  # the route the next attempt falls back from


# The recovery state of every flow that has had no failure: never written to (`_Flow.recovery`
# makes a flow its own first).
_NO_RECOVERY = _Recovery()


class _Flow:
    """The state of one answer's flow and one decision method per failure class (see
    `answer_flow`). Every `_on_*` method returns the next step or raises the final error."""

    # A gateway holds one per live answer: no instance dict.
    __slots__ = (
        "answer",
        "budgets",
        "deadline",
        "health",
        "now",
        "number",
        "policy",
        "rec",
        "rng",
        "route_index",
        "routes",
    )

    # (Set up by `AnswerFlow.__init__`, its only subclass: one call less per answer.)
    routes: Sequence[Route]
    health: Mapping[str, RouteHealth]
    budgets: Mapping[str, RetryBudget]
    answer: ChunkAccumulator
    policy: RetryPolicy
    rng: random.Random
    now: float
    deadline: float | None
    route_index: int
    number: int
    rec: _Recovery

    # -- helpers ---------------------------------------------------------------------------

    def recovery(self) -> _Recovery:
        """The recovery state, to write to (the flow's own from now on)."""
        rec = self.rec
        if rec is _NO_RECOVERY:
            rec = self.rec = _Recovery()
        return rec

    @property
    def route(self) -> Route:
        return self.routes[self.route_index]

    def cause(self, failure: UnbrokenError) -> UnbrokenError:
        """The error to report: the first one that broke a shown answer, if any."""
        return self.rec.first_error or failure

    def give_up(self, error: UnbrokenError, why: str | None) -> NoReturn:
        """Raise the error that ends the answer, with the partial answer attached: the error
        itself when it is final or no retry was made, else RetriesExhausted chained to it.
        Time spent waiting for the retry budget is named, so a paced answer that still fails
        says the budget played a part."""
        partial = self.answer.completion() if self.answer.has_output else None
        budget = ""
        rec = self.rec
        if rec.budget_wait_s > 0:
            budget = (
                f" (after waiting {rec.budget_wait_s:.1f} s for the retry budget of route "
                f"{rec.budget_route!r})"
            )
        if why is None or self.number <= 1:
            error.partial = partial
            if why is not None:
                error.add_note(f"not retried: {why}")
            if budget:
                error.add_note(budget.strip(" ()"))
            raise error
        raise retries_exhausted(
            f"{why}{budget}: {error.message}", attempts=self.number, last=error, partial=partial
        ) from error

    def next_route(self, failure: UnbrokenError | None = None) -> int | None:
        """The next route after the current one that may take the answer (for a context
        overflow: only one whose context is unknown or larger, never the same request to
        the same server)."""
        current = self.route
        overflow = failure is not None and failure_class(failure) is Failure.CONTEXT
        for index in range(self.route_index + 1, len(self.routes)):
            candidate = self.routes[index]
            if overflow and not _fits_more(candidate, current):
                continue
            if self.health[candidate.name].breaker.allow(self.now):
                return index
        return None

    def fall_back(self, failure: UnbrokenError, *, context: bool = False) -> _Next:
        nxt = self.next_route(failure if context else None)
        if nxt is None:
            self.give_up(failure if self.rec.first_error is None else self.cause(failure), None)
        return _Next(nxt, "fallback")

    def has_fallback(self) -> bool:
        return self.route_index < len(self.routes) - 1

    def same_route_retry(self, failure: UnbrokenError, delay: float, why: WaitReason) -> _Next:
        if self.deadline is not None and self.now + delay >= self.deadline:
            self.give_up(self.cause(failure), "the deadline leaves no time for a retry")
        return _Next(self.route_index, "retry", delay, why, charge=True)

    # -- one decision per failure class ------------------------------------------------------

    def decide(self, plan: AttemptPlan, failure: UnbrokenError) -> _Next:
        """The next step after `failure` (or raise the answer's final error)."""
        if isinstance(failure, UpstreamTimeout) and failure.phase == "deadline":
            self.give_up(failure, None)
        rejected = self._on_rejected_request(plan, failure)
        if rejected is not None:
            return rejected
        kind = failure_class(failure)
        if kind in _TRANSIENT:
            return self._on_transient(plan, failure, kind)
        if kind is Failure.BAD_REQUEST:
            self._on_bad_request(plan, failure)
        if kind is Failure.REFUSAL:
            return self._on_refusal(failure)
        if kind is Failure.CONTEXT:
            return self._on_context(failure)
        return self._on_route_error(failure)  # ROUTE, UNREACHABLE

    def _on_rejected_request(self, plan: AttemptPlan, failure: UnbrokenError) -> _Next | None:
        """A parameter or a way of continuing the route does not know: resend at once
        without it, and remember (the route is fine; our request was not)."""
        if not isinstance(failure, UpstreamStatusError):
            return None
        status = failure.status_code
        health = self.health[self.route.name]
        if status in (400, 422) and failure.kind != "context_length_exceeded":
            param = rejected_param(plan.body, failure.message, None)
            if param is not None and param not in health.dropped_params:
                health.dropped_params.add(param)
                return _Next(self.route_index, "param_dropped")
        continuation = plan.continuation
        if continuation is None:
            return None
        # 404/405 on the beta path (vLLM, llama.cpp), or a 400 refusing the prefill or
        # `continue_final_message`: continue another way from now on, at once.
        refused = status in (404, 405) if continuation.beta else status == 405
        refused = refused or (
            status in (400, 422) and failure.kind in ("bad_request", "invalid_parameters")
        )
        if refused and health.reject_dialect(self.route):
            return _Next(self.route_index, "resume")
        return None

    def _on_bad_request(self, plan: AttemptPlan, failure: UnbrokenError) -> NoReturn:
        """The request itself is wrong: no route will serve it."""
        self.give_up(failure if plan.continuation is None else self.cause(failure), None)

    def _on_refusal(self, failure: UnbrokenError) -> _Next:
        """A content-policy refusal is the answer: returned after one attempt, unless the
        route opted in to routing around refusals."""
        if not self.route.reroute_refusals:
            self.give_up(failure, None)
        return self.fall_back(failure)

    def _on_context(self, failure: UnbrokenError) -> _Next:
        """Too long for this route: a route whose context is unknown or larger, never the
        identical request again."""
        return self.fall_back(failure, context=True)

    def _on_route_error(self, failure: UnbrokenError) -> _Next:
        """401, 402, 403, 404, or a permanent transport error (certificate, unknown host):
        this route cannot serve it; it is not retried."""
        self.health[self.route.name].breaker.record_failure(self.now)
        return self.fall_back(failure)

    def _on_transient(self, plan: AttemptPlan, failure: UnbrokenError, kind: Failure) -> _Next:
        """429, 5xx, resets, timeouts, truncation: the same route after a wait, or the
        fallback when the route is silent, its breaker opened, or it used up its retries."""
        health = self.health[self.route.name]
        health.breaker.record_failure(self.now)
        shown = self.answer.has_output
        if self.number >= self.policy.attempts:
            self.give_up(self.cause(failure), f"gave up after {self.number} attempts")
        resumes = self.rec.resumes
        if shown and resumes >= self.policy.max_resumes:
            self.give_up(self.cause(failure), f"gave up after {resumes} continuations")
        if self.has_fallback() and (
            _is_silent(failure)
            or not health.breaker.allow(self.now)
            or self._used_up_retries(failure, kind)
        ):
            # Failing over after a silent upstream beats waiting on it again (LESSONS.md).
            nxt = self.next_route()
            if nxt is not None:
                return _Next(nxt, "fallback")
        retry_after = failure.retry_after_s if isinstance(failure, UpstreamError) else None
        if retry_after is not None:
            if retry_after <= self.policy.retry_after_max_s:
                return self.same_route_retry(failure, retry_after, "retry_after")
            nxt = self.next_route()
            if nxt is None:
                self.give_up(self.cause(failure), "the server asked to retry too late")
            return _Next(nxt, "fallback")
        delay = self.policy.delay(self.rec.retries + 1, self.rng)
        if kind is Failure.RATE_LIMITED:
            delay += self.policy.rate_limit_wait_s
        return self.same_route_retry(failure, delay, "backoff")

    def _used_up_retries(self, failure: UnbrokenError, kind: Failure) -> bool:
        if isinstance(failure, UpstreamError) and failure.retry_after_s is not None:
            return False  # a server that says when to come back is waited for (as asked)
        if kind is Failure.RATE_LIMITED:
            return self.rec.same_route >= self.policy.rate_limit_retries
        if kind is Failure.SERVER:
            return self.rec.same_route >= self.policy.server_error_retries
        return False


def _fits_more(candidate: Route, current: Route) -> bool:
    if (candidate.base_url, candidate.model, candidate.api_key, dict(candidate.headers)) == (
        current.base_url,
        current.model,
        current.api_key,
        dict(current.headers),
    ):
        return False  # the identical request to the same server would overflow again
    if candidate.context_tokens is None or current.context_tokens is None:
        return True
    return candidate.context_tokens > current.context_tokens


def answer_flow(
    body: dict[str, Any],
    routes: Sequence[Route],
    health: Mapping[str, RouteHealth],
    answer: ChunkAccumulator,
    *,
    policy: RetryPolicy,
    rng: random.Random,
    now: float,
    budgets: Mapping[str, RetryBudget] | None = None,
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
        health: what is known about each route, by name: breaker, retry budget, learned
            dialect and dropped parameters (updated here).
        answer: the accumulator of what the consumer was shown, fed by the shell.
        policy: attempts, backoff, failover conduct and deadline.
        rng: the source of jitter.
        now: monotonic time at the start.
        budgets: the retry budget of each route, by name (shared by the answers that
            share recovery; the gateway keeps one per route and key); default: a fresh
            `RetryBudget` per route for this answer alone.
        options: restart opt-in, `n`, a caller's own assistant prefix.

    Theory of operation: the answer has a queue of choices still to produce (all of them
    at first). Each attempt targets either all pending choices (nothing shown yet: a plain
    retry of the whole request) or one choice that was shown in part (a continuation that
    carries that choice's partial text, with `n` = 1, its choice 0 mapped to the index).
    After an attempt the outcome is classified (`core.backoff.Failure`) and `_Flow` has one
    decision per class: complete -> the next pending choice or the end; a parameter or a
    way of continuing the route rejects -> resend at once without it (remembered); a bad
    request -> fail; a refusal -> fail (reroute only on opt-in); a context overflow -> a
    route with an unknown or larger context; a route error or a permanent transport error
    -> the next route; a transient failure (429, 5xx, reset, timeout, truncation) ->
    backoff (at least 1 s for a 429; Retry-After when sent) and the same route, except that
    a silent route, an open breaker, or a route that used up its 429/5xx retries is left
    for the fallback at once. A retry or continuation on the same route first takes a token
    of the route's retry budget, waiting (paced, with jitter) while it is spent. Every
    failure of a continuation keeps the first error that broke the stream, so a later
    refusal never hides the real cause.
    """
    flow = AnswerFlow(
        body,
        routes,
        health,
        answer,
        policy=policy,
        rng=rng,
        now=now,
        budgets=budgets,
        options=options,
    )
    action = flow.send(None)
    while action is not None:
        action = flow.send((yield action))
    assert flow.result is not None  # noqa: S101 - set when None is returned
    return flow.result


# Where an AnswerFlow stands: what it waits to be sent (see `AnswerFlow.send`).
_START = 0  # nothing yet
_CONNECTED = 1  # the outcome of the Connect it returned
_ENDED_CHOICE = 2  # None after an EndChoice
_SLEPT = 3  # None after the backoff Sleep of a failure
_PACED = 4  # None after a Sleep that waited for the retry budget
# The choices of an answer with one (shared; the pending choices are a tuple).
_ONE_CHOICE = (0,)


class PackedMessages(bytes):
    """A request body's `messages` held as their JSON while an attempt streams
    (`AnswerFlow.pack_messages`); never sent as such."""

    __slots__ = ()


class AnswerFlow(_Flow):
    """`answer_flow` as an object, for the shells: `send(None)` first, then after each
    action `send(outcome)` for a Connect (its `AttemptOutcome`) or `send(None)` for a Sleep
    or an EndChoice; each returns the next action, or None when the answer is complete
    (`result` is then the plan that completed it). Raises what `answer_flow` raises; not
    sent anything after that or after None. Same arguments as `answer_flow`.

    Why: a live answer holds these slots instead of a suspended generator's frame (~400
    bytes per answer in a gateway)."""

    __slots__ = (
        "_body",
        "_kind",
        "_opts",
        "_pending",
        "_plan",
        "_stage",
        "result",
    )

    def __init__(
        self,
        body: dict[str, Any],
        routes: Sequence[Route],
        health: Mapping[str, RouteHealth],
        answer: ChunkAccumulator,
        *,
        policy: RetryPolicy,
        rng: random.Random,
        now: float,
        budgets: Mapping[str, RetryBudget] | None = None,
        options: FlowOptions | None = None,
    ) -> None:
        if not routes:
            raise ValueError("answer_flow needs at least one route")
        opts = options or FlowOptions()
        if budgets is None:
            budgets = {route.name: RetryBudget() for route in routes}
        self.routes = routes
        self.health = health
        self.budgets = budgets
        self.answer = answer
        self.policy = policy
        self.rng = rng
        self.now = now
        self.deadline = None if policy.deadline_s is None else now + policy.deadline_s
        self.number = 0  # attempts made
        # Shared (nothing failed) until `recovery` makes it the flow's own: most answers
        # never fail, and these were 13 slots of every live answer (~100 bytes).
        self.rec = _NO_RECOVERY
        first = routes[0]
        index = 0
        if not health[first.name].breaker.allow(now):  # (most answers: no loop, no call)
            index = _first_allowed(routes, health, now)
            first = routes[index]
        self.route_index = index
        budgets[first.name].on_request(now)
        self._body = body
        self._opts = opts
        self._kind: AttemptKind = "first"
        n = max(1, opts.n_choices)
        self._pending: tuple[int, ...] = _ONE_CHOICE if n == 1 else tuple(range(n))
        self._stage = _START
        self._plan: AttemptPlan | None = None
        self.result: AttemptPlan | None = None

    def pack_messages(self, plan: AttemptPlan) -> None:
        """`plan`'s request is sent (the shells pack as they encode it: the wire then
        takes the packed JSON) and its answer streams: until another attempt is planned,
        the body holds its `messages` as their JSON (one `PackedMessages`) instead of a
        list of dicts and strings, in the body and in `plan`'s when that shares them.
        An attempt that streams reads none of them (only the body's other fields); the next
        plan, `unpacked_body` and the final plan get them back.

        The body is the shell's own (`build_body` makes it): its `messages` entry is swapped
        in place, and back (as an equal list) by `unpacked_body`. Why: a live answer held
        its conversation as objects while it streamed (~0.2 KB per live stream for one short
        message; bench/stream_memory.py)."""
        body = self._body
        messages = body.get("messages")
        if type(messages) is not list:
            return  # none (a body without messages), or packed already
        packed = PackedMessages(msgspec.json.encode(messages))
        body["messages"] = packed
        if plan.body is not body and plan.body.get("messages") is messages:
            plan.body["messages"] = packed  # the body as adapted to its route (`_plan`)

    def unpacked_body(self) -> dict[str, Any]:
        """The request's body with its messages as objects (see `pack_messages`)."""
        body = self._body
        messages = body.get("messages")
        if type(messages) is PackedMessages:
            body["messages"] = msgspec.json.decode(messages)
        return body

    def send(self, value: AttemptOutcome | None) -> Action | None:
        """The next action after `value` (see the class), or None: the answer is complete."""
        stage = self._stage
        if stage == _CONNECTED:
            assert value is not None  # noqa: S101 - the shell must send an outcome for Connect
            return self._after(value)
        if stage == _ENDED_CHOICE and not self._pending:
            self.result = AttemptPlan(
                route=self.route, body=self.unpacked_body(), kind=self._kind, number=self.number
            )
            return None
        if stage == _SLEPT:
            step = self.rec.step
            assert step is not None  # noqa: S101 - set with the stage
            self.now += step.delay
            return self._charge(step)
        if stage == _PACED:
            self.now += self.rec.wait
            return self._paced()
        return self._top()

    def _top(self) -> Action:
        """The next attempt (or the end of a choice that needs none)."""
        route = self.routes[self.route_index]  # (`route`, without the property's call)
        rec = self.rec
        plan = _plan(
            self.unpacked_body(),
            route,
            self.health[route.name],
            self.answer,
            self._opts,
            self._pending,
            self,
            self._kind,
            rec.waited,
            rec.from_route,
        )
        if plan is None:
            # max_tokens was used up by what was already shown: that choice ends in "length".
            index = self._pending[0]
            self._pending = self._pending[1:]
            self._stage = _ENDED_CHOICE
            return EndChoice(index)
        self.number += 1
        self._plan = plan
        self._stage = _CONNECTED
        return Connect(plan)

    def _after(self, outcome: AttemptOutcome) -> Action | None:
        plan = self._plan
        assert plan is not None  # noqa: S101 - set with the stage
        answer = self.answer
        route = plan.route
        end = outcome.end
        # A stream whose every choice finished is complete even if it then broke or
        # stalled before `[DONE]` or its usage (most attempts: no call for it).
        failure = (
            None
            if end is not None and end.state is EndState.COMPLETE
            else _failure(end, outcome.error)
        )
        self.now = outcome.now
        if failure is None:
            self.health[route.name].breaker.record_success(self.now)
            # `[DONE]` while a choice had no finish_reason on a route that omits it: the
            # server chose to end; resuming would ask again forever.
            ended = end is not None and end.missing_finish
            pending = self._pending
            if plan.choice_index is None:
                if ended:
                    pending = ()
                elif len(pending) == 1:  # (one choice: no generator)
                    pending = () if answer.finish_reason(pending[0]) is not None else pending
                else:
                    pending = tuple(i for i in pending if answer.finish_reason(i) is None)
            elif ended or answer.finish_reason(plan.choice_index) is not None:
                pending = pending[1:]
            self._pending = pending
            if not pending:
                self.result = plan
                return None
            if self.number >= self.policy.attempts:
                error = UpstreamTruncated(
                    f"choice {pending[0]} is still unfinished after {self.number} attempts"
                )
                self.give_up(error, f"gave up after {self.number} attempts")
            self._kind = "resume"
            rec = self.recovery()
            rec.waited, rec.from_route, rec.same_route = 0.0, None, 0
            return self._top()

        rec = self.recovery()
        if rec.first_error is None and answer.has_output:
            rec.first_error = failure
        rec.last_error = failure
        step = self.decide(plan, failure)
        if plan.choice_index is None:
            self._pending = (
                tuple(i for i in self._pending if answer.finish_reason(i) is None) or self._pending
            )
        rec.from_route = route.name if step.route_index != self.route_index else None
        if rec.from_route is not None:
            self.route_index, rec.same_route = step.route_index, 0
        rec.waited = step.delay
        rec.step = step
        rec.failure = failure
        if step.delay > 0:
            rec.retries += 1
            self._stage = _SLEPT
            return Sleep(step.delay, failure, step.why)
        return self._charge(step)

    def _charge(self, step: _Next) -> Action:
        if step.charge:
            self.recovery().same_route += 1
            return self._paced()
        return self._next(step)

    def _paced(self) -> Action:
        """Take a retry-budget token of the current route, pacing (sleeping with jitter)
        while it is spent; an answer is failed by the budget only at its deadline."""
        rec = self.recovery()
        failure = rec.failure
        step = rec.step
        assert failure is not None  # noqa: S101 - set with the step
        assert step is not None  # noqa: S101 - set before it is charged
        route = self.route
        wait = self.budgets[route.name].acquire(self.now, self.rng)
        if wait <= 0:
            return self._next(step)
        if self.deadline is not None and self.now + wait >= self.deadline:
            rec.budget_route = route.name
            self.give_up(
                self.cause(failure),
                f"the retry budget of route {route.name!r} is spent (too many recent "
                "retries) and the deadline leaves no time to wait for it",
            )
        rec.budget_wait_s += wait
        rec.budget_route = route.name
        rec.wait = wait
        self._stage = _PACED
        return Sleep(wait, failure, "budget")

    def _next(self, step: _Next) -> Action:
        kind = step.kind
        if self.answer.has_output and kind in ("retry", "fallback"):
            self.recovery().resumes += 1
            kind = "resume" if kind == "retry" else kind
        self._kind = kind
        return self._top()


def _first_allowed(routes: Sequence[Route], health: Mapping[str, RouteHealth], now: float) -> int:
    """The first route after the first one whose breaker lets the answer through (the
    first one's refused it)."""
    for index in range(1, len(routes)):
        if health[routes[index].name].breaker.allow(now):
            return index
    # Every breaker is open: the route that has no alternative is still tried (failing
    # fast with no route at all would turn a brown-out into an outage).
    return 0


def _plan(
    body: dict[str, Any],
    route: Route,
    route_health: RouteHealth,
    answer: ChunkAccumulator,
    opts: FlowOptions,
    pending: tuple[int, ...],
    state: _Flow,
    kind: AttemptKind,
    waited: float,
    from_route: str | None,
) -> AttemptPlan | None:
    dropped = route_health.dropped_params
    model = route.model
    # Not modified here nor by the shells: the plan shares the body unless it differs (a
    # copy per answer held while it streams).
    base = body
    if dropped or (model is not None and model != body.get("model")):
        base = {k: v for k, v in body.items() if k not in dropped}
        if model is not None:
            base["model"] = model

    if not answer.has_output:
        # The plan of most attempts, made directly: `plan` is a closure, kept for the rest.
        return AttemptPlan(
            route=route,
            body=base,
            kind=kind,
            number=state.number + 1,
            reason=state.rec.last_error,
            waited_s=waited,
            from_route=from_route,
            has_fallback=state.route_index < len(state.routes) - 1,  # (`has_fallback()`)
        )

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
            reason=state.rec.last_error,
            waited_s=waited,
            from_route=from_route,
            has_fallback=state.has_fallback(),
        )

    index = pending[0]
    content = answer.content(index)
    reasoning = answer.reasoning(index)
    single = {**base, "n": 1} if opts.n_choices > 1 else base
    if not reasoning and (not content or (not content.strip() and is_json_mode(base))):
        # Nothing to continue (a blank JSON-mode answer is asked again from scratch; the
        # spaces already shown keep the new JSON valid).
        return plan(single, kind, index)
    # The upstream counts what it generated, one token per streamed delta; a text
    # estimate is ~20% off either way, so a resumed answer would end short of max_tokens
    # or past it. Text passed through the overlap trimmer lost that one-to-one shape.
    spent = None if index in state.rec.trimmed else answer.n_text_deltas(index)
    continuation = plan_continuation(
        single,
        dialect=route_health.dialect(route),
        content=content,
        reasoning=reasoning,
        caller_prefix=opts.caller_prefix,
        spent_tokens=spent,
    )
    if continuation is None:
        if not opts.restart:
            error = state.rec.first_error or state.rec.last_error
            raise UpstreamError(
                f"route {route.name!r} cannot continue a broken answer (dialect 'none') and "
                f"restart is off; the answer broke with: {error.message if error else '?'}",
                partial=answer.completion(),
            )
        # A restart shows the choice afresh, token by token.
        rec = state.recovery()
        rec.trimmed = tuple(i for i in rec.trimmed if i != index)
        return plan(single, "restart", index)
    if continuation.max_tokens_spent:
        return None
    if continuation.trim_overlap and index not in state.rec.trimmed:
        state.recovery().trimmed += (index,)
    return plan(continuation.body, kind, index, continuation)
