"""The answer cache: one table of cases against the memory, SQLite and Redis backends, and
the gateway's serve and degrade modes against a real mock DeepSeek over loopback."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import CacheSettings, GatewaySettings, Settings
from unbroken.stores.cache import (
    AnswerStore,
    MemoryAnswerStore,
    RedisAnswerStore,
    SQLiteAnswerStore,
    open_answer_store,
)

pytestmark = pytest.mark.integration

# -- backends: one table of cases ------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def answer_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AnswerStore]:
    store: AnswerStore
    if request.param == "memory":
        store = MemoryAnswerStore()
    elif request.param == "sqlite":
        store = open_answer_store(f"sqlite:///{tmp_path / 'cache.db'}")
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisAnswerStore.from_url(url, prefix=f"test:{tmp_path.name}:")
    try:
        yield store
    finally:
        await store.delete()
        await store.aclose()


@pytest.mark.anyio
async def test_store_get_put_expire_delete(answer_store: AnswerStore) -> None:
    """A value is there until its TTL, replaced by a new put, and gone once deleted."""
    now = 1_000.0
    assert await answer_store.get("k", now) is None
    await answer_store.put("k", b"\x00first", now, ttl_s=60.0)
    await answer_store.put("other", b"x", now, ttl_s=60.0)
    assert await answer_store.get("k", now + 1) == b"\x00first"
    await answer_store.put("k", b"second", now, ttl_s=60.0)
    assert await answer_store.get("k", now + 1) == b"second"
    assert await answer_store.delete("k") == 1
    assert await answer_store.get("k", now + 1) is None
    assert await answer_store.delete("absent") == 0
    assert await answer_store.delete() == 1
    assert await answer_store.get("other", now + 1) is None


@pytest.mark.anyio
async def test_store_delete_model_forgets_only_that_models_entries(
    answer_store: AnswerStore,
) -> None:
    """delete_model removes the entries tagged with that model (and counts them), leaves
    the others, and finds nothing the second time."""
    now = 1_000.0
    await answer_store.put("a1", b"x", now, 60.0, model="deepseek-chat")
    await answer_store.put("a2", b"y", now, 60.0, model="deepseek-chat")
    await answer_store.put("b1", b"z", now, 60.0, model="deepseek-reasoner")
    await answer_store.put("u", b"w", now, 60.0)
    assert await answer_store.delete_model("deepseek-chat") == 2
    assert await answer_store.get("a1", now + 1) is None
    assert await answer_store.get("a2", now + 1) is None
    assert await answer_store.get("b1", now + 1) == b"z"
    assert await answer_store.get("u", now + 1) == b"w"
    assert await answer_store.delete_model("deepseek-chat") == 0
    assert await answer_store.delete() == 2


@pytest.mark.anyio
async def test_store_expiry(answer_store: AnswerStore) -> None:
    """An entry past its TTL is a miss (Redis expires it itself, so its TTL is real time)."""
    if isinstance(answer_store, RedisAnswerStore):
        import anyio

        await answer_store.put("k", b"v", 0.0, ttl_s=0.05)
        await anyio.sleep(0.2)  # real expiry inside Redis: nothing else to wait on
        assert await answer_store.get("k", 0.0) is None
        return
    await answer_store.put("k", b"v", 1_000.0, ttl_s=10.0)
    assert await answer_store.get("k", 1_009.9) == b"v"
    assert await answer_store.get("k", 1_010.0) is None


@pytest.mark.anyio
async def test_memory_store_is_bounded_least_recently_used_first() -> None:
    """Past max_bytes the least recently used entry goes; a value bigger than the bound is
    not stored at all."""
    store = MemoryAnswerStore(max_bytes=10)
    await store.put("a", b"aaaa", 0.0, 60.0)
    await store.put("b", b"bbbb", 0.0, 60.0)
    assert await store.get("a", 1.0) == b"aaaa"  # a is now the most recently used
    await store.put("c", b"cccc", 0.0, 60.0)
    assert await store.get("b", 1.0) is None
    assert await store.get("a", 1.0) == b"aaaa"
    await store.put("huge", b"x" * 11, 0.0, 60.0)
    assert await store.get("huge", 1.0) is None
    assert "entries=2" in repr(store)


def test_open_answer_store_refuses_unknown_specs(tmp_path: Path) -> None:
    """An unknown backend is a ConfigError naming the value and the accepted forms."""
    from unbroken.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'ftp://x'.*memory"):
        open_answer_store("ftp://x")
    assert isinstance(open_answer_store(str(tmp_path / "c.sqlite")), SQLiteAnswerStore)


# -- the gateway -----------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "When does the pre-sale start?"}]


def gateway_settings(url: str, **cache: Any) -> Settings:
    options: dict[str, Any] = {"store": "memory", "pace_s": 0.001}
    options.update(cache)
    return Settings(
        api_key="sk-test",
        base_url=url,
        gateway=GatewaySettings(
            retry_attempts=2,
            retry_wait_initial_s=0.01,
            retry_wait_max_s=0.02,
            headers_s=2.0,
            first_token_s=2.0,
            idle_s=1.0,
            cache=CacheSettings(**options),
        ),
    )


@contextmanager
def gateway(settings: Settings) -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20.0) as client,
    ):
        yield client


def sse(response: httpx.Response) -> tuple[list[str], list[dict[str, Any]]]:
    """The comments and chunks of an SSE body (a fresh stream's `id:` lines and its
    stream-log final event, which a cache replay does not have, left out)."""
    comments, chunks = [], []
    for block in response.text.split("\n\n"):
        if block.startswith("id: "):
            block = block.split("\n", 1)[1]
        if block.startswith(":"):
            comments.append(block)
        elif block.startswith("data: ") and block != "data: [DONE]":
            chunk = json.loads(block[6:])
            if "stream_id" not in chunk.get("unbroken", {}):
                chunks.append(chunk)
    assert response.text.endswith("data: [DONE]\n\n")
    return comments, chunks


def text(chunks: list[dict[str, Any]], field: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


def chat_requests(mock: MockServer) -> int:
    return sum(
        n
        for path, by_status in mock.stats()["requests"].items()
        if "chat" in path
        for n in by_status.values()
    )


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=5)) as server:
        yield server


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_serve_mode_hit_replays_the_stream_marked_without_upstream(
    mock: MockServer, model: str
) -> None:
    """A second identical temperature-0 request is replayed chunk by chunk from the cache,
    marked as a hit in the header, the chunks and a comment, reasoning included, and the
    upstream is not called."""
    body = {"model": model, "messages": QUESTION, "stream": True, "temperature": 0}
    with gateway(gateway_settings(mock.url, serve_models=(model,))) as api:
        first = api.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        assert "x-unbroken-cache" not in first.headers
        _, fresh = sse(first)
        before = chat_requests(mock)
        second = api.post("/v1/chat/completions", json=body)
        assert chat_requests(mock) == before
        comments, replayed = sse(second)
    assert second.headers["x-unbroken-cache"] == "hit"
    assert any(c.startswith(": unbroken cache=hit") for c in comments)
    assert len(replayed) == len(fresh) > 5
    assert all(c.pop("unbroken") == {"cache": "hit"} for c in replayed)
    assert replayed == fresh
    assert text(replayed) == text(fresh) != ""
    if model == "deepseek-reasoner":
        assert text(replayed, "reasoning_content") != ""


def test_serve_mode_skips_warm_requests_and_unfinished_answers(mock: MockServer) -> None:
    """Serve mode answers only at or below serve_max_temperature, and an answer cut by
    max_tokens (finish `length`) is never stored."""
    warm = {"model": "deepseek-chat", "messages": QUESTION, "stream": True, "temperature": 0.7}
    short = {"model": "deepseek-chat", "messages": QUESTION, "temperature": 0, "max_tokens": 3}
    with gateway(gateway_settings(mock.url, serve_models=("deepseek-chat",))) as api:
        for body in (warm, short):
            before = chat_requests(mock)
            for _ in range(2):
                response = api.post("/v1/chat/completions", json=body)
                assert response.status_code == 200
                assert "x-unbroken-cache" not in response.headers
            assert chat_requests(mock) == before + 2
        assert response.json()["choices"][0]["finish_reason"] == "length"


def test_non_stream_hit_is_one_marked_completion(mock: MockServer) -> None:
    """A non-streaming request served from the cache gets the folded completion, marked."""
    body = {"model": "deepseek-chat", "messages": QUESTION, "temperature": 0}
    with gateway(gateway_settings(mock.url, serve_keys=("anonymous",))) as api:
        fresh = api.post("/v1/chat/completions", json=body).json()
        hit = api.post("/v1/chat/completions", json=body)
    assert hit.headers["x-unbroken-cache"] == "hit"
    data = hit.json()
    assert data.pop("unbroken") == {"cache": "hit"}
    assert data["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


def test_degrade_serves_stale_while_the_upstream_is_down_and_503_otherwise() -> None:
    """With the upstream gone, a cached question is replayed marked stale without waiting
    for the upstream, and an uncached one gets 503 with Retry-After."""
    upstream = MockServer(MockConfig(seed=9))
    upstream.start()
    asked = {"model": "deepseek-chat", "messages": QUESTION, "stream": True}
    other = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Refunds?"}]}
    settings = gateway_settings(upstream.url, degrade_after_failures=1, probe_after_s=30.0)
    with gateway(settings) as api:
        _, fresh = sse(api.post("/v1/chat/completions", json=asked))
        upstream.stop()
        # The first failure is found the slow way (the retry policy runs out)...
        failed = api.post("/v1/chat/completions", json=other)
        assert failed.status_code == 503
        assert failed.headers["retry-after"] == "30"
        assert failed.json()["error"]["code"] == "upstream_unavailable"
        # ...after which the breaker is open: no upstream attempt, at once.
        stale = api.post("/v1/chat/completions", json=asked)
        again = api.post("/v1/chat/completions", json=other)
        metrics = api.get("/metrics").text
    assert stale.status_code == 200
    assert stale.headers["x-unbroken-cache"] == "stale"
    comments, replayed = sse(stale)
    assert any(c.startswith(": unbroken cache=stale") for c in comments)
    assert all(c.pop("unbroken") == {"cache": "stale"} for c in replayed)
    assert replayed == fresh
    assert again.status_code == 503
    assert 'unbroken_gateway_cache_lookups_total{result="stale"} 1.0' in metrics


def test_degrade_stands_in_on_the_failing_request_itself() -> None:
    """A cached request whose own upstream call fails before any output is answered stale
    (the breaker still closed: threshold 3)."""
    upstream = MockServer(MockConfig(seed=11))
    upstream.start()
    asked = {"model": "deepseek-chat", "messages": QUESTION}
    with gateway(gateway_settings(upstream.url, degrade_after_failures=3)) as api:
        fresh = api.post("/v1/chat/completions", json=asked).json()
        upstream.stop()
        stale = api.post("/v1/chat/completions", json=asked)
    assert stale.headers["x-unbroken-cache"] == "stale"
    data = stale.json()
    assert data["unbroken"] == {"cache": "stale"}
    assert data["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


def test_cache_settings_from_toml_and_env(tmp_path: Path) -> None:
    """[gateway.cache] and UNBROKEN_GATEWAY_CACHE_* build CacheSettings; bad values name
    themselves."""
    from unbroken.errors import ConfigError

    config = tmp_path / "unbroken.toml"
    config.write_text('[gateway.cache]\nstore = "memory"\nserve_models = ["deepseek-chat"]\n')
    settings = Settings.load(config, environ={"UNBROKEN_GATEWAY_CACHE_PACE_S": "0"})
    assert settings.gateway.cache.enabled
    assert settings.gateway.cache.serve_models == ("deepseek-chat",)
    assert settings.gateway.cache.pace_s == 0.0
    with pytest.raises(ConfigError, match="UNBROKEN_GATEWAY_CACHE_TTL_S"):
        Settings.load(config, environ={"UNBROKEN_GATEWAY_CACHE_TTL_S": "soon"})
    config.write_text("[gateway.cache]\nttl = 5\n")
    with pytest.raises(ConfigError, match="ttl"):
        Settings.load(config, environ={})
    with pytest.raises(ConfigError, match="pace_s"):
        CacheSettings(pace_s=-1)
    with pytest.raises(ConfigError, match="ttl_s"):
        CacheSettings(ttl_s=0)


def test_paced_hits_share_one_tick_and_keep_the_typing_effect(mock: MockServer) -> None:
    """Two hits replayed at the same time at 20 ms a chunk: each arrives whole and equal to
    the fresh answer, spread over about its chunks' time (never early: the last chunk is
    due at (n-1) x pace), in several writes rather than one."""
    body = {"model": "deepseek-chat", "messages": QUESTION, "stream": True, "temperature": 0}
    pace_s = 0.02
    settings = gateway_settings(mock.url, serve_models=("deepseek-chat",), pace_s=pace_s)

    def replay(api: httpx.Client) -> tuple[str, float, int]:
        started = time.perf_counter()
        reads = 0
        with api.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["x-unbroken-cache"] == "hit"
            text = ""
            for piece in response.iter_text():
                reads += 1
                text += piece
        return text, time.perf_counter() - started, reads

    with gateway(settings) as api:
        _, fresh = sse(api.post("/v1/chat/completions", json=body))
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: replay(api), range(2)))
    n_events = len(fresh) + 1  # the chunks and [DONE]
    for text, elapsed_s, reads in results:
        chunks = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
        assert [c.pop("unbroken") for c in chunks] == [{"cache": "hit"}] * len(fresh)
        assert chunks == fresh
        assert elapsed_s >= (n_events - 1) * pace_s
        assert reads >= 3


def test_a_client_that_leaves_ends_its_paced_replay(mock: MockServer) -> None:
    """A paced hit whose client closes the connection after the first piece stops at the
    next tick, not when its whole pace has run out (seconds later)."""
    body = {"model": "deepseek-chat", "messages": QUESTION, "stream": True, "temperature": 0}
    settings = gateway_settings(mock.url, serve_models=("deepseek-chat",), pace_s=0.1)
    app = create_app(settings)
    cache = app.cache
    assert cache is not None
    with (
        ServerThread(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20.0) as api,
    ):
        _, fresh = sse(api.post("/v1/chat/completions", json=body))
        assert len(fresh) > 20  # a replay of 2 s and more at 0.1 s a chunk
        with api.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["x-unbroken-cache"] == "hit"
            next(response.iter_raw())
            assert eventually(lambda: cache.n_replaying == 1)
        assert eventually(lambda: cache.n_replaying == 0)


def eventually(condition: Callable[[], bool], within_s: float = 1.0) -> bool:
    """Whether `condition` (state of the gateway's thread) holds within `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # polling another thread's state, bounded by the deadline
    return True
