"""A session turn over `/v1/chat/ws` (what the chat page sends once it has fallen back to
the WebSocket): the answer streams as frames, both turns are stored in the session, a
dropped connection resumes after its last event id, and bad session frames are typed
errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.test_gateway_ws import content, frames, gateway, ws_url
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=21, answer_tokens=(30, 40))) as server:
        yield server


def session(api: httpx.Client) -> str:
    created = api.post("/v1/sessions", json={"model": "deepseek-chat"})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_session_turn_over_the_websocket_is_stored_and_resumes(mock: MockServer) -> None:
    """A `create` naming a session streams the answer; the connection is dropped after a
    few chunks and a `resume` after the last event on a new one gives the rest with no gap
    and no repeat; the session then holds both turns, the answer whole."""
    with gateway(mock) as server, httpx.Client(base_url=server.url, timeout=20) as api:
        sid = session(api)
        create = {"type": "create", "id": "t1", "session_id": sid, "body": {"content": "Hi!"}}
        first: list[dict[str, Any]] = []
        with connect(ws_url(server)) as ws:
            ws.send(json.dumps(create))
            for frame in frames(ws, "t1"):
                first.append(frame)
                if sum(f["type"] == "chunk" for f in first) == 5:
                    break
        stream_id = first[0]["stream_id"]
        chunks = [f for f in first if f["type"] == "chunk"]
        resume = {
            "type": "resume",
            "id": "t1",
            "stream_id": stream_id,
            "after": chunks[-1]["event"],
        }
        with connect(ws_url(server)) as ws:
            ws.send(json.dumps(resume))
            rest = list(frames(ws, "t1"))
        assert rest[-1]["type"] == "done"
        chunks += [f for f in rest if f["type"] == "chunk"]
        events = [int(c["event"]) for c in chunks]
        assert events == sorted(set(events))
        stored = api.get(f"/v1/sessions/{sid}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "Hi!"
    assert stored[1]["content"] == content(chunks) != ""


def test_bad_session_frames_are_typed_errors(mock: MockServer) -> None:
    """An unknown session is a 404-shaped error frame; a session_id that is not a string
    and a session message without content are invalid-request error frames; the connection
    stays usable."""
    with gateway(mock) as server, httpx.Client(base_url=server.url, timeout=20) as api:
        sid = session(api)
        with connect(ws_url(server)) as ws:
            sent = [
                {"type": "create", "id": "a", "session_id": "nope", "body": {"content": "x"}},
                {"type": "create", "id": "b", "session_id": 7, "body": {"content": "x"}},
                {"type": "create", "id": "c", "session_id": sid, "body": {}},
            ]
            errors = []
            for frame in sent:
                ws.send(json.dumps(frame))
                errors.append(json.loads(ws.recv(timeout=20)))
            ws.send(
                json.dumps(
                    {"type": "create", "id": "d", "session_id": sid, "body": {"content": "ok"}}
                )
            )
            done = list(frames(ws, "d"))
    assert [e["type"] for e in errors] == ["error"] * 3
    assert errors[0]["error"]["code"] == "session_not_found"
    assert "session_id" in errors[1]["error"]["message"]
    assert errors[2]["error"]["param"] == "content"
    assert done[-1]["type"] == "done"
