"""Bounds of the sessions API on a real gateway: per-key session count and creation rate,
per-session size, paged lists (sessions and messages), deep JSON refused with a 400."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, Settings, hash_key

pytestmark = pytest.mark.integration

KEY = "sk-sessions-limits-0123456789"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=8, answer_tokens=(5, 8))) as server:
        yield server


def gateway(url: str, **options: Any) -> ServerThread:
    settings = Settings(
        api_key="sk-up",
        base_url=url,
        gateway=GatewaySettings(keys=(KeySettings("k", hash_key(KEY)),), **options),
    )
    return ServerThread(create_app(settings), lifespan="on")


def client(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=20)


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def test_a_key_holds_at_most_sessions_per_key(upstream: MockServer) -> None:
    """The session past the per-key count is a 429; deleting one makes room."""
    with (
        gateway(upstream.url, sessions_per_key=3, sessions_per_minute=100) as server,
        client(server) as http,
    ):
        ids = [http.post("/v1/sessions", json={}).json()["id"] for _ in range(3)]
        refused = http.post("/v1/sessions", json={})
        assert refused.status_code == 429
        assert code(refused) == "session_limit_exceeded"
        assert http.delete(f"/v1/sessions/{ids[0]}").status_code == 200
        assert http.post("/v1/sessions", json={}).status_code == 201


def test_session_creation_is_rate_limited(upstream: MockServer) -> None:
    """Past sessions_per_minute, creation is a 429 with Retry-After."""
    with gateway(upstream.url, sessions_per_minute=2) as server, client(server) as http:
        assert [http.post("/v1/sessions", json={}).status_code for _ in range(2)] == [201, 201]
        refused = http.post("/v1/sessions", json={})
        assert refused.status_code == 429
        assert code(refused) == "session_rate_exceeded"
        assert int(refused.headers["retry-after"]) >= 1


def test_a_session_cannot_grow_past_its_bounds(upstream: MockServer) -> None:
    """A turn that would pass session_max_bytes or session_max_messages is a 413 and
    nothing is stored."""
    with (
        gateway(upstream.url, session_max_bytes=3000, session_max_messages=5) as server,
        client(server) as http,
    ):
        sid = http.post("/v1/sessions", json={}).json()["id"]
        posted = http.post(
            f"/v1/sessions/{sid}/messages", json={"content": "a" * 1000, "stream": False}
        )
        assert posted.status_code == 200, posted.text
        too_big = http.post(f"/v1/sessions/{sid}/messages", json={"content": "b" * 2500})
        assert too_big.status_code == 413
        assert code(too_big) == "session_too_large"
        assert (
            http.post(
                f"/v1/sessions/{sid}/messages", json={"content": "c", "stream": False}
            ).status_code
            == 200
        )
        too_many = http.post(f"/v1/sessions/{sid}/messages", json={"content": "d"})
        assert too_many.status_code == 413
        assert http.get(f"/v1/sessions/{sid}").json()["n_messages"] == 4
        system = http.post("/v1/sessions", json={"system": "s" * 4000})
        assert system.status_code == 413


def test_lists_are_paged(upstream: MockServer) -> None:
    """GET /v1/sessions pages with limit/after and has_more; a session's messages page by
    position; bad limits and cursors are 400s."""
    with gateway(upstream.url, sessions_per_minute=100) as server, client(server) as http:
        made = {http.post("/v1/sessions", json={}).json()["id"] for _ in range(5)}
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
            page = http.get("/v1/sessions", params=params).json()
            seen += [s["id"] for s in page["data"]]
            pages += 1
            assert len(page["data"]) <= 2
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert pages == 3
        assert sorted(seen) == sorted(made)
        assert len(http.get("/v1/sessions").json()["data"]) == 5
        for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"limit": ""}):
            response = http.get("/v1/sessions", params=bad)
            assert response.status_code == 400, bad
        gone = http.get("/v1/sessions", params={"after": "sess_deleted_since"}).json()
        assert (gone["data"], gone["has_more"]) == ([], False)
        sid = next(iter(made))
        http.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "stream": False})
        first = http.get(f"/v1/sessions/{sid}", params={"limit": 1}).json()
        assert [m["role"] for m in first["messages"]] == ["user"]
        assert first["has_more"] is True
        rest = http.get(f"/v1/sessions/{sid}", params={"limit": 1, "after": "0"}).json()
        assert [m["role"] for m in rest["messages"]] == ["assistant"]
        assert rest["has_more"] is False
        assert http.get(f"/v1/sessions/{sid}", params={"after": "x"}).status_code == 400


def test_deep_json_in_a_session_message_is_a_400(upstream: MockServer) -> None:
    """Nesting past the limit in a session message is a 400, never a 500."""
    with gateway(upstream.url) as server, client(server) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        nested = "[" * 5000 + "]" * 5000
        response = http.post(
            f"/v1/sessions/{sid}/messages",
            content=f'{{"content":"hi","x":{nested}}}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert code(response) == "invalid_json"
