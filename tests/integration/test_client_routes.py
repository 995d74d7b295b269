"""Client behaviour over loopback: routes and fallback, circuit breaker, parameter and prefill
refusals, retry budget, events, tools, n > 1, limits, cost, cancellation and secrecy."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import unbroken
from tests.healing import logged
from unbroken import (
    AsyncClient,
    Client,
    FellBackEvent,
    RateLimit,
    ResumedEvent,
    RetryBudget,
    RetryingEvent,
    RetryPolicy,
    Route,
    TextEvent,
    Timeouts,
)
from unbroken.core.breaker import BreakerState
from unbroken.instrumentation import AnswerRecord, AttemptRecord
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text, create_app

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Explain retries briefly."}]
CONFIG = MockConfig(seed=5)
FAST = RetryPolicy(attempts=6, wait_initial_s=0.01, wait_max_s=0.05)


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


def content(model: str = "deepseek-chat", messages: list[dict[str, Any]] | None = None) -> str:
    return answer_text(model, messages or MESSAGES, config=CONFIG)[1]


def faulty(upstream: MockServer, name: str, spec: str, **kwargs: Any) -> Route:
    return Route(name, upstream.url, api_key="sk-a", headers={"X-Mock-Fault": spec}, **kwargs)


def healthy(upstream: MockServer, name: str = "b", **kwargs: Any) -> Route:
    return Route(name, upstream.url, api_key="sk-b", **kwargs)


def test_fallback_to_next_route_on_402(upstream: MockServer) -> None:
    """A route that refuses (402) hands the answer to the next route; usage is not
    attributed to the failed route."""
    routes = [faulty(upstream, "a", "402"), healthy(upstream)]
    with Client(routes=routes, retry=FAST) as c:
        done = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert done.choices[0].message.content == content()
    meta = done.unbroken
    assert meta is not None
    assert meta.route == "b"
    assert [(a.route, a.kind, a.usage is None) for a in meta.attempts] == [
        ("a", "first", True),
        ("b", "fallback", False),
    ]


def test_mid_stream_fallback_resumes_on_the_next_route(upstream: MockServer) -> None:
    """A route that keeps breaking mid-answer is left; the next route continues the same
    answer from where it broke (no repeat, no gap)."""
    routes = [faulty(upstream, "a", "reset after=6"), healthy(upstream)]
    policy = RetryPolicy(attempts=8, max_resumes=5, wait_initial_s=0.01, wait_max_s=0.02)
    with Client(routes=routes, retry=policy, breaker_threshold=2) as c:
        events = list(c.chat.stream(model="deepseek-chat", messages=MESSAGES))
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    assert text == content()
    assert any(isinstance(e, FellBackEvent) and e.to_route == "b" for e in events)
    assert any(isinstance(e, ResumedEvent) for e in events)
    done = events[-1]
    assert isinstance(done, unbroken.DoneEvent)
    assert done.completion.unbroken is not None
    assert done.completion.unbroken.route == "b"


def test_silent_route_is_left_after_the_first_timeout(upstream: MockServer) -> None:
    """A route that never answers is not retried when another exists."""
    routes = [faulty(upstream, "a", "hang"), healthy(upstream)]
    start = time.monotonic()
    with Client(routes=routes, retry=FAST, timeouts=Timeouts(headers_s=0.3)) as c:
        done = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert done.unbroken is not None
    assert [a.route for a in done.unbroken.attempts] == ["a", "b"]
    assert time.monotonic() - start < 2.0


def test_per_request_fallback_models(upstream: MockServer) -> None:
    """`fallbacks=[model]` tries that model on the same route after the first fails."""
    with Client(api_key="sk", base_url=upstream.url, retry=FAST) as c:
        done = c.chat.completions.create(
            model="no-such-model", messages=MESSAGES, fallbacks=["deepseek-chat"]
        )
    assert done.choices[0].message.content == content()
    assert done.unbroken is not None
    assert done.unbroken.model == "deepseek-chat"
    assert done.model == "deepseek-chat"


def test_context_overflow_moves_to_a_larger_context_route(upstream: MockServer) -> None:
    """400 context_length_exceeded goes to a route with a larger context, never retried."""
    routes = [
        faulty(upstream, "small", "context_length", context_tokens=65536),
        healthy(upstream, "mid", context_tokens=32768, headers={"X-Mock-Fault": "503"}),
        healthy(upstream, "big", context_tokens=131072),
    ]
    with Client(routes=routes, retry=FAST) as c:
        done = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert done.unbroken is not None
    assert [a.route for a in done.unbroken.attempts] == ["small", "big"]


def test_circuit_breaker_opens_and_heals(upstream: MockServer) -> None:
    """After repeated failures the route is skipped (no request reaches it) until the
    cooldown; then a probe succeeds and it closes again."""
    key = f"breaker-{time.time()}"
    a = Route(
        "a",
        upstream.url,
        api_key="sk",
        headers={"X-Mock-Fault": "503 times=2", "X-Mock-Fault-Key": key},
    )
    states: list[tuple[str, BreakerState]] = []

    class Hook:
        def on_stream_start(self) -> None: ...
        def on_attempt(self, record: AttemptRecord) -> None: ...
        def on_answer(self, record: AnswerRecord) -> None: ...
        def on_breaker(self, route: str, state: BreakerState) -> None:
            states.append((route, state))

    with Client(
        routes=[a, healthy(upstream)],
        retry=RetryPolicy(attempts=3, wait_initial_s=0.01, wait_max_s=0.01),
        breaker_threshold=2,
        breaker_cooldown_s=0.3,
        hooks=[Hook()],
    ) as c:
        first = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        second = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        assert first.unbroken is not None
        assert second.unbroken is not None
        assert [x.route for x in first.unbroken.attempts] == ["a", "a", "b"]
        assert [x.route for x in second.unbroken.attempts] == ["b"]  # a is open: skipped
        time.sleep(0.35)  # the cooldown itself is what is under test
        third = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert third.unbroken is not None
    assert [x.route for x in third.unbroken.attempts] == ["a"]  # the probe heals it
    assert ("a", BreakerState.OPEN) in states
    assert states[-1] == ("a", BreakerState.CLOSED)


def test_retry_budget_stops_retry_storms(upstream: MockServer) -> None:
    """Under sustained failure the budget caps retries at its share of requests."""
    budget = RetryBudget(ratio=0.5, min_per_s=0.0, cap=2)
    route = faulty(upstream, "a", "503")
    before = upstream.stats()["requests_total"]
    with Client(routes=[route], retry=FAST, retry_budget=budget) as c:
        for _ in range(10):
            with pytest.raises(unbroken.UnbrokenError) as info:
                c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
            assert info.value.partial is None
    attempts = upstream.stats()["requests_total"] - before
    # 10 requests; 2 saved tokens + 0.5 per request: at most 10 + 2 + 5 attempts, where
    # without a budget it would be 10 * 6 = 60.
    assert 10 < attempts <= 17
    assert "not retried: the retry budget is spent" in "".join(getattr(info.value, "__notes__", []))


def _rejecting_app(reject: Callable[[dict[str, Any], str], str | None]) -> Any:
    """The mock behind a filter that answers 400 when `reject(body, path)` names a reason."""
    inner = create_app(CONFIG)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await inner(scope, receive, send)
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        reason = reject(json.loads(raw), scope["path"])
        if reason is not None:
            payload = json.dumps(
                {"object": "error", "message": reason, "type": "BadRequestError", "code": 400}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                message: dict[str, Any] = await receive()
                return message
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await inner(scope, replay, send)

    return app


@pytest.mark.parametrize("fallbacks", [["b"], ["b", "a"]])
def test_naming_configured_routes_in_fallbacks_changes_nothing(
    upstream: MockServer, fallbacks: list[str]
) -> None:
    """Configured routes are tried in their own order; naming them in `fallbacks` neither
    moves them forward nor tries them twice (as documented)."""
    routes = [faulty(upstream, "a", "402"), healthy(upstream)]
    with Client(routes=routes, retry=FAST) as c:
        done = c.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, fallbacks=fallbacks
        )
    assert done.unbroken is not None
    assert [(a.route, a.kind) for a in done.unbroken.attempts] == [
        ("a", "first"),
        ("b", "fallback"),
    ]


def test_unknown_parameter_is_dropped_and_remembered() -> None:
    """A server that rejects `stream_options` gets the request once more without it, and
    the route remembers: the next request does not send it at all."""
    seen: list[bool] = []

    def reject(body: dict[str, Any], path: str) -> str | None:
        seen.append("stream_options" in body)
        if "stream_options" in body:
            return "stream_options: Extra inputs are not permitted"
        return None

    server = ServerThread(_rejecting_app(reject))
    server.start()
    try:
        with Client(api_key="sk", base_url=server.url, retry=FAST) as c:
            for _ in range(2):
                done = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
                assert done.choices[0].message.content == content()
    finally:
        server.stop()
    assert seen == [True, False, False]


def test_prefill_refusal_switches_to_instruction_and_keeps_the_real_error() -> None:
    """A route that rejects assistant prefill is continued by instruction; when that cannot
    help either, the error reported is the one that broke the stream, not the 400."""
    sent: list[list[dict[str, Any]]] = []

    def reject(body: dict[str, Any], path: str) -> str | None:
        sent.append(body["messages"])
        last = body["messages"][-1]
        if last.get("role") == "assistant":
            return "assistant prefill is not supported"
        return None

    server = ServerThread(_rejecting_app(reject))
    server.start()
    try:
        with Client(
            api_key="sk",
            base_url=server.url,
            retry=RetryPolicy(attempts=4, max_resumes=2, wait_initial_s=0.01, wait_max_s=0.01),
        ) as c:
            stream = c.chat.completions.create(
                model="deepseek-chat",
                messages=MESSAGES,
                stream=True,
                extra_headers={"X-Mock-Fault": "reset after=4"},
            )
            with pytest.raises(unbroken.UnbrokenError) as info:
                for _ in stream:
                    pass
    finally:
        server.stop()
    error = info.value
    cause = error.__cause__ if isinstance(error, unbroken.RetriesExhausted) else error
    assert isinstance(cause, unbroken.UpstreamTruncated), repr(cause)
    assert error.partial is not None
    assert content().startswith(error.partial.choices[0].message.content or "")
    # What went over the wire: the first request, a prefill continuation (refused), then the
    # switch: the partial answer as a plain assistant turn and a user turn asking to go on.
    assert sent[0] == MESSAGES
    assert sent[1][-1]["role"] == "assistant"
    assert len(sent) >= 3, sent
    switched = sent[2]
    assert switched[: len(MESSAGES)] == MESSAGES
    assert switched[-2]["role"] == "assistant"
    assert "prefix" not in switched[-2]
    assert content().startswith(switched[-2]["content"])
    assert switched[-2]["content"]
    assert switched[-1]["role"] == "user"
    assert "cut off" in switched[-1]["content"]
    assert "continue" in switched[-1]["content"].lower()
    # Every later continuation stays on instruction: no prefill is tried again.
    assert all(m[-1]["role"] == "user" for m in sent[2:])


def test_chat_stream_reports_retrying_and_done(upstream: MockServer) -> None:
    """chat.stream yields retrying before the retry and done with the whole completion."""
    with Client(api_key="sk", base_url=upstream.url, retry=FAST) as c:
        stream = c.chat.stream(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_headers={"X-Mock-Fault": "503 times=1", "X-Mock-Fault-Key": f"ev{time.time()}"},
        )
        events = list(stream)
        final = stream.final()
    kinds = [e.type for e in events]
    assert kinds[0] == "retrying"
    retrying = events[0]
    assert isinstance(retrying, RetryingEvent)
    assert retrying.delay_s <= 0.05
    assert kinds[-1] == "done"
    assert final.choices[0].message.content == content()
    assert kinds.count("usage") == 1
    assert kinds.count("finish") == 1


def test_tool_call_broken_mid_arguments_arrives_exactly_once(upstream: MockServer) -> None:
    """A break inside a tool call's arguments is healed: the call arrives whole, once."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather? Use get_weather."}]
    _, baseline = None, None
    with Client(api_key="sk", base_url=upstream.url, retry=FAST) as c:
        clean = c.chat.completions.create(model="deepseek-chat", messages=messages, tools=tools)
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=messages,
            tools=tools,
            stream=True,
            extra_headers={
                "X-Mock-Fault": "reset after=3 times=1",
                "X-Mock-Fault-Key": f"t{time.time()}",
            },
        )
        fragments = [
            tc
            for chunk in stream
            for ch in chunk.choices
            if ch.delta
            for tc in ch.delta.tool_calls or ()
        ]
        broken = stream.final()
    baseline = clean.choices[0].message.tool_calls
    assert baseline
    assert broken.choices[0].message.tool_calls == baseline
    assert sum(1 for f in fragments if f.id) == len(baseline)
    assert broken.choices[0].finish_reason == "tool_calls"


