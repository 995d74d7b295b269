"""Unit tests of core.attempt: splicing a continuation into the answer, holding tool calls,
usage, and the stream timers."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from unbroken.core.accumulator import ChunkAccumulator, join_text
from unbroken.core.attempt import Attempt, Timeouts, _cjk_at
from unbroken.core.flow import AttemptPlan
from unbroken.core.resume import Continuation
from unbroken.core.routes import Route
from unbroken.core.stream import ChatStreamDecoder, EndState, several_events, split_events
from unbroken.core.wire import ChatCompletionChunk, ChunkChoice, Delta, Usage, chunk_text
from unbroken.errors import ConfigError, TimeoutPhase

ROUTE = Route("primary", "https://api.example")
DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16}
BILLED = Usage(prompt_tokens=14, completion_tokens=2, total_tokens=16)


def sse(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    index: int = 0,
    usage: dict[str, int] | None = None,
    id: str = "c2",
    created: int = 222,
) -> bytes:
    """One chunk as an SSE event; `delta=None` leaves the delta out (a finish-only choice)."""
    choice: dict[str, Any] = {"index": index, "finish_reason": finish}
    if delta is not None:
        choice["delta"] = delta
    chunk: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": "m",
        "choices": [choice],
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def shown_answer(*texts: str, role: str | None = "assistant") -> ChunkAccumulator:
    """An answer the consumer has seen: choice i holds texts[i] (id c1, created 111)."""
    answer = ChunkAccumulator()
    for index, text in enumerate(texts):
        answer.feed(
            ChatCompletionChunk(
                id="c1",
                created=111,
                model="m",
                choices=[ChunkChoice(index=index, delta=Delta(role=role, content=text))],
            )
        )
    return answer


def continuation_plan(
    *, choice_index: int | None = None, continuation: Continuation | None = None
) -> AttemptPlan:
    return AttemptPlan(
        route=ROUTE,
        body={},
        kind="resume",
        number=2,
        choice_index=choice_index,
        continuation=continuation or Continuation(body={}, beta=True),
    )


def feed_all(attempt: Attempt, *reads: bytes, now: float = 1.0) -> list[ChatCompletionChunk]:
    out: list[ChatCompletionChunk] = []
    for read in reads:
        out += attempt.feed(read, now)
    return out + attempt.finish(now)


def texts(chunks: list[ChatCompletionChunk]) -> list[str | None]:
    return [c.choices[0].delta.content if c.choices[0].delta else None for c in chunks]


# -- splicing ------------------------------------------------------------------------------


def test_first_attempt_passes_chunks_through() -> None:
    """With nothing shown before, chunks reach the consumer unchanged (id, role, index)."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    out = feed_all(
        attempt,
        sse({"role": "assistant", "content": ""}),
        sse({"content": "Hi"}),
        sse({"content": ""}, "stop", usage=USAGE),
        DONE,
    )
    assert [c.id for c in out] == ["c2", "c2", "c2"]
    assert out[0].choices[0].delta == Delta(role="assistant", content="")
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.COMPLETE
    assert answer.content() == "Hi"
    assert answer.usage == BILLED
    assert attempt.usage == BILLED


def test_continuation_takes_the_answers_id_and_loses_its_role() -> None:
    """A continuation's chunks get the answer's id and created, and no second role."""
    answer = shown_answer("Hel")
    attempt = Attempt(continuation_plan(), answer, now=0.0)
    out = feed_all(
        attempt,
        sse({"role": "assistant", "content": ""}),
        sse({"content": "lo!"}),
        sse({"content": ""}, "stop"),
        DONE,
    )
    assert {(c.id, c.created) for c in out} == {("c1", 111)}
    assert all(c.choices[0].delta is not None and c.choices[0].delta.role is None for c in out)
    assert texts(out) == ["lo!", ""]  # the seam's empty role chunk is not shown
    assert answer.content() == "Hello!"
    assert answer.finish_reason() == "stop"


def test_role_is_kept_when_the_answer_has_none_yet() -> None:
    """A continuation's role is the first the consumer sees when the answer had none."""
    answer = shown_answer("Hel", role=None)
    attempt = Attempt(continuation_plan(), answer, now=0.0)
    out = feed_all(attempt, sse({"role": "assistant", "content": "lo"}, "stop"))
    assert out[0].choices[0].delta == Delta(role="assistant", content="lo")
    assert answer.role() == "assistant"


def test_choice_zero_maps_to_the_continued_choice() -> None:
    """n > 1: the continuation's choice 0 becomes the choice being continued."""
    answer = shown_answer("Hel", "Wor")
    attempt = Attempt(continuation_plan(choice_index=1), answer, now=0.0)
    out = feed_all(attempt, sse({"role": "assistant", "content": "ld"}), sse({}, "stop"))
    assert [c.choices[0].index for c in out] == [1, 1]
    assert out[0].choices[0].delta == Delta(content="ld")  # choice 1 already had a role
    assert (answer.content(0), answer.content(1)) == ("Hel", "World")
    assert (answer.finish_reason(0), answer.finish_reason(1)) == (None, "stop")
    assert attempt.acc.content(0) == "ld"  # the attempt itself still sees its choice 0


def test_choice_index_zero_needs_no_mapping() -> None:
    """Continuing choice 0 of an n > 1 answer leaves indexes alone."""
    answer = shown_answer("Hel", "Wor")
    attempt = Attempt(continuation_plan(choice_index=0), answer, now=0.0)
    out = feed_all(attempt, sse({"content": "lo"}, "stop"))
    assert out[0].choices[0].index == 0
    assert (answer.content(0), answer.content(1)) == ("Hello", "Wor")


