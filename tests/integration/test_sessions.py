"""Session stores (memory, SQLite, Redis) through one shared table of cases, and
ChatSession / AsyncChatSession against the mock DeepSeek."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from unbroken import AsyncClient, Client, RetryPolicy, TextEvent
from unbroken.errors import InvalidRequestError, StoreError
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.sessions import (
    AsyncChatSession,
    AsyncSessionStore,
    ChatSession,
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    SQLiteSessionStore,
    export_session,
    import_session,
)

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=9)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SessionStore]:
    """Each store kind, fresh."""
    kind = request.param
    made: SessionStore
    if kind == "memory":
        made = MemorySessionStore()
    elif kind == "sqlite":
        made = SQLiteSessionStore(tmp_path / "s.db")
    else:
        url = request.getfixturevalue("redis_url")
        made = RedisSessionStore(url, prefix=f"t{uuid.uuid4().hex}:")
    yield made
    made.close()


def test_store_round_trip(store: SessionStore) -> None:
    """create, append, load, update, list and delete behave the same in every store."""
    info = store.create(model="deepseek-chat", owner="k1")
    store.append(info.id, [{"role": "user", "content": "hello there"}])
    store.append(info.id, [{"role": "assistant", "content": "hi", "reasoning_content": "r"}])
    loaded, messages = store.load(info.id)
    assert [m["content"] for m in messages] == ["hello there", "hi"]
    assert messages[1]["reasoning_content"] == "r"
    assert loaded.title == "hello there"
    assert loaded.n_messages == 2
    assert loaded.owner == "k1"
    store.update(info.id, title="renamed", model="deepseek-reasoner")
    renamed, _ = store.load(info.id)
    assert (renamed.title, renamed.model) == ("renamed", "deepseek-reasoner")
    other = store.create(owner="k2")
    assert [i.id for i in store.list(owner="k1")] == [info.id]
    assert {i.id for i in store.list()} == {info.id, other.id}
    assert store.list()[0].id == other.id or store.list()[0].updated_s >= store.list()[1].updated_s
    assert store.delete(info.id)
    assert not store.delete(info.id)
    with pytest.raises(StoreError):
        store.load(info.id)
    with pytest.raises(StoreError):
        store.append(info.id, [{"role": "user", "content": "x"}])


def test_export_import(store: SessionStore) -> None:
    """A session exported as JSON imports as a new session with the same messages."""
    info = store.create(model="m")
    store.append(info.id, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    copy = import_session(store, export_session(store, info.id), owner="me")
    assert copy.id != info.id
    assert store.load(copy.id)[1] == store.load(info.id)[1]
    with pytest.raises(InvalidRequestError):
        import_session(store, b'{"nope": 1}')


def _writer(path: str, session_id: str, tag: str, n: int) -> None:
    db = SQLiteSessionStore(path)
    for i in range(n):
        db.append(
            session_id,
            [
                {"role": "user", "content": f"{tag}{i}"},
                {"role": "assistant", "content": f"{tag}{i}!"},
            ],
        )
    db.close()


def test_concurrent_sqlite_writers_lose_no_turn(tmp_path: Path) -> None:
    """Two processes appending to one session keep every turn, pairs never interleaved."""
    path = str(tmp_path / "shared.db")
    info = SQLiteSessionStore(path).create()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, info.id, tag, 40)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    _, messages = SQLiteSessionStore(path).load(info.id)
    assert len(messages) == 160
    for user, reply in zip(messages[::2], messages[1::2], strict=True):
        assert reply["content"] == user["content"] + "!"


def test_concurrent_redis_writers_lose_no_turn(redis_url: str) -> None:
    """Two writers (threads, separate clients) appending at once keep every turn."""
    import threading

    prefix = f"c{uuid.uuid4().hex}:"
    info = RedisSessionStore(redis_url, prefix=prefix).create()

    def write(tag: str) -> None:
        db = RedisSessionStore(redis_url, prefix=prefix)
        for i in range(50):
            db.append(
                info.id,
                [
                    {"role": "user", "content": f"{tag}{i}"},
                    {"role": "assistant", "content": f"{tag}{i}!"},
                ],
            )

    threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, messages = RedisSessionStore(redis_url, prefix=prefix).load(info.id)
    assert len(messages) == 200
    for user, reply in zip(messages[::2], messages[1::2], strict=True):
        assert reply["content"] == user["content"] + "!"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


def test_chat_session_remembers_and_persists(upstream: MockServer, tmp_path: Path) -> None:
    """send() streams, stores both turns; a reloaded session continues the conversation."""
    db = SQLiteSessionStore(tmp_path / "s.db")
    with Client(api_key="sk", base_url=upstream.url) as client:
        session = ChatSession(client, system="be brief", store=db)
        text = "".join(e.text for e in session.send("first question") if isinstance(e, TextEvent))
        expected = answer_text(
            "deepseek-chat",
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
            ],
            config=CONFIG,
        )[1]
        assert text == expected
        assert session.id is not None
        again = ChatSession.load(client, db, session.id)
        second = again.ask("second question")
    _, stored = db.load(session.id)
    assert [m["role"] for m in stored] == ["system", "user", "assistant", "user", "assistant"]
    assert stored[4]["content"] == second.choices[0].message.content
    history = [{"role": m["role"], "content": m["content"]} for m in stored[:4]]
    assert stored[4]["content"] == answer_text("deepseek-chat", history, config=CONFIG)[1]
    assert again.usage.total_tokens > 0


def test_failed_answer_stores_nothing(upstream: MockServer) -> None:
    """An answer that fails leaves no half turn in the session."""
    store = MemorySessionStore()
    with Client(api_key="sk", base_url=upstream.url, retry=RetryPolicy(attempts=1)) as client:
        session = ChatSession(client, store=store)
        with pytest.raises(Exception, match="401"):
            session.ask("hi", extra_headers={"X-Mock-Fault": "401"})
        assert session.messages == []
        session.ask("hi")
    assert session.id is not None
    assert [m["role"] for m in store.load(session.id)[1]] == ["user", "assistant"]


def test_tool_results_flow_through_a_session(upstream: MockServer) -> None:
    """A tool call is stored with its result, then the model answers using it."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with Client(api_key="sk", base_url=upstream.url) as client:
        session = ChatSession(client, tools=tools)
        done = session.ask("Use get_weather for Paris.")
        calls = done.choices[0].message.tool_calls
        assert calls
        for c in calls:
            session.add_tool_result(c.id, '{"temp": 21}')
        answer = session.ask(None)
    assert answer.choices[0].message.content
    roles = [m["role"] for m in session.messages]
    assert roles[:2] == ["user", "assistant"]
    assert roles.count("tool") == len(calls)
    assert roles[-1] == "assistant"