def test_n_choices_each_resumed(upstream: MockServer) -> None:
    """With n=2 a broken stream is continued per unfinished choice."""
    with Client(api_key="sk", base_url=upstream.url, retry=FAST) as c:
        clean = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, n=2)
        broken = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            n=2,
            extra_headers={
                "X-Mock-Fault": "reset after=9 times=1",
                "X-Mock-Fault-Key": f"n{time.time()}",
            },
        )
    assert [ch.message.content for ch in broken.choices] == [
        ch.message.content for ch in clean.choices
    ]


def test_max_tokens_budget_is_kept_across_a_resume(upstream: MockServer) -> None:
    """The continuation asks only for the remaining budget; the answer ends with length."""
    with Client(api_key="sk", base_url=upstream.url, retry=FAST) as c:
        clean = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, max_tokens=12)
        key = f"m{time.time()}"
        broken = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            max_tokens=12,
            extra_headers={"X-Mock-Fault": "reset after=5 times=1", "X-Mock-Fault-Key": key},
        )
    assert clean.choices[0].finish_reason == "length"
    assert broken.choices[0].finish_reason == "length"
    assert broken.unbroken is not None
    first, resume = broken.unbroken.attempts
    assert resume.kind == "resume"
    # The whole text, not a few characters: the budget left after the break was spent on
    # the same tokens the clean answer got.
    assert broken.choices[0].message.content == clean.choices[0].message.content
    # The mock's side: the continuation was capped at what was left of the 12 tokens (the
    # rest of the answer is longer, so the mock's count of it is the max_tokens it was sent).
    entries = logged(upstream, key, 2)
    assert [e["outcome"] for e in entries] == ["reset", "ok"]
    assert first.usage is not None
    assert 0 < first.usage.completion_tokens < 12
    assert entries[1]["completion_tokens"] == 12 - first.usage.completion_tokens