def test_hidden_reasoning_is_not_shown() -> None:
    """hide_reasoning drops the continuation's new reasoning (either field), keeps its text."""
    answer = shown_answer("Hel")
    plan = continuation_plan(continuation=Continuation(body={}, hide_reasoning=True))
    attempt = Attempt(plan, answer, now=0.0)
    out = feed_all(
        attempt,
        sse({"reasoning_content": "new thought"}),
        sse({"reasoning": "ollama thought", "content": "lo"}),
        sse({}, "stop"),
    )
    assert all(c.choices[0].delta is None or c.choices[0].delta.reasoning_text is None for c in out)
    assert answer.reasoning() == ""
    assert answer.content() == "Hello"
    assert attempt.acc.reasoning() == "new thoughtollama thought"


TRIM = Continuation(body={}, trim_overlap=True)


def test_overlap_is_trimmed_across_chunks() -> None:
    """instruction: a repeated stretch is held back and dropped; the rest shows once."""
    answer = shown_answer("The quick brown fox")
    attempt = Attempt(continuation_plan(continuation=TRIM), answer, now=0.0)
    out = feed_all(
        attempt,
        sse({"content": "brown fox"}),
        sse({"content": " jumps"}),
        sse({"content": " over."}),
        sse({"content": " Done"}),
        sse({"content": ""}, "stop"),
    )
    assert texts(out) == [" jumps over.", " Done", ""]  # no empty chunks while holding
    assert answer.content() == "The quick brown fox jumps over. Done"


def test_held_text_is_flushed_by_a_finish_chunk_without_delta() -> None:
    """Held text is released on a finish chunk, even one without a delta."""
    answer = shown_answer("The quick brown fox")
    attempt = Attempt(continuation_plan(continuation=TRIM), answer, now=0.0)
    out = feed_all(attempt, sse({"content": "brown fox jumps"}), sse(None, "stop"))
    assert texts(out) == [" jumps"]
    assert out[0].choices[0].finish_reason == "stop"
    assert answer.content() == "The quick brown fox jumps"
    assert answer.finish_reason() == "stop"


def test_finish_chunk_without_delta_and_nothing_held_stays_bare() -> None:
    """When the held text was all overlap, the finish chunk gets no delta."""
    answer = shown_answer("The quick brown fox")
    attempt = Attempt(continuation_plan(continuation=TRIM), answer, now=0.0)
    out = feed_all(attempt, sse({"content": "brown fox"}), sse(None, "stop"))
    assert len(out) == 1
    assert out[0].choices[0].delta is None
    assert answer.content() == "The quick brown fox"


def test_held_text_is_flushed_by_a_finish_chunk_with_text() -> None:
    """A finish chunk that carries text releases the held text with its own."""
    answer = shown_answer("The quick brown fox")
    attempt = Attempt(continuation_plan(continuation=TRIM), answer, now=0.0)
    out = feed_all(attempt, sse({"content": "brown"}), sse({"content": " fox!"}, "stop"))
    assert texts(out) == ["!"]
    assert answer.content() == "The quick brown fox!"


def test_annotation_chunk_does_not_release_held_text() -> None:
    """A chunk with neither delta nor finish (an Azure annotation) leaves held text held."""
    answer = shown_answer("The quick brown fox")
    attempt = Attempt(continuation_plan(continuation=TRIM), answer, now=0.0)
    assert attempt.feed(sse({"content": "brown fox jumps"}), 0.0) == []
    assert attempt.feed(sse(None), 0.0) == []  # empty at the seam: not shown either
    assert texts(feed_all(attempt, sse({"content": "!"}, "stop"))) == [" jumps!"]


def test_trimmer_leaves_deltas_without_content_alone() -> None:
    """A delta with no content field (role or reasoning only) keeps content None."""
    answer = shown_answer("The quick brown fox")
    attempt = Attempt(continuation_plan(continuation=TRIM), answer, now=0.0)
    out = attempt.feed(sse({"role": "assistant", "reasoning_content": "hm"}), 0.0)
    assert out[0].choices[0].delta == Delta(reasoning_content="hm")
    assert attempt.feed(sse({"role": "assistant"}), 0.0) == []  # only a role already shown


# -- tool calls ----------------------------------------------------------------------------


def tool(args: str, *, first: bool = False) -> bytes:
    call: dict[str, Any] = {"index": 0, "function": {"arguments": args}}
    if first:
        call.update(id="call_1", type="function")
        call["function"]["name"] = "get_weather"
    return sse({"tool_calls": [call]})


def test_tool_call_fragments_are_held_until_the_finish() -> None:
    """Tool-call chunks are shown only once the choice finishes, all at once and in order."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    assert attempt.feed(sse({"role": "assistant", "content": ""}), 0.0) != []
    assert attempt.feed(tool('{"city":', first=True), 0.1) == []
    assert attempt.feed(tool('"Oslo"}'), 0.2) == []
    assert not answer.has_output
    out = attempt.feed(sse({}, "tool_calls"), 0.3)
    assert len(out) == 3
    assert out[-1].choices[0].finish_reason == "tool_calls"
    calls = answer.completion().choices[0].message.tool_calls
    assert calls is not None
    assert (calls[0].function.name, calls[0].function.arguments) == (
        "get_weather",
        '{"city":"Oslo"}',
    )
    assert attempt.first_token_at == 0.1  # a tool call counts as the first token


def test_held_tool_calls_are_released_when_text_follows() -> None:
    """Text after tool-call fragments releases them before the text."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    assert attempt.feed(tool("{}", first=True), 0.0) == []
    out = attempt.feed(sse({"content": "and text"}), 0.0)
    assert len(out) == 2
    assert out[0].choices[0].delta is not None
    assert out[0].choices[0].delta.tool_calls is not None
    assert answer.content() == "and text"


def test_tool_calls_pass_at_once_when_not_held() -> None:
    """hold_tool_calls=False shows fragments as they arrive."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0, hold_tool_calls=False)
    assert len(attempt.feed(tool("{}", first=True), 0.0)) == 1
    assert answer.has_output


def test_held_tool_calls_of_a_broken_stream_are_dropped_unseen() -> None:
    """A half tool call cannot be continued: a stream that breaks drops it unseen."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    out = feed_all(attempt, sse({"role": "assistant"}), tool('{"ci', first=True))
    assert len(out) == 1  # the role chunk only
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.TRUNCATED
    assert not answer.has_output
    assert answer.completion().choices[0].message.tool_calls is None


