"""The answer cache in Client and AsyncClient, against the mock DeepSeek over loopback:
serve-mode hits without an upstream request, degrade-mode stale answers when every attempt
fails, misses that raise the usual error, which answers are stored, TTL, and the memory,
SQLite and Redis backends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import unbroken
from unbroken import (
    AnswerCache,
    AsyncClient,
    CachedChunk,
    CacheEvent,
    Client,
    ConfigError,
    InternalServerError,
    RetryPolicy,
    TextEvent,
)
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.stores.cache import MemoryAnswerStore, SQLiteAnswerStore

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=17)
FAST = RetryPolicy(attempts=2, wait_initial_s=0.01, wait_max_s=0.02)
DOWN = {"X-Mock-Fault": "503"}  # every attempt answers 503: the upstream is down


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def n_requests(mock: MockServer) -> int:
    return int(mock.stats()["requests_total"])


def client(upstream: MockServer, cache: Any, **kwargs: Any) -> Client:
    return Client(api_key="sk-test", base_url=upstream.url, retry=FAST, cache=cache, **kwargs)


def content(chunks: list[unbroken.ChatCompletionChunk]) -> tuple[str, str]:
    deltas = [d for c in chunks if c.choices and (d := c.choices[0].delta) is not None]
    reasoning = "".join(d.reasoning_content or "" for d in deltas)
    return reasoning, "".join(d.content or "" for d in deltas)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each backend the tests run against."""
    if request.param == "memory":
        return MemoryAnswerStore()
    return SQLiteAnswerStore(tmp_path / "cache.db")


def test_serve_mode_replays_a_hit_with_reasoning_and_marks(
    upstream: MockServer, store: Any
) -> None:
    """The second deterministic request is answered from the cache: no upstream request,
    the same reasoning and text, each chunk marked `hit`, a cache event first and
    `unbroken.cache == "hit"` on the completion."""
    messages = ask("What does the pre-sale include?")
    cache = AnswerCache(store, serve=True)
    with client(upstream, cache) as c:
        first = list(
            c.chat.completions.create(
                model="deepseek-reasoner", messages=messages, temperature=0, stream=True
            )
        )
        before = n_requests(upstream)
        stream = c.chat.completions.create(
            model="deepseek-reasoner", messages=messages, temperature=0, stream=True
        )
        second = list(stream)
        answer = stream.final()
        events = list(c.chat.stream(model="deepseek-reasoner", messages=messages, temperature=0))
        assert n_requests(upstream) == before
    cache.close()
    expected = answer_text("deepseek-reasoner", messages, config=CONFIG)
    assert content(first) == content(second) == expected
    assert expected[0] != ""  # the reasoner reasons: reasoning_content survived the replay
    assert all(isinstance(c, CachedChunk) and c.unbroken is not None for c in second)
    assert {c.unbroken.cache for c in second if isinstance(c, CachedChunk) and c.unbroken} == {
        "hit"
    }
    assert not any(isinstance(c, CachedChunk) for c in first)
    assert answer.unbroken.cache == "hit"
    assert stream.response.headers["x-unbroken-cache"] == "hit"
    assert answer.choices[0].message.content == expected[1]
    assert answer.choices[0].message.reasoning_content == expected[0]
    assert isinstance(events[0], CacheEvent)
    assert events[0].status == "hit"
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == expected[1]


def test_a_paced_hit_keeps_the_typing_effect(upstream: MockServer) -> None:
    """With pace_s a streamed hit is spread out: the chunks come in 50 ms batches at the
    pace, so the whole replay takes at least the last batch's offset (a lower bound only:
    the test never depends on the machine being fast)."""
    messages = ask("Tell me about the shop's history.")
    pace_s = 0.01
    cache = AnswerCache(serve=True, pace_s=pace_s)
    with client(upstream, cache) as c:
        c.chat.completions.create(model="deepseek-chat", messages=messages, temperature=0)
        started = time.monotonic()
        chunks = list(
            c.chat.completions.create(
                model="deepseek-chat", messages=messages, temperature=0, stream=True
            )
        )
        elapsed = time.monotonic() - started
    cache.close()
    per_batch = int(0.05 / pace_s)  # frames due within one tick go together
    last_batch_at = (len(chunks) - 1) // per_batch * per_batch * pace_s
    assert all(isinstance(chunk, CachedChunk) for chunk in chunks)
    assert last_batch_at >= 0.2  # a long enough answer for the bound to mean something
    assert elapsed >= last_batch_at