def test_long_session_is_trimmed_to_the_window(upstream: MockServer) -> None:
    """A session longer than its context sends only the newest turns (and the system)."""
    with Client(api_key="sk", base_url=upstream.url) as client:
        session = ChatSession(client, system="sys", context_tokens=1500, reserve_tokens=500)
        for i in range(12):
            session.ask(f"question {i} " + "pad " * 40)
        log = upstream.log(limit=1)[-1]
    assert session._h.dropped > 0
    assert len(session.messages) == 25
    assert log["status"] == 200
    # What was sent, as the mock saw it: at most the window less the reserve...
    assert log["prompt_tokens"] <= 1500 - 500
    # ...and, since the mock's answer is a function of the conversation it got, the last
    # answer names it: the system prompt and the newest messages, from a user turn on.
    *history, reply = session.messages
    sent = [
        k
        for k in range(1, len(history))
        if answer_text("deepseek-chat", [history[0], *history[-k:]], config=CONFIG)[1]
        == reply["content"]
    ]
    assert len(sent) == 1, sent
    assert history[-sent[0]]["role"] == "user"
    assert 1 < sent[0] < len(history) - 1  # some turns kept, older ones dropped


def _roles_and_contents(messages: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(m["role"], m["content"]) for m in messages]


def test_retry_replaces_the_last_answer(upstream: MockServer, tmp_path: Path) -> None:
    """retry() sends the last question without the old answer and replaces the old
    exchange in memory and in the store: the question stays once, the new answer follows."""
    db = SQLiteSessionStore(tmp_path / "r.db")
    with Client(api_key="sk", base_url=upstream.url) as client:
        session = ChatSession(client, store=db)
        first = session.ask("first question").choices[0].message.content
        old = session.ask("second question").choices[0].message.content
        asked = upstream.log(limit=1)[-1]
        history: list[dict[str, object]] = [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "second question"},
        ]
        # Another seed, so the mock's new answer differs from the old one; the mock's
        # answer is a function of the conversation it got, so it also names what was sent.
        text = "".join(e.text for e in session.retry(seed=4242) if isinstance(e, TextEvent))
        retried = upstream.log(limit=1)[-1]
    expected = answer_text("deepseek-chat", history, seed=4242, config=CONFIG)[1]
    assert text == expected != old
    assert retried["prompt_tokens"] == asked["prompt_tokens"]  # the same prompt, no old answer
    want = [*_roles_and_contents(history), ("assistant", expected)]
    assert _roles_and_contents(session.messages) == want
    assert session.id is not None
    info, stored = db.load(session.id)
    assert _roles_and_contents(stored) == want
    assert info.n_messages == 4
    assert [m["content"] for m in stored].count("second question") == 1