def test_done_without_finish_is_truncated_and_drops_held_tool_calls() -> None:
    """`[DONE]` without a finish_reason is a truncation (never a silent success): held
    tool calls are dropped unseen, as on any break."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    assert attempt.feed(tool("{}", first=True) + DONE, 0.0) == []
    assert attempt.finish(0.0) == []
    assert attempt.verdict is not None
    assert (attempt.verdict.state, attempt.verdict.ended_early) == (EndState.TRUNCATED, True)
    assert not answer.has_output


def test_held_tool_calls_are_released_by_done_on_a_route_that_omits_finish() -> None:
    """On a route known to omit finish_reason, `[DONE]` completes: held tool calls show."""
    answer = ChunkAccumulator()
    route = Route("lax", "http://lax", omits_finish_reason=True)
    attempt = Attempt(AttemptPlan(route=route, body={}), answer, now=0.0)
    assert attempt.feed(tool("{}", first=True) + DONE, 0.0) == []
    out = attempt.finish(0.0)
    assert attempt.verdict is not None
    assert attempt.verdict.missing_finish
    assert len(out) == 1
    assert answer.has_output


# -- usage, finish reasons, end of input ---------------------------------------------------


def test_prior_usage_is_added_on_the_usage_chunk() -> None:
    """The usage chunk shown carries prior + this attempt's usage; attempt.usage is its own."""
    answer = shown_answer("Hel")
    prior = Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11)
    attempt = Attempt(continuation_plan(), answer, now=0.0, prior_usage=prior)
    out = feed_all(attempt, sse({"content": "lo"}), sse({}, "stop", usage=USAGE))
    assert out[0].usage is None
    summed = Usage(prompt_tokens=24, completion_tokens=3, total_tokens=27)
    assert out[1].usage == summed
    assert answer.usage == summed
    assert attempt.usage == BILLED


def test_prior_usage_on_a_fresh_answer_keeps_the_chunk_ids() -> None:
    """A restart (nothing shown) with prior usage keeps the new stream's id but sums usage."""
    answer = ChunkAccumulator()
    prior = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    plan = AttemptPlan(route=ROUTE, body={}, kind="restart")
    out = feed_all(
        Attempt(plan, answer, now=0.0, prior_usage=prior),
        sse({"content": "x"}, "stop", usage=USAGE),
    )
    assert out[0].id == "c2"
    assert out[0].usage == Usage(prompt_tokens=15, completion_tokens=3, total_tokens=18)


def test_interrupting_finish_reason_is_not_shown() -> None:
    """An interrupting finish_reason is stripped from what is shown; the attempt is interrupted."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    out = feed_all(attempt, sse({"content": "Hel"}), sse({}, "insufficient_system_resource"), DONE)
    assert [c.choices[0].finish_reason for c in out] == [None, None]
    assert answer.finish_reason() is None
    assert attempt.acc.finish_reason() == "insufficient_system_resource"
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.INTERRUPTED


def test_json_body_is_delivered_at_the_end() -> None:
    """A whole JSON completion (stream ignored by a proxy) is shown when the body ends."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    body = b'{"id":"j","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"whole"},"finish_reason":"stop"}]}'
    assert attempt.feed(body, 1.0) == []
    out = attempt.finish(2.0)
    assert out != []
    assert answer.content() == "whole"
    assert attempt.first_token_at == 2.0
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.COMPLETE


