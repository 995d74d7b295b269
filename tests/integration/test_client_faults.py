"""Client and AsyncClient against the mock DeepSeek over loopback: every fault the mock can
inject ends in the whole answer (byte-identical to the fault-free one) or in a typed error
that carries the partial answer; never a silent truncation, never a hang past the deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import unbroken
from tests.healing import assert_fault_fired, expected_requests
from unbroken import (
    AsyncClient,
    Client,
    RetryPolicy,
    Timeouts,
    UnbrokenError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Tell me about streams."}]
FAST_RETRY = RetryPolicy(attempts=6, wait_initial_s=0.01, wait_max_s=0.05)
TIMEOUTS = Timeouts(connect_s=5, headers_s=2, first_token_s=3, idle_s=0.4)


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=11)) as server:
        yield server


def expected(model: str = "deepseek-chat") -> tuple[str, str]:
    return answer_text(model, MESSAGES, config=MockConfig(seed=11))


def client(upstream: MockServer, **kwargs: Any) -> Client:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeouts", TIMEOUTS)
    return Client(api_key="sk-test", base_url=upstream.url, seed=1, **kwargs)


def aclient(upstream: MockServer, **kwargs: Any) -> AsyncClient:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeouts", TIMEOUTS)
    return AsyncClient(api_key="sk-test", base_url=upstream.url, seed=1, **kwargs)


# (fault spec, model) pairs that must end in the whole answer.
HEALING = [
    ("none", "deepseek-chat"),
    ("429 times=1", "deepseek-chat"),
    ("429 retry_after=0.05 times=2", "deepseek-chat"),
    ("500 times=1", "deepseek-chat"),
    ("502 times=1", "deepseek-chat"),
    ("503 times=2", "deepseek-chat"),
    ("503 body=json times=1", "deepseek-chat"),
    ("504 times=1", "deepseek-chat"),
    ("reset_before_headers times=2", "deepseek-chat"),
    ("slow_headers ms=100", "deepseek-chat"),
    ("hang times=1", "deepseek-chat"),
    ("reset after=1 times=1", "deepseek-chat"),
    ("reset after=6 times=2", "deepseek-chat"),
    ("reset after_bytes=700 times=1", "deepseek-chat"),
    ("close after=5 times=1", "deepseek-chat"),
    ("stall after=4 times=1", "deepseek-chat"),
    ("stall after=4 keepalive=1 times=1", "deepseek-chat"),
    ("malformed after=3 times=1", "deepseek-chat"),
    ("error after=5 times=1", "deepseek-chat"),
    ("insufficient after=5 times=1", "deepseek-chat"),
    ("no_done", "deepseek-chat"),
    ("json_body", "deepseek-chat"),
    ("json_body sse=1", "deepseek-chat"),
    ("keepalive_storm n=20", "deepseek-chat"),
    ("split_utf8", "deepseek-chat"),
    ("one_byte", "deepseek-chat"),
    ("crlf", "deepseek-chat"),
    ("cr", "deepseek-chat"),
    ("nospace", "deepseek-chat"),
    ("bom", "deepseek-chat"),
    ("crlf; reset after=7 times=1", "deepseek-chat"),
    ("reset after=3 times=1", "deepseek-reasoner"),
    ("reset after=40 times=1", "deepseek-reasoner"),
    ("stall after=20 keepalive=1 times=1", "deepseek-reasoner"),
    ("error after=60 times=1", "deepseek-reasoner"),
]


def _key(spec: str, model: str, flavour: str) -> dict[str, str]:
    # A fault key per test keeps `times=K` budgets from leaking between tests.
    return {"X-Mock-Fault": spec, "X-Mock-Fault-Key": f"{flavour}:{model}:{spec}"}


@pytest.mark.parametrize(("spec", "model"), HEALING)
def test_sync_fault_heals_into_the_whole_answer(
    upstream: MockServer, spec: str, model: str
) -> None:
    """Each healing fault ends with the answer byte-identical to the fault-free one."""
    reasoning, content = expected(model)
    mismatches = upstream.stats()["prefix_mismatches"]
    with client(upstream) as c:
        stream = c.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers=_key(spec, model, "sync")
        )
        texts, thoughts, roles, finishes = [], [], 0, []
        for chunk in stream:
            for choice in chunk.choices:
                delta = choice.delta
                if delta is not None:
                    texts.append(delta.content or "")
                    thoughts.append(delta.reasoning_content or "")
                    roles += delta.role is not None
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        final = stream.final()
    assert "".join(texts) == content
    assert "".join(thoughts) == reasoning
    assert roles == 1
    assert finishes == ["stop"]
    message = final.choices[0].message
    assert message.content == content
    assert (message.reasoning_content or "") == reasoning
    assert final.usage is not None
    assert final.usage.completion_tokens > 0
    assert final.unbroken is not None
    assert final.unbroken.attempts[-1].outcome == "complete"
    # The fault fired (the mock says so) and was healed by the retries it needed.
    assert len(final.unbroken.attempts) == expected_requests(spec)
    assert_fault_fired(upstream, _key(spec, model, "sync")["X-Mock-Fault-Key"], spec, mismatches)


@pytest.mark.anyio
@pytest.mark.parametrize(("spec", "model"), HEALING)
async def test_async_fault_heals_into_the_whole_answer(
    upstream: MockServer, spec: str, model: str
) -> None:
    """The async client heals every fault into the same whole answer."""
    reasoning, content = expected(model)
    mismatches = upstream.stats()["prefix_mismatches"]
    async with aclient(upstream) as c:
        stream = await c.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers=_key(spec, model, "async")
        )
        texts: list[str] = []
        async for chunk in stream:
            texts.extend(ch.delta.content or "" for ch in chunk.choices if ch.delta is not None)
        final = await stream.final()
    assert "".join(texts) == content
    assert final.choices[0].message.content == content
    assert (final.choices[0].message.reasoning_content or "") == reasoning
    assert final.unbroken is not None
    assert len(final.unbroken.attempts) == expected_requests(spec)
    key = _key(spec, model, "async")["X-Mock-Fault-Key"]
    await anyio.to_thread.run_sync(assert_fault_fired, upstream, key, spec, mismatches)


# Faults that must end in a typed error (no route can help), with what arrived attached.
FAILING = [
    ("400", UpstreamStatusError, 400),
    ("401", UpstreamStatusError, 401),
    ("402", UpstreamStatusError, 402),
    ("422", UpstreamStatusError, 422),
    ("context_length", UpstreamStatusError, 400),
    ("content_filter", UpstreamStatusError, 400),
]


@pytest.mark.parametrize(("spec", "error_type", "status"), FAILING)
def test_non_retryable_errors_fail_at_once(
    upstream: MockServer, spec: str, error_type: type[UnbrokenError], status: int
) -> None:
    """400/401/402/422 are never retried: one attempt, a typed error with the status."""
    with client(upstream) as c, pytest.raises(error_type) as info:
        c.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, extra_headers=_key(spec, "x", "fail")
        )
    assert isinstance(info.value, UpstreamStatusError)
    assert info.value.status_code == status
    assert "sk-test" not in str(info.value)


def test_persistent_reset_ends_in_error_with_partial(upstream: MockServer) -> None:
    """A stream that keeps breaking gives up after the cap, carrying every char shown."""
    _, content = expected()
    policy = RetryPolicy(attempts=4, max_resumes=2, wait_initial_s=0.01, wait_max_s=0.02)
    shown: list[str] = []
    with client(upstream, retry=policy) as c:
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers=_key("reset after=3", "x", "persist"),
        )
        with pytest.raises(unbroken.RetriesExhausted) as info:
            for chunk in stream:
                shown.extend(ch.delta.content or "" for ch in chunk.choices if ch.delta)
    partial = info.value.partial
    assert partial is not None
    assert partial.choices[0].message.content == "".join(shown)
    assert content.startswith("".join(shown))
    assert len("".join(shown)) > 0
    assert isinstance(info.value.__cause__, unbroken.UpstreamTruncated)


def test_deadline_bounds_a_hanging_upstream(upstream: MockServer) -> None:
    """An upstream that never answers cannot hold the caller past its `deadline`."""
    start = time.monotonic()
    with (
        client(upstream, timeouts=Timeouts(headers_s=30)) as c,
        pytest.raises(UpstreamTimeout) as info,
    ):
        c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_headers=_key("hang", "x", "deadline"),
            deadline=0.5,
        )
    assert info.value.phase == "deadline"
    assert time.monotonic() - start < 3.0


def test_idle_timeout_ignores_keepalives(upstream: MockServer) -> None:
    """A stall that keeps sending keep-alive comments still trips the idle timer."""
    with client(upstream, retry=RetryPolicy(attempts=1)) as c:
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers=_key("stall after=3 keepalive=1", "x", "idle"),
        )
        with pytest.raises(UpstreamTimeout) as info:
            for _ in stream:
                pass
    assert info.value.phase == "idle"
    assert info.value.partial is not None


def test_first_token_timeout_while_queued(upstream: MockServer) -> None:
    """Keep-alives while queued do not count as the first token."""
    with (
        client(
            upstream,
            retry=RetryPolicy(attempts=1),
            timeouts=Timeouts(first_token_s=0.3, idle_s=10),
        ) as c,
        pytest.raises(UpstreamTimeout) as info,
    ):
        c.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, extra_headers={"X-Mock-Queue-Ms": "5000"}
        )
    assert info.value.phase == "first_token"


@pytest.mark.anyio
async def test_async_first_token_and_headers_timeouts(upstream: MockServer) -> None:
    """The async client's timers fire by phase too."""
    async with aclient(
        upstream, retry=RetryPolicy(attempts=1), timeouts=Timeouts(headers_s=0.3, first_token_s=0.3)
    ) as c:
        with pytest.raises(UpstreamTimeout) as info:
            await c.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, extra_headers={"X-Mock-Queue-Ms": "5000"}
            )
        assert info.value.phase == "first_token"
        with pytest.raises(UpstreamTimeout) as info:
            await c.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, extra_headers=_key("hang", "x", "ah")
            )
        assert info.value.phase == "headers"


def test_blank_json_answer_is_asked_again(upstream: MockServer) -> None:
    """JSON mode answering only spaces is retried; the consumer gets one finish and the
    text parses as the JSON of the clean answer."""
    import json

    messages = [{"role": "user", "content": "Give me json with a name, as a json object."}]
    with client(upstream) as c:
        clean = c.chat.completions.create(
            model="deepseek-chat", messages=messages, response_format={"type": "json_object"}
        )
        stream = c.chat.completions.create(
            model="deepseek-chat",
            messages=messages,
            response_format={"type": "json_object"},
            stream=True,
            extra_headers=_key("json_blank times=1", "x", "blank"),
        )
        finishes = [
            ch.finish_reason for chunk in stream for ch in chunk.choices if ch.finish_reason
        ]
        final = stream.final()
    text = final.choices[0].message.content or ""
    assert finishes == ["stop"]
    assert json.loads(text) == json.loads(clean.choices[0].message.content or "")
    assert [a.outcome for a in final.unbroken.attempts] == ["error", "complete"]
