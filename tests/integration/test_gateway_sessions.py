"""Gateway session endpoints over loopback: create, post a message (streamed and not; both
turns stored), read, list, delete, per-key ownership, a broken upstream mid-answer, and bad
input. Sessions in memory and in SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import read_stream
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text
from unbroken.settings import GatewaySettings, KeySettings, RouteSettings, Settings, hash_key

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=31)
ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MOCK) as server:
        yield server


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def gateway(
    request: pytest.FixtureRequest, upstream: MockServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    sessions = (
        "memory" if request.param == "memory" else f"sqlite:{tmp_path_factory.mktemp('s')}/g.db"
    )
    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(
            sessions=sessions,
            sessions_per_minute=1000,
            keys=(KeySettings("alice", hash_key(ALICE)), KeySettings("bob", hash_key(BOB))),
            forward_headers=("x-mock-*",),
            retry_wait_initial_s=0.01,
            retry_wait_max_s=0.02,
        ),
    )
    with ServerThread(create_app(settings), lifespan="on") as server:
        yield server


def client(gateway: ServerThread, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=20.0
    )


def test_session_round_trip(gateway: ServerThread) -> None:
    """Create with a system prompt, talk twice (stream, then JSON), read it back whole."""
    with client(gateway, ALICE) as api:
        created = api.post("/v1/sessions", json={"system": "be brief", "title": "demo"})
        assert created.status_code == 201
        session = created.json()
        sid = session["id"]
        assert (session["model"], session["n_messages"], session["title"]) == (
            "deepseek-chat",
            1,
            "demo",
        )
        first = read_stream(api, {"content": "hello"}, path=f"/v1/sessions/{sid}/messages")
        expected = answer_text(
            "deepseek-chat",
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            config=MOCK,
        )[1]
        assert first.accumulator.content() == expected
        second = api.post(f"/v1/sessions/{sid}/messages", json={"content": "more", "stream": False})
        assert second.status_code == 200
        reply = second.json()["choices"][0]["message"]["content"]
        history = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": expected},
            {"role": "user", "content": "more"},
        ]
        assert reply == answer_text("deepseek-chat", history, config=MOCK)[1]
        got = api.get(f"/v1/sessions/{sid}").json()
        assert [m["role"] for m in got["messages"]] == [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        assert got["messages"][-1]["content"] == reply
        listed = api.get("/v1/sessions").json()["data"]
        assert sid in [s["id"] for s in listed]
        assert api.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
        assert api.get(f"/v1/sessions/{sid}").status_code == 404


def test_other_keys_cannot_see_a_session(gateway: ServerThread) -> None:
    """Bob gets 404 for Alice's session (read, post, delete) and never sees it listed."""
    with client(gateway, ALICE) as alice, client(gateway, BOB) as bob:
        sid = alice.post("/v1/sessions", json={}).json()["id"]
        for response in (
            bob.get(f"/v1/sessions/{sid}"),
            bob.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}),
            bob.delete(f"/v1/sessions/{sid}"),
        ):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "session_not_found"
        assert sid not in [s["id"] for s in bob.get("/v1/sessions").json()["data"]]
        assert alice.get(f"/v1/sessions/{sid}").status_code == 200
    with httpx.Client(base_url=gateway.url) as anonymous:
        assert anonymous.get("/v1/sessions").status_code == 401


def test_broken_upstream_still_stores_one_whole_turn(gateway: ServerThread) -> None:
    """An upstream reset mid-answer is resumed; the session stores the whole answer once."""
    with client(gateway, ALICE) as api:
        sid = api.post("/v1/sessions", json={}).json()["id"]
        read = read_stream(
            api,
            {"content": "tell me"},
            path=f"/v1/sessions/{sid}/messages",
            headers={"X-Mock-Fault": "reset after=5 times=1", "X-Mock-Fault-Key": sid},
        )
        expected = answer_text(
            "deepseek-chat", [{"role": "user", "content": "tell me"}], config=MOCK
        )[1]
        assert read.accumulator.content() == expected
        messages = api.get(f"/v1/sessions/{sid}").json()["messages"]
    assert messages == [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": expected},
    ]