def test_timed_out_attempt_is_stalled_without_salvage() -> None:
    """finish(timed_out=True) does not read the rest: the stream is judged stalled."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    attempt.feed(sse({"content": "Hel"}) + b"data: [DONE]", 1.0)
    assert attempt.finish(2.0, timed_out=True) == []
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.STALLED
    assert answer.content() == "Hel"


# -- timers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["connect_s", "headers_s", "first_token_s", "idle_s", "deadline_s"]
)
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_timeouts_must_be_positive(name: str, value: float) -> None:
    """A timer of zero or less is a ConfigError naming it; None disables a timer."""
    with pytest.raises(ConfigError, match=f"timeout {name} must be > 0 or None"):
        Timeouts(**{name: value})
    assert getattr(Timeouts(**{name: None}), name) is None


def test_headers_timer_runs_until_the_headers() -> None:
    """Before the headers the headers and first-token timers run from the request."""
    timeouts = Timeouts(headers_s=60.0)
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=100.0, timeouts=timeouts
    )
    assert attempt.expiry() == (160.0, "headers")
    unarmed = Timeouts(headers_s=None, first_token_s=None)
    quiet = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=unarmed
    )
    assert quiet.expiry() is None


def test_default_timers_are_long_alone_and_short_with_a_fallback() -> None:
    """Defaults: headers and first token 120 s on a lone route, 14 s when a fallback route
    exists; idle 20 s, only after the first token."""
    alone = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    alone.on_headers(1.0)
    assert alone.expiry() == (120.0, "first_token")
    assert alone.limit("headers") == 120.0
    backed = Attempt(
        AttemptPlan(route=ROUTE, body={}, has_fallback=True), ChunkAccumulator(), now=0.0
    )
    assert backed.expiry() == (14.0, "headers")
    assert backed.limit("headers") == 14.0
    assert backed.timeout_error("first_token").timeout_s == 14.0
    backed.on_headers(1.0)
    backed.feed(sse({"content": "x"}), 3.0)
    assert backed.expiry() == (23.0, "idle")
    only_failover = Timeouts(headers_s=None, first_token_s=None, failover_s=5.0)
    capped = Attempt(
        AttemptPlan(route=ROUTE, body={}, has_fallback=True),
        ChunkAccumulator(),
        now=0.0,
        timeouts=only_failover,
    )
    assert capped.expiry() == (5.0, "headers")
    capped.on_headers(1.0)
    capped.feed(sse({"content": "x"}), 2.0)
    never_idle = Timeouts(idle_s=None)
    assert capped.expiry() == (22.0, "idle")
    steady = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=never_idle
    )
    steady.on_headers(1.0)
    steady.feed(sse({"content": "x"}), 2.0)
    assert steady.expiry() is None


def test_first_token_timer_runs_from_the_request_and_idle_only_after_it() -> None:
    """After the headers only first-token runs (from the request); a role-only chunk moves
    nothing; from the first token on, idle runs between data events."""
    timeouts = Timeouts(first_token_s=30.0, idle_s=20.0)
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=100.0, timeouts=timeouts
    )
    attempt.on_headers(101.0)
    assert attempt.expiry() == (130.0, "first_token")
    attempt.feed(sse({"role": "assistant", "content": ""}), 115.0)
    assert attempt.expiry() == (130.0, "first_token")  # a role is no token
    attempt.feed(sse({"reasoning_content": "hmm"}), 125.0)
    assert attempt.first_token_at == 125.0  # reasoning counts: a thinking model is not cut off
    assert attempt.expiry() == (145.0, "idle")


def test_the_earliest_timer_wins_across_phases() -> None:
    """Data before the headers were noted (a shell that notes them late): idle runs from
    the first token, yet an earlier headers limit still wins, and a shorter idle limit wins
    over a later headers limit."""
    for idle_s, expected in ((20.0, (10.0, "headers")), (3.0, (8.0, "idle"))):
        timeouts = Timeouts(headers_s=10.0, first_token_s=30.0, idle_s=idle_s)
        attempt = Attempt(
            AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=timeouts
        )
        attempt.feed(sse({"content": "a"}), 5.0)
        assert attempt.expiry() == expected


def test_keep_alives_reset_no_timer() -> None:
    """Comments (`: keep-alive`) are not data: a queued stream that only sends keep-alives
    is cut by the first-token limit, not earlier by idle; after the first token they do not
    reset idle either."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    attempt.on_headers(1.0)
    for t in range(2, 100):
        assert attempt.feed(b": keep-alive\n\n", float(t)) == []
    assert attempt.expiry() == (120.0, "first_token")
    attempt.feed(sse({"content": "a"}), 100.0)
    for t in range(101, 110):
        attempt.feed(b": keep-alive\n\n", float(t))
    assert attempt.last_data_at == 100.0
    assert attempt.expiry() == (120.0, "idle")


def test_annotation_chunk_is_no_first_token() -> None:
    """An Azure annotation chunk (a choice with no delta) is data but not a token."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    attempt.on_headers(0.0)
    attempt.feed(sse(None), 5.0)
    assert (attempt.first_token_at, attempt.last_data_at) == (None, 5.0)


def test_deadline_wins_when_earliest() -> None:
    """The answer's deadline is a timer of its own, in every phase."""
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, deadline_at=30.0
    )
    assert attempt.expiry() == (30.0, "deadline")
    only = Timeouts(headers_s=None, first_token_s=None, idle_s=None)
    bare = Attempt(
        AttemptPlan(route=ROUTE, body={}),
        ChunkAccumulator(),
        now=0.0,
        timeouts=only,
        deadline_at=5.0,
    )
    bare.on_headers(1.0)
    assert bare.expiry() == (5.0, "deadline")
    free = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=only)
    free.on_headers(1.0)
    assert free.expiry() is None


@pytest.mark.parametrize(
    ("phase", "message", "limit"),
    [
        ("connect", "timed out after 5 s connecting on route 'primary'", 5.0),
        ("headers", "timed out after 6 s waiting for response headers on route 'primary'", 6.0),
        (
            "first_token",
            "timed out after 7 s waiting for the first token (keep-alives do not count) "
            "on route 'primary'",
            7.0,
        ),
        (
            "idle",
            "timed out after 8.5 s waiting for the next data event (keep-alives do not count) "
            "on route 'primary'",
            8.5,
        ),
        (
            "deadline",
            "timed out after 90 s for the whole answer (its deadline) on route 'primary'",
            90.0,
        ),
    ],
)
def test_timeout_errors_name_phase_limit_and_route(
    phase: TimeoutPhase, message: str, limit: float
) -> None:
    """Each timer gives an UpstreamTimeout with its phase, limit and route in the message."""
    timeouts = Timeouts(
        connect_s=5.0, headers_s=6.0, first_token_s=7.0, idle_s=8.5, deadline_s=90.0
    )
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=timeouts
    )
    error = attempt.timeout_error(phase)
    assert (error.message, error.phase, error.timeout_s, error.route) == (
        message,
        phase,
        limit,
        "primary",
    )