def test_serve_mode_leaves_sampled_requests_to_the_upstream(upstream: MockServer) -> None:
    """A request above serve_max_temperature (or with no temperature: the API's 1) goes
    upstream even when its answer is cached."""
    messages = ask("Is shipping free?")
    with client(upstream, AnswerCache(serve=True)) as c:
        c.chat.completions.create(model="deepseek-chat", messages=messages)
        before = n_requests(upstream)
        answer = c.chat.completions.create(model="deepseek-chat", messages=messages)
        assert n_requests(upstream) == before + 1
    assert answer.unbroken.cache is None


def test_degrade_mode_answers_stale_when_the_upstream_is_down(
    upstream: MockServer, store: Any
) -> None:
    """With every attempt failing, a cached question is answered from the cache marked
    `stale` (chunks, event with the error, completion meta); an uncached one raises the
    usual error."""
    messages = ask("When does the pre-sale start?")
    cache = AnswerCache(store)  # degrade is on by default, serve off
    with client(upstream, cache) as c:
        fresh = c.chat.completions.create(model="deepseek-chat", messages=messages)
        assert fresh.unbroken.cache is None
        stream = c.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=DOWN
        )
        chunks = list(stream)
        events = list(c.chat.stream(model="deepseek-chat", messages=messages, extra_headers=DOWN))
        folded = c.chat.completions.create(
            model="deepseek-chat", messages=messages, extra_headers=DOWN
        )
        with pytest.raises(InternalServerError) as info:
            c.chat.completions.create(
                model="deepseek-chat", messages=ask("An uncached question"), extra_headers=DOWN
            )
    cache.close()
    assert content(chunks)[1] == fresh.choices[0].message.content != ""
    assert {c.unbroken.cache for c in chunks if isinstance(c, CachedChunk) and c.unbroken} == {
        "stale"
    }
    assert len([c for c in chunks if isinstance(c, CachedChunk)]) == len(chunks)
    assert stream.final().unbroken.cache == "stale"
    marks = [e for e in events if isinstance(e, CacheEvent)]
    assert len(marks) == 1
    assert marks[0].status == "stale"
    assert "503" in marks[0].error
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextEvent))
    assert events.index(marks[0]) < first_text  # announced before the stand-in's text
    assert folded.unbroken.cache == "stale"
    assert folded.choices[0].message.content == fresh.choices[0].message.content
    assert folded.unbroken.attempts  # the failed attempts are still reported
    assert info.value.status_code == 503


def test_only_stop_answers_are_stored(upstream: MockServer, store: Any) -> None:
    """An answer cut by max_tokens (`length`) is not stored: with the upstream down the
    same request raises; a caller's own error (400) is never covered by a stale answer."""
    messages = ask("Describe the jacket in detail.")
    cache = AnswerCache(store)
    with client(upstream, cache) as c:
        cut = c.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=3)
        assert cut.choices[0].finish_reason == "length"
        with pytest.raises(InternalServerError):
            c.chat.completions.create(
                model="deepseek-chat", messages=messages, max_tokens=3, extra_headers=DOWN
            )
        c.chat.completions.create(model="deepseek-chat", messages=messages)
        with pytest.raises(unbroken.BadRequestError):
            c.chat.completions.create(
                model="deepseek-chat",
                messages=messages,
                extra_headers={"X-Mock-Fault": "context_length"},
            )
    cache.close()


def test_tool_call_answers_are_stored_only_by_opt_in(upstream: MockServer) -> None:
    """A `tool_calls` answer is not stored by default, and is with store_tool_calls."""
    messages = ask("What's the weather like in Paris today?")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    for opt_in in (False, True):
        cache = AnswerCache(store_tool_calls=opt_in)
        with client(upstream, cache) as c:
            answer = c.chat.completions.create(
                model="deepseek-chat", messages=messages, tools=tools
            )
            assert answer.choices[0].finish_reason == "tool_calls"
            key = cache.key({"model": "deepseek-chat", "messages": messages, "tools": tools})
            assert (cache.get(key) is not None) is opt_in
        cache.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_entries_expire_after_ttl(upstream: MockServer, tmp_path: Path, backend: str) -> None:
    """An entry is kept for ttl_s: found just before, gone after (the store is asked with
    a later clock, so no test waits)."""
    spec = "memory" if backend == "memory" else f"sqlite:///{tmp_path / 'ttl.db'}"
    cache = AnswerCache(spec, ttl_s=60)
    messages = ask("How long does delivery take?")
    with client(upstream, cache) as c:
        c.chat.completions.create(model="deepseek-chat", messages=messages)
    key = cache.key({"model": "deepseek-chat", "messages": messages})
    now = time.time()

    async def look(offset: float) -> bytes | None:
        return await cache.store.get(key, now + offset)

    assert anyio.run(look, 59.0) is not None
    assert anyio.run(look, 61.0) is None
    cache.close()