def test_dialect_none_restarts_only_when_asked(upstream: MockServer) -> None:
    """dialect='none' cannot continue: with restart=True the consumer is told to discard."""
    headers = {"X-Mock-Fault": "reset after=5 times=1"}
    with Client(api_key="sk", base_url=upstream.url, dialect="none", retry=FAST) as c:
        events = list(
            c.chat.stream(
                model="deepseek-chat",
                messages=MESSAGES,
                restart=True,
                extra_headers={**headers, "X-Mock-Fault-Key": f"r{time.time()}"},
            )
        )
        kinds = [e.type for e in events]
        assert "restarted" in kinds
        after = kinds.index("restarted")
        text = "".join(e.text for e in events[after:] if isinstance(e, TextEvent))
        assert text == content()
        with pytest.raises(unbroken.UpstreamError, match="cannot continue"):
            c.chat.completions.create(
                model="deepseek-chat",
                messages=MESSAGES,
                extra_headers={**headers, "X-Mock-Fault-Key": f"r2{time.time()}"},
            )


def test_usage_and_cost_are_billed_across_attempts(upstream: MockServer) -> None:
    """Billed usage sums every attempt (estimated for broken ones); cost follows prices."""
    with Client(api_key="sk", base_url=upstream.url, retry=FAST) as c:
        clean = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        broken = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_headers={
                "X-Mock-Fault": "reset after=8 times=1",
                "X-Mock-Fault-Key": f"u{time.time()}",
            },
        )
    assert clean.usage is not None
    assert broken.usage is not None
    assert clean.unbroken is not None
    assert broken.unbroken is not None
    price = unbroken.PriceTable().price("deepseek-chat")
    assert price is not None
    expected_cost = (
        (clean.usage.prompt_cache_hit_tokens or 0) * price.cache_hit
        + (clean.usage.prompt_cache_miss_tokens or 0) * price.cache_miss
        + clean.usage.completion_tokens * price.output
    ) / 1e6
    assert clean.unbroken.cost_usd == pytest.approx(expected_cost)
    assert broken.unbroken.usage_estimated
    assert broken.usage.total_tokens > clean.usage.total_tokens
    assert broken.unbroken.cost_usd > clean.unbroken.cost_usd
    # Beside what was billed: the answer's own usage, as one unbroken request would be.
    assert clean.unbroken.answer_usage is not None
    assert clean.unbroken.answer_usage.completion_tokens == clean.usage.completion_tokens
    assert clean.unbroken.answer_usage.prompt_tokens == clean.usage.prompt_tokens
    assert not clean.unbroken.answer_usage_estimated
    own = broken.unbroken.answer_usage
    assert own is not None
    assert broken.unbroken.answer_usage_estimated
    assert own.prompt_tokens == clean.usage.prompt_tokens
    assert (
        abs(own.completion_tokens - clean.usage.completion_tokens)
        <= 0.5 * clean.usage.completion_tokens
    )
    assert own.total_tokens < broken.usage.total_tokens