def test_timeout_error_of_a_disabled_timer_says_zero() -> None:
    """A phase whose timer is off (deadline set elsewhere) reports a limit of 0."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    error = attempt.timeout_error("deadline")
    assert (error.timeout_s, error.phase) == (0.0, "deadline")
    assert error.message.startswith("timed out after 0 s")


# -- JSON mode -----------------------------------------------------------------------------

JSON_PLAN = AttemptPlan(route=ROUTE, body={"response_format": {"type": "json_object"}})


def test_blank_json_answer_is_held_and_judged_an_error() -> None:
    """A JSON-mode answer of spaces has its finish held back and fails the attempt."""
    answer = ChunkAccumulator()
    attempt = Attempt(JSON_PLAN, answer, now=0.0)
    out = feed_all(
        attempt, sse({"role": "assistant", "content": "  "}), sse({"content": " "}, "stop"), DONE
    )
    assert [c.choices[0].finish_reason for c in out] == [None]
    assert answer.finish_reason() is None
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.ERROR
    assert attempt.verdict.error is not None
    assert "blank" in attempt.verdict.error.message


def test_json_answer_with_text_passes() -> None:
    """A real JSON answer, or a tool-call finish, is delivered as usual."""
    answer = ChunkAccumulator()
    attempt = Attempt(JSON_PLAN, answer, now=0.0)
    out = feed_all(
        attempt,
        sse({"role": "assistant", "content": '{"a":'}),
        sse({"content": "1}"}, "stop"),
        DONE,
    )
    assert out[-1].choices[0].finish_reason == "stop"
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.COMPLETE
    tools = Attempt(JSON_PLAN, ChunkAccumulator(), now=0.0)
    done = feed_all(tools, sse({"role": "assistant", "content": ""}), sse({}, "tool_calls"), DONE)
    assert done[-1].choices[0].finish_reason == "tool_calls"


def test_headers_win_a_tie_with_first_token() -> None:
    """Equal headers and first-token limits: no headers is reported as `headers`."""
    timeouts = Timeouts(headers_s=5.0, first_token_s=5.0)
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=timeouts
    )
    assert attempt.expiry() == (5.0, "headers")


def test_recheck_is_sooner_while_the_first_token_is_awaited() -> None:
    """Before the first token a single shell timer must look again within idle_s (the
    token arms idle, which may fall before the armed expiry); after it, at the expiry."""
    timeouts = Timeouts(first_token_s=30.0, idle_s=2.0)
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0, timeouts=timeouts
    )
    attempt.on_headers(0.5)
    assert attempt.recheck_at(1.0) == 3.0
    assert attempt.recheck_at(29.0) == 30.0
    attempt.feed(sse({"content": "a"}), 4.0)
    assert attempt.recheck_at(4.0) == 6.0
    bare = Attempt(
        AttemptPlan(route=ROUTE, body={}),
        ChunkAccumulator(),
        now=0.0,
        timeouts=Timeouts(headers_s=None, first_token_s=None, idle_s=2.0),
    )
    assert bare.recheck_at(1.0) == 3.0
    silent = Attempt(
        AttemptPlan(route=ROUTE, body={}),
        ChunkAccumulator(),
        now=0.0,
        timeouts=Timeouts(headers_s=None, first_token_s=None, idle_s=None),
    )
    assert silent.recheck_at(1.0) is None


# -- payloads: the upstream's own bytes ----------------------------------------------------


def payloads(attempt: Attempt) -> list[bytes] | None:
    return attempt.payloads  # a call: mypy keeps no narrowing across `feed`


def test_unchanged_chunks_of_a_first_attempt_keep_their_upstream_bytes() -> None:
    """On a first attempt a chunk read alone is relayed as its upstream bytes; a read of
    two, a comment, and the [DONE] give none."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    attempt.feed(b": keep-alive\n\n", 0.5)
    assert payloads(attempt) is None
    role = sse({"role": "assistant", "content": ""})
    attempt.feed(role, 1.0)
    assert payloads(attempt) == [role[6:-2]]
    assert len(attempt.feed(sse({"content": "a"}) + sse({"content": "b"}), 1.0)) == 2
    assert payloads(attempt) is None
    attempt.feed(DONE, 1.0)
    assert payloads(attempt) is None


def test_a_continuation_re_encodes_its_chunks() -> None:
    """At a resume seam chunks are rewritten (id, role), so their bytes are not relayed."""
    attempt = Attempt(continuation_plan(), shown_answer("Hel"), now=0.0)
    attempt.feed(b": x\n\n", 0.5)
    (out,) = attempt.feed(sse({"content": "lo"}), 1.0)
    assert out.id == "c1"
    assert payloads(attempt) is None


def test_a_hidden_interrupting_finish_re_encodes_its_chunk() -> None:
    """A chunk whose interrupting finish_reason is hidden is not its upstream bytes."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    attempt.feed(b": x\n\n", 0.5)
    attempt.feed(sse({"content": "a"}), 1.0)
    assert payloads(attempt) is not None
    (out,) = attempt.feed(sse({}, "insufficient_system_resource"), 1.0)
    assert out.choices[0].finish_reason is None
    assert payloads(attempt) is None


def test_held_tool_calls_are_released_re_encoded() -> None:
    """Tool-call fragments held back and released with their finish give no bytes."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    attempt.feed(b": x\n\n", 0.5)
    call = {"index": 0, "id": "t", "type": "function", "function": {"name": "f"}}
    assert attempt.feed(sse({"tool_calls": [call]}), 1.0) == []
    assert payloads(attempt) is None
    assert len(attempt.feed(sse({}, "tool_calls"), 1.0)) == 2
    assert payloads(attempt) is None


def test_a_first_attempt_folds_once_and_keeps_its_fold_after_finishing() -> None:
    """An attempt that starts the answer shares its fold until it finishes: its
    accumulator then equals the answer's, and chunks the answer gets afterwards (another
    attempt's) are not the attempt's."""
    answer = ChunkAccumulator()
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    feed_all(attempt, sse({"role": "assistant", "content": "Hel"}), sse({"content": "lo"}))
    assert attempt.acc.content() == "Hello"
    assert attempt.acc.n_chunks == 2
    answer.feed(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(content="!"))]))
    assert answer.content() == "Hello!"
    assert attempt.acc.content() == "Hello"
    assert attempt.verdict is not None
    assert attempt.verdict.state is EndState.TRUNCATED


# -- relay_one: the relay's one-call path --------------------------------------------------