def test_redis_backend_serves_hits(upstream: MockServer, redis_url: str) -> None:
    """A `redis://` spec works the same (the blocking client runs it on its own loop)."""
    messages = ask("Where is the shop?")
    cache = AnswerCache(redis_url, serve=True)
    try:
        with client(upstream, cache) as c:
            fresh = c.chat.completions.create(
                model="deepseek-chat", messages=messages, temperature=0
            )
            before = n_requests(upstream)
            hit = c.chat.completions.create(model="deepseek-chat", messages=messages, temperature=0)
            assert n_requests(upstream) == before
        assert hit.unbroken.cache == "hit"
        assert hit.choices[0].message.content == fresh.choices[0].message.content
    finally:
        cache.clear()
        cache.close()


@pytest.mark.anyio
async def test_async_client_hits_and_stale_answers(upstream: MockServer, tmp_path: Path) -> None:
    """AsyncClient: a spec string makes the cache (closed with the client); a serve hit and
    a stale stand-in behave as in the blocking client."""
    messages = ask("Can I return a gift?")
    async with AsyncClient(
        api_key="sk-test",
        base_url=upstream.url,
        retry=FAST,
        cache=f"sqlite:///{tmp_path / 'async.db'}",
    ) as c:
        fresh = await c.chat.completions.create(model="deepseek-chat", messages=messages)
        stream = await c.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=DOWN
        )
        chunks = [chunk async for chunk in stream]
        events = [
            e
            async for e in c.chat.stream(
                model="deepseek-chat", messages=messages, extra_headers=DOWN
            )
        ]
    assert content(chunks)[1] == fresh.choices[0].message.content
    assert all(isinstance(x, CachedChunk) for x in chunks)
    assert (await stream.final()).unbroken.cache == "stale"
    assert [e.status for e in events if isinstance(e, CacheEvent)] == ["stale"]

    cache = AnswerCache(serve=True)
    async with AsyncClient(api_key="sk-test", base_url=upstream.url, cache=cache) as c:
        await c.chat.completions.create(model="deepseek-chat", messages=messages, temperature=0)
        before = n_requests(upstream)
        hit = await c.chat.completions.create(
            model="deepseek-chat", messages=messages, temperature=0
        )
        assert n_requests(upstream) == before
    assert hit.unbroken.cache == "hit"
    await cache.aclose()


def test_bad_cache_options_are_typed_errors(upstream: MockServer) -> None:
    """A cache option of the wrong kind, an unknown spec, a bad TTL, or a cache given to a
    transport: a ConfigError naming what was wrong."""
    with pytest.raises(ConfigError, match="int"):
        Client(api_key="sk-test", base_url=upstream.url, cache=42)  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(ConfigError, match="ftp://x"):
        Client(api_key="sk-test", base_url=upstream.url, cache="ftp://x")
    with pytest.raises(ConfigError, match="ttl_s"):
        AnswerCache(ttl_s=0)
    with pytest.raises(ConfigError, match="pace_s"):
        AnswerCache(pace_s=-1)
    with pytest.raises(ConfigError, match="transports"):
        unbroken.HTTPTransport(cache="memory")


def test_a_backend_object_is_wrapped_with_the_defaults(
    upstream: MockServer, tmp_path: Path
) -> None:
    """`cache=` a backend of unbroken.stores.cache: degrade mode with the default TTL; the
    backend stays open for its owner when the client closes."""
    store = SQLiteAnswerStore(tmp_path / "owned.db")
    messages = ask("Do you ship abroad?")
    with client(upstream, store) as c:
        fresh = c.chat.completions.create(model="deepseek-chat", messages=messages)
        stale = c.chat.completions.create(
            model="deepseek-chat", messages=messages, extra_headers=DOWN
        )
    assert stale.unbroken.cache == "stale"
    assert stale.choices[0].message.content == fresh.choices[0].message.content
    key = AnswerCache.key({"model": "deepseek-chat", "messages": messages})

    async def still_open() -> bytes | None:
        try:
            return await store.get(key, time.time())
        finally:
            await store.aclose()

    assert anyio.run(still_open) is not None