def test_rate_limit_spaces_requests() -> None:
    """requests_per_minute makes a burst wait for the bucket instead of sending: seen from
    the server, no stretch of requests ever beats a full bucket plus its refill."""
    config = MockConfig(seed=5, answer_tokens=(2, 3))
    rpm, n = 120, 124
    with (
        MockServer(config) as server,
        Client(
            api_key="sk", base_url=server.url, rate_limit=RateLimit(requests_per_minute=rpm)
        ) as c,
    ):
        for _ in range(n):
            c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        arrived = [e["time"] for e in server.log(1000)]
    assert len(arrived) == n
    capacity, rate = rpm, rpm / 60.0
    # A token bucket's promise, checked on the mock's arrival times: requests i..j (both
    # included) need j - i + 1 tokens, at most a full bucket plus what refilled meanwhile
    # (100 ms of slack for the time between taking a token and arriving).
    worst = max(
        (j - i + 1) - (capacity + rate * (arrived[j] - arrived[i] + 0.1))
        for i in range(n)
        for j in range(i, n)
    )
    assert worst <= 0, worst


def test_closing_a_stream_cancels_upstream(upstream: MockServer) -> None:
    """Closing the stream mid-answer closes the connection: the mock sees a cancel."""
    before = upstream.stats()
    with Client(api_key="sk", base_url=upstream.url) as c:
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Mock-Token-Ms": "20", "X-Mock-Tokens": "500"},
        )
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            after = upstream.stats()
            if after["streams"]["cancelled"] > before["streams"]["cancelled"]:
                break
            time.sleep(0.02)  # polling the mock's counter, bounded by the deadline
    assert after["streams"]["cancelled"] == before["streams"]["cancelled"] + 1