CALL = {"index": 0, "id": "t", "type": "function", "function": {"name": "f"}}
RELAY_READS = [
    b": keep-alive\n\n",  # a comment: no chunk
    sse({"role": "assistant", "content": ""}),  # the role chunk: no token yet
    sse({"content": "H\xe9"}),  # valid UTF-8, not ASCII
    sse({"content": "a"}) + sse({"content": "b"}),  # two events in one read
    sse({}, "insufficient_system_resource"),  # hidden: the attempt folds its own copy
    sse({"content": "c"}),  # folded into both accumulators
    sse({"tool_calls": [CALL]}),  # held
    sse({"content": "d"}),  # releases the held fragment
    sse({"content": "e"}, id="c3"),  # another head: decoded, folded into both
    b"data: " + b'{"id":"c2","choices":[{"index":0,"delta":{"content":"\xff"}}]}' + b"\n\n",
    sse({"content": ""}, "stop", usage=USAGE),  # usage: never as bytes
    DONE,  # not a chunk's JSON
    sse({"content": "late"}),  # after [DONE]: nothing
]


def test_relay_one_is_feed_with_lone_unchanged_chunks_as_their_bytes() -> None:
    """`relay_one` returns a lone unchanged content chunk as its upstream bytes (what
    `feed` would give as `payloads`), None for a read of several whole events (each then
    relayed alone gives the chunks `feed` decodes from the read, as their bytes), and
    otherwise exactly what `feed` returns; both fold the same answer and attempt, and
    time the first token alike."""
    fed_answer, relayed_answer = ChunkAccumulator(), ChunkAccumulator()
    fed = Attempt(AttemptPlan(route=ROUTE, body={}), fed_answer, now=0.0)
    relayed = Attempt(AttemptPlan(route=ROUTE, body={}), relayed_answer, now=0.0)
    n_bytes = n_split = 0
    for i, read in enumerate(RELAY_READS):
        got = relayed.relay_one(read, 1.0 + i)
        chunks = fed.feed(read, 1.0 + i)
        if got is None:
            assert several_events(read)
            outs = [relayed.relay_one(event, 1.0 + i) for event in split_events(read)]
            assert all(isinstance(out, bytes) for out in outs)
            assert [msgspec.json.decode(out, type=ChatCompletionChunk) for out in outs] == chunks  # type: ignore[arg-type]  # bytes, checked above
            n_split += len(outs)
        elif isinstance(got, bytes):
            n_bytes += 1
            assert payloads(fed) == [got]
            assert [msgspec.json.decode(got, type=ChatCompletionChunk)] == chunks
            assert payloads(relayed) is None
        else:
            assert got == chunks
            assert payloads(relayed) == payloads(fed)
        assert relayed.first_token_at == fed.first_token_at
        assert relayed.last_data_at == fed.last_data_at
    assert n_bytes == 4  # the role, the UTF-8 text, "c" and "e" after the hidden finish
    assert n_split == 2  # "a" and "b", read together
    assert fed.finish(9.0) == relayed.finish(9.0) == []
    assert relayed_answer.content() == fed_answer.content() == "Héabcde\ufffd"
    assert relayed.acc.content() == fed.acc.content()
    assert relayed.acc.finish_reason(0) == fed.acc.finish_reason(0) == "stop"
    assert relayed.usage == fed.usage == BILLED
    assert relayed.verdict == fed.verdict


def test_relay_one_folds_a_reasoners_stream_like_feed() -> None:
    """A reasoner's answer (reasoning, then content, then reasoning again, a hidden
    interrupting finish between, a second choice, a held tool call, usage) through
    `relay_one` and through `feed`: the same bytes out, folds, first token time and end."""
    reads = [
        sse({"role": "assistant", "content": None, "reasoning_content": ""}),
        sse({"content": None, "reasoning_content": ""}),  # the template, no token yet
        *(sse({"content": None, "reasoning_content": f"r{i} "}) for i in range(20)),
        sse({"content": None, "reasoning_content": "\u00e9\u2028"}),  # not plain: decoded
        sse({"content": None, "reasoning_content": "x"}, index=1),  # another choice
        sse({"content": None, "reasoning_content": "y"}, index=1),
        sse({"content": "A", "reasoning_content": None}),
        *(sse({"content": f"c{i}", "reasoning_content": None}) for i in range(10)),
        sse({"content": None, "reasoning_content": "again"}),
        sse({"content": None, "reasoning_content": "again"}),
        sse({}, "insufficient_system_resource"),
        sse({"content": None, "reasoning_content": "after"}),
        sse({"tool_calls": [CALL]}),  # held
        sse({"content": None, "reasoning_content": "z"}),  # releases it
        sse({"content": "", "reasoning_content": None}, "stop", usage=USAGE),
        DONE,
    ]
    fed = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    relayed = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    n_text = 0
    for i, read in enumerate(reads):
        template = relayed.decoder.text_template
        got = relayed.relay_one(read, 1.0 + i)
        chunks = fed.feed(read, 1.0 + i)
        if isinstance(got, bytes):
            n_text += template is not None and read.startswith(b"data: " + template[0])
            assert relayed.decoder.raw is None  # handed on: not held until the next read
            assert payloads(fed) == [got]
            assert [msgspec.json.decode(got, type=ChatCompletionChunk)] == chunks
        else:
            assert got == chunks
        assert relayed.first_token_at == fed.first_token_at
    assert relayed.first_token_at == 3.0  # the first non-empty reasoning
    assert n_text >= 28  # the reasoning and content texts after the first of each
    assert fed.finish(99.0) == relayed.finish(99.0) == []
    assert relayed.acc.completion() == fed.acc.completion()
    assert relayed.acc.reasoning(0).startswith("r0 r1 ")
    assert relayed.acc.n_text_deltas(0) == fed.acc.n_text_deltas(0)
    assert relayed.usage == fed.usage == BILLED
    assert relayed.verdict == fed.verdict