def test_failed_answer_stores_nothing(gateway: ServerThread) -> None:
    """An answer that fails (401 upstream) leaves the session as it was."""
    with client(gateway, ALICE) as api:
        sid = api.post("/v1/sessions", json={}).json()["id"]
        response = api.post(
            f"/v1/sessions/{sid}/messages",
            json={"content": "x", "stream": False},
            headers={"X-Mock-Fault": "401"},
        )
        assert response.status_code >= 400
        assert api.get(f"/v1/sessions/{sid}").json()["messages"] == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/sessions", {"model": "nope"}, 400, "model_not_found"),
        # An empty name is a name no model has, not the default (which is asked by leaving
        # the model out, or null).
        ("POST", "/v1/sessions", {"model": ""}, 400, "model_not_found"),
        ("POST", "/v1/sessions", {"colour": "red"}, 400, "invalid_body"),
        ("POST", "/v1/sessions/{sid}/messages", {"content": ""}, 400, "invalid_value"),
        # Under the session's path a 404 would say the session is gone.
        (
            "POST",
            "/v1/sessions/{sid}/messages",
            {"content": "x", "model": "nope"},
            400,
            "model_not_found",
        ),
        ("POST", "/v1/sessions/{sid}/messages", {"content": 3}, 400, "invalid_value"),
        (
            "POST",
            "/v1/sessions/{sid}/messages",
            {"content": "x", "messages": []},
            400,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/sessions/{sid}/messages",
            {"content": "x", "temperature": 9},
            400,
            "invalid_value",
        ),
        ("PUT", "/v1/sessions", None, 405, "method_not_allowed"),
        ("GET", "/v1/sessions/{sid}/messages", None, 405, "method_not_allowed"),
        ("GET", "/v1/sessions/{sid}/other", None, 404, "not_found"),
        ("GET", "/v1/sessions/{sid}?after=%C2%B3", None, 400, "invalid_value"),
    ],
)
def test_bad_session_requests(
    gateway: ServerThread, method: str, path: str, body: Any, status: int, code: str
) -> None:
    """Malformed session requests get an OpenAI-shaped 4xx naming the problem."""
    with client(gateway, ALICE) as api:
        sid = api.post("/v1/sessions", json={}).json()["id"]
        response = api.request(method, path.format(sid=sid), json=body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    with client(gateway, ALICE) as api:
        raw = api.post(f"/v1/sessions/{sid}/messages", content=b"{not json")
    assert raw.status_code == 400


def test_default_sqlite_lives_in_the_data_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sessions = "sqlite"` puts the database under XDG_DATA_HOME."""
    from unbroken.gateway.sessions import open_session_store

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = open_session_store("sqlite")
    store.store.close()
    assert (tmp_path / "unbroken" / "sessions.db").exists()


def test_history_is_trimmed_to_the_serving_route_context(upstream: MockServer) -> None:
    """Two routes: the first (the one that serves) has a 2,048-token window, so every turn's
    prompt, as the mock counts it, stays inside it while the whole history grows past it;
    its turns calibrate that route. The 128K default would send everything."""
    settings = Settings(
        gateway=GatewaySettings(
            routes=(
                RouteSettings("small", upstream.url, "sk-up", context_tokens=2048),
                RouteSettings("big", upstream.url, "sk-up"),
            ),
        ),
    )
    app = create_app(settings)
    words = " ".join(f"word{i}" for i in range(300))  # ~ 600+ tokens a turn
    with (
        ServerThread(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20.0) as api,
    ):
        sid = api.post("/v1/sessions", json={}).json()["id"]
        for turn in range(5):
            reply = api.post(
                f"/v1/sessions/{sid}/messages",
                json={"content": f"{turn} {words}", "stream": False, "max_tokens": 200},
                headers={"X-Request-ID": f"trim-{sid}-{turn}"},
            )
            assert reply.status_code == 200, reply.text
        stored = api.get(f"/v1/sessions/{sid}").json()["messages"]
    log = httpx.get(f"{upstream.url}/_mock/log", params={"limit": 1000}).json()["entries"]
    prompts = [e["prompt_tokens"] for e in log if e["prompt_tokens"] is not None][-5:]
    assert len(stored) == 10
    assert max(prompts) <= 2048 - 200, prompts
    # The later turns were trimmed: the whole history would exceed the window.
    assert sum(len(m["content"]) for m in stored) // 4 > 2048
    assert "small" in app.sessions.calibrations