def test_api_key_never_leaks(upstream: MockServer, caplog: pytest.LogCaptureFixture) -> None:
    """The key appears in no repr, error message or log line."""
    secret = "sk-very-secret-123456"
    caplog.set_level(logging.DEBUG)
    route = Route("a", upstream.url, api_key=secret)
    with Client(routes=[route], retry=FAST) as c:
        assert secret not in repr(c)
        assert secret not in repr(route)
        assert secret not in repr(c.routes)
        with pytest.raises(unbroken.UpstreamStatusError) as info:
            c.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, extra_headers={"X-Mock-Fault": "401"}
            )
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers={
                "X-Mock-Fault": "reset after=3 times=1",
                "X-Mock-Fault-Key": f"k{time.time()}",
            },
        )
        stream.final()
    assert secret not in str(info.value)
    assert secret not in caplog.text


def test_models_and_balance(upstream: MockServer) -> None:
    """/models and /user/balance are served as DeepSeek shapes."""
    with Client(api_key="sk", base_url=upstream.url) as c:
        ids = [m.id for m in c.models.list()]
        balance = c.balance()
    assert "deepseek-chat" in ids
    assert balance["is_available"] is True


@pytest.mark.anyio
async def test_async_fallback_and_models(upstream: MockServer) -> None:
    """The async client falls back and lists models like the sync one."""
    routes = [faulty(upstream, "a", "reset after=4"), healthy(upstream)]
    async with AsyncClient(routes=routes, retry=FAST, breaker_threshold=1) as c:
        done = await c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        ids = [m.id for m in await c.models.list()]
        balance = await c.balance()
        events = [e.type async for e in c.chat.stream(model="deepseek-chat", messages=MESSAGES)]
    assert done.choices[0].message.content == content()
    assert done.unbroken is not None
    assert done.unbroken.route == "b"
    assert "deepseek-chat" in ids
    assert balance["is_available"] is True
    assert events[-1] == "done"