def test_relay_one_decodes_a_malformed_chunk_into_an_error() -> None:
    """A lone event that is not a chunk ends the stream with the decoder's error, as `feed`
    does."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    assert attempt.relay_one(b": x\n\n", 0.5) == []
    assert attempt.relay_one(b'data: {"choices": 7}\n\n', 1.0) == []
    assert attempt.decoder.error is not None
    assert attempt.relay_one(sse({"content": "a"}), 1.0) == []


def test_relay_one_re_encodes_what_a_seam_rewrites() -> None:
    """A continuation's chunks are rewritten, so `relay_one` gives them as `feed` does."""
    attempt = Attempt(continuation_plan(), shown_answer("Hel"), now=0.0)
    attempt.relay_one(b": x\n\n", 0.5)
    got = attempt.relay_one(sse({"content": "lo"}), 1.0)
    assert isinstance(got, list)
    (out,) = got
    assert isinstance(out, ChatCompletionChunk)
    assert out.id == "c1"
    text = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    text.decoder = ChatStreamDecoder(text_completions=True)
    event = b'data: {"id":"t","object":"text_completion","choices":[{"index":0,"text":"x"}]}\n\n'
    assert not isinstance(text.relay_one(event, 1.0), bytes)
    assert not isinstance(text.relay_one(event, 1.0), bytes)


def test_relay_one_folds_text_like_feed_from_the_first_token_on() -> None:
    """Text events like the last but their text are folded as text: the first token's time
    (after an empty text), many pieces, empty texts, all as `feed` folds them."""
    reads = [
        sse({"role": "assistant", "content": ""}),
        sse({"content": ""}),  # the template, no token yet
        *(sse({"content": f"w{i} "}) for i in range(40)),
        sse({"content": ""}),
        sse({}, "stop"),
    ]
    fed = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    relayed = Attempt(AttemptPlan(route=ROUTE, body={}), ChunkAccumulator(), now=0.0)
    got = [relayed.relay_one(read, 1.0 + i) for i, read in enumerate(reads)]
    assert [fed.feed(read, 1.0 + i) for i, read in enumerate(reads)]
    assert sum(isinstance(g, bytes) for g in got) == len(reads)  # the first read too
    assert relayed.first_token_at == fed.first_token_at == 3.0
    assert relayed.acc.content() == fed.acc.content() == "".join(f"w{i} " for i in range(40))
    assert relayed.acc.n_chunks == fed.acc.n_chunks == len(reads)
    relayed.finish(9.0)
    fed.finish(9.0)
    assert relayed.verdict == fed.verdict
    assert relayed.acc.completion() == fed.acc.completion()


# -- relay_one's fused path: text chunks whose text the answer's log keeps -------------------


class TextLog:
    """The log a gateway's answer keeps its text in (`ChunkAccumulator.keep_text_in`): each
    relayed event's JSON, appended after `relay_one` gave it (its bytes, or its chunks
    encoded), read back with `chunk_text`."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def text_mark(self) -> int:
        return len(self.payloads)

    def text_since(self, mark: int, until: int | None, index: int, reasoning: bool) -> str:
        return join_text(chunk_text(self.payloads[mark:until], index, reasoning))

    def log(self, got: bytes | list[ChatCompletionChunk] | None) -> None:
        if isinstance(got, bytes):
            self.payloads.append(got)
        elif got:
            self.payloads += [msgspec.json.encode(chunk) for chunk in got]


def text_event(text: str, *, reasoning: bool = False, index: int = 0) -> bytes:
    """A text chunk of DeepSeek's shape (both text fields present, one null)."""
    delta = (
        {"content": None, "reasoning_content": text}
        if reasoning
        else {"content": text, "reasoning_content": None}
    )
    return sse(delta, index=index)


FUSED_READS = [
    b": keep-alive\n\n",
    sse({"role": "assistant", "content": "", "reasoning_content": None}),
    text_event("", reasoning=True),  # decoded: the reasoning template
    *(text_event(f"r{i} ", reasoning=True) for i in range(6)),  # fused
    text_event("", reasoning=True),  # fused, no token
    text_event("line\n", reasoning=True),  # an escape: the general way
    text_event("Hi"),  # content: decoded, a new template
    *(text_event(f"w{i} ") for i in range(6)),  # fused
    b": keep-alive\n\n",  # the SSE decoder read on: the next is not fused
    text_event("after"),
    text_event('a "quote"'),  # escaped: the general way
    text_event("\u2028"),  # not printable: the general way
    text_event("caf\u00e9 \u4e2d"),  # UTF-8 text: fused
    text_event("\u4e2d\u6587\uff0c\u6d4b\u8bd5\u3002 ok"),  # Chinese text: fused, bytewise
    text_event("\u4e2d\u3000\u6587"),  # an ideographic space: not printable, the general way
    text_event("\u4e2d\U0001f600"),  # past the three-byte characters: checked as a str
    b": a comment cut",  # its line goes on in the next read: that is no event of its own
    text_event("lost"),
    text_event("found"),
    text_event("x").replace(b'"x"', b'"x\xff"'),  # invalid UTF-8: the general way
    text_event("x", index=1),  # another choice: decoded
    text_event("y", index=1),  # its template, but the answer's first choice is 0
    text_event("back"),  # choice 0 again: decoded
    text_event("one") + text_event("two"),  # several events: relayed one by one
    text_event("split")[:20],  # an event cut across reads
    text_event("split")[20:],
    sse({"tool_calls": [CALL]}),  # held
    text_event("held"),  # releases it: the general way
    *(text_event(f"t{i} ") for i in range(3)),
    sse({}, "insufficient_system_resource"),  # the attempt folds its own copy from here
    *(text_event(f"z{i}") for i in range(3)),  # the general way (the attempt's fold)
    sse({"content": "", "reasoning_content": None}, "stop", usage=USAGE),
    DONE,
    text_event("late"),  # after [DONE]: nothing
]


def relay_read(attempt: Attempt, log: TextLog, read: bytes, now: float) -> list[bytes]:
    """`read` relayed as a gateway relays it (several events one by one): the bytes of the
    events relayed as their upstream bytes."""
    got = attempt.relay_one(read, now)
    if got is None:
        return [b for event in split_events(read) for b in relay_read(attempt, log, event, now)]
    log.log(got)
    return [got] if isinstance(got, bytes) else []