def test_retry_after_a_system_change_and_failures(upstream: MockServer) -> None:
    """A retry cuts the stored list at the same turn even when /system changed the memory
    only; a failed retry changes nothing; an empty session has nothing to retry."""
    store = MemorySessionStore()
    with Client(api_key="sk", base_url=upstream.url, retry=RetryPolicy(attempts=1)) as client:
        session = ChatSession(client, store=store)
        with pytest.raises(InvalidRequestError, match="nothing to retry"):
            session.retry()
        session.ask("a question")
        session.set_system("be brief")  # in memory only: one message more than stored
        before = session.messages
        with pytest.raises(Exception, match="401"):
            for _ in session.retry(extra_headers={"X-Mock-Fault": "401"}):
                pass
        assert session.messages == before
        again = session.retry(seed=99)
        for _ in again:
            pass
    assert session.id is not None
    _, stored = store.load(session.id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored == session.messages[1:]
    assert (
        stored[1]["content"]
        == answer_text(
            "deepseek-chat",
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a question"}],
            seed=99,
            config=CONFIG,
        )[1]
    )


@pytest.mark.anyio
async def test_async_session(upstream: MockServer, tmp_path: Path) -> None:
    """AsyncChatSession streams, stores and reloads like the sync one."""
    store = AsyncSessionStore(SQLiteSessionStore(tmp_path / "a.db"))
    async with AsyncClient(api_key="sk", base_url=upstream.url) as client:
        session = await AsyncChatSession.create(client, store, system="s")
        parts = [e.text async for e in session.send("hello") if isinstance(e, TextEvent)]
        assert "".join(parts) == session.messages[-1]["content"]
        assert session.id is not None
        again = await AsyncChatSession.load(client, store, session.id)
        await again.ask("more")
        retried = [e.text async for e in again.retry(seed=5) if isinstance(e, TextEvent)]
        await again.add_tool_result("x", "y")
    _, stored = await store.load(session.id)
    assert [m["role"] for m in stored] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
    ]
    assert [m["content"] for m in stored].count("more") == 1
    assert stored[4]["content"] == "".join(retried)
    assert len(await store.list()) == 1
    await store.aclose()


def test_bad_window_is_refused() -> None:
    """A reserve larger than the context is a typed error."""
    with (
        Client(api_key="sk", base_url="http://127.0.0.1:9") as client,
        pytest.raises(InvalidRequestError),
    ):
        ChatSession(client, context_tokens=100, reserve_tokens=200)