def test_same_chunks_as_the_official_sdk(upstream: MockServer) -> None:
    """On a healthy stream, unbroken and the official openai SDK see the same chunks; with
    include_usage, unbroken moves DeepSeek's usage (on the finish chunk) into OpenAI's own
    last chunk with no choices."""
    import openai

    official = openai.OpenAI(api_key="sk", base_url=upstream.url)
    ours = Client(api_key="sk", base_url=upstream.url)
    kwargs: dict[str, Any] = {
        "model": "deepseek-reasoner",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    theirs = [c.model_dump() for c in official.chat.completions.create(**kwargs)]
    mine = list(ours.chat.completions.create(**kwargs))
    official.close()
    ours.close()
    usage_chunk = mine.pop()
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert theirs[-1]["usage"] == {**theirs[-1]["usage"], **_usage(usage_chunk.usage)}
    assert len(theirs) == len(mine)
    assert len({a["id"] for a in theirs}) == len({b.id for b in mine}) == 1
    assert all(b.usage is None for b in mine)
    for a, b in zip(theirs, mine, strict=True):
        assert a["model"] == b.model
        assert a["object"] == b.object
        for x, y in zip(a["choices"], b.choices, strict=True):
            assert x["index"] == y.index
            assert x["finish_reason"] == y.finish_reason
            assert y.delta is not None
            assert x["delta"]["content"] == y.delta.content
            assert x["delta"].get("reasoning_content") == y.delta.reasoning_content
            assert x["delta"]["role"] == y.delta.role


def _usage(usage: unbroken.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def test_official_sdk_error_body_vs_ours(upstream: MockServer) -> None:
    """Both clients agree a 401 is an authentication failure."""
    response = httpx.post(
        f"{upstream.url}/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES},
        headers={"X-Mock-Fault": "401"},
    )
    assert response.status_code == 401
    with (
        Client(api_key="sk", base_url=upstream.url) as c,
        pytest.raises(unbroken.UpstreamStatusError) as info,
    ):
        c.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, extra_headers={"X-Mock-Fault": "401"}
        )
    assert info.value.kind == "authentication"