def test_fused_text_path_folds_as_feed_does() -> None:
    """Text events on the decoder's template, relayed for an answer whose log keeps its
    text (a gateway's), give their upstream bytes and fold as `feed` folds them: the same
    text, deltas, chunk count, first token and data times, usage and end, whatever comes
    between (comments, escapes, invalid UTF-8, another choice, split and joined events,
    held tool calls, a hidden finish, [DONE])."""
    fed_answer, answer = ChunkAccumulator(), ChunkAccumulator()
    log = TextLog()
    assert answer.keep_text_in(log)
    fed = Attempt(AttemptPlan(route=ROUTE, body={}), fed_answer, now=0.0)
    relayed = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
    n_bytes = 0
    for i, read in enumerate(FUSED_READS):
        out = relay_read(relayed, log, read, 1.0 + i)
        chunks = fed.feed(read, 1.0 + i)
        n_bytes += len(out)
        assert [msgspec.json.decode(b, type=ChatCompletionChunk) for b in out] == [
            c for c in chunks if not c.usage
        ][: len(out)]
        assert relayed.decoder.raw is None or not out
        assert payloads(relayed) is None or not out
        assert relayed.first_token_at == fed.first_token_at
        assert relayed.last_data_at == fed.last_data_at
        assert answer.n_chunks == fed_answer.n_chunks
        assert answer.content(0) == fed_answer.content(0)
        assert answer.reasoning(0) == fed_answer.reasoning(0)
        assert answer.n_text_deltas(0) == fed_answer.n_text_deltas(0)
    assert n_bytes >= 20
    assert relayed.first_token_at == 4.0  # the first non-empty reasoning
    assert fed.finish(99.0) == relayed.finish(99.0) == []
    assert answer.completion() == fed_answer.completion()
    assert relayed.acc.completion() == fed.acc.completion()
    assert relayed.usage == fed.usage == BILLED
    assert relayed.verdict == fed.verdict


def test_fused_text_path_keeps_the_event_size_limit() -> None:
    """A text event on the template past `max_event_bytes` is refused as the decoder
    refuses it, not relayed."""
    limit = len(text_event("abcdef")) - 7
    fed_answer, answer = ChunkAccumulator(), ChunkAccumulator()
    log = TextLog()
    answer.keep_text_in(log)
    fed = Attempt(AttemptPlan(route=ROUTE, body={}), fed_answer, now=0.0, max_event_bytes=limit)
    relayed = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0, max_event_bytes=limit)
    relayed.relay_one(b": x\n\n", 0.5)
    fed.feed(b": x\n\n", 0.5)
    for read in (text_event("abc"), text_event("def"), text_event("a longer text")):
        got = relayed.relay_one(read, 1.0)
        log.log(got)
        chunks = fed.feed(read, 1.0)
        assert isinstance(got, bytes) == bool(chunks)
        assert (relayed.decoder.error is None) == (fed.decoder.error is None)
    assert isinstance(relayed.decoder.error, type(fed.decoder.error))
    assert relayed.decoder.error is not None
    assert answer.content(0) == fed_answer.content(0) == "abcdef"


@pytest.mark.parametrize("diverged", [False, True], ids=["shared", "own"])
def test_an_attempt_finished_without_keeping_is_read_from_its_fold_as_it_ended(
    diverged: bool,
) -> None:
    """`finish(keep=False)` (a shell that reads the fold once, at once): an attempt that
    folded into the answer alone is judged and read (`folded`) on the answer's own fold,
    no snapshot taken, with the verdict and the values a kept snapshot gives; an attempt
    with a fold of its own (here: held tool calls) reads that one, as `acc`."""
    reads = [sse({"role": "assistant", "content": "Hel"}), sse({"content": "lo"})]
    if diverged:
        call = {"index": 0, "id": "t", "type": "function", "function": {"name": "f"}}
        reads.append(sse({"tool_calls": [call]}))
    reads += [sse({}, "stop", usage=USAGE), DONE]
    made: list[tuple[Attempt, ChunkAccumulator]] = []
    for keep in (True, False):
        answer = ChunkAccumulator()
        attempt = Attempt(AttemptPlan(route=ROUTE, body={}), answer, now=0.0)
        for read in reads:
            attempt.feed(read, 1.0)
        attempt.finish(2.0, keep=keep)
        made.append((attempt, answer))
    (kept, _), (lean, answer) = made
    assert lean.verdict == kept.verdict
    fold = lean.folded()
    assert (fold is answer) is not diverged
    if diverged:
        assert fold is lean.acc
    assert (fold.usage, fold.content(), fold.n_chunks) == (
        kept.acc.usage,
        kept.acc.content(),
        kept.acc.n_chunks,
    )
    assert kept.folded() is kept.acc


def test_the_chinese_characters_checked_bytewise_are_printable_and_no_others() -> None:
    """`_cjk_at` takes the UTF-8 of U+4000-U+9FFF, U+3001-U+303F and U+FF01-U+FF5F, each
    printable in this Python (what `relay_one` would otherwise check on a str), and no
    character around them, nor bytes that are not such a character's UTF-8."""
    ranges = [(0x4000, 0x9FFF), (0x3001, 0x303F), (0xFF01, 0xFF5F)]
    for first, last in ranges:
        for code in range(first, last + 1):
            char = chr(code)
            assert char.isprintable(), hex(code)
            data = char.encode()
            assert _cjk_at(data, 0, data[0]), hex(code)
    for code in (0x3000, 0x3040, 0x3FFF, 0xA000, 0xFF00, 0xFF60, 0xE000, 0xFFFD, 0x2028):
        data = chr(code).encode()
        assert not _cjk_at(data, 0, data[0]), hex(code)
    for data in (
        b"\xe4\x80\x41",
        b"\xe4\xc0\x80",
        b"\xe4\x7f\x80",
        b"\xef\xbc\x80",
        b"\xf0\x9f\x98",
    ):
        assert not _cjk_at(data, 0, data[0]), data
