"""The WebSocket attempt's decisions without a socket (client/_wsproto.py): frames in,
chunks and outcomes out; the error-frame status table; the transport option."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest

from unbroken.client._common import AnswerRun, ClientBase
from unbroken.client._wsproto import (
    WsAttempt,
    check_transport,
    decode_frame,
    socket_headers,
    socket_key,
    socket_url,
    status_of,
)
from unbroken.core.flow import Connect
from unbroken.errors import (
    ConfigError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamStreamError,
)


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def frame(**fields: Any) -> Any:
    parsed = decode_frame(json.dumps(fields))
    assert parsed is not None
    return parsed


def start(base_url: str = "http://gw.test/v1") -> tuple[AnswerRun, WsAttempt]:
    client = ClientBase("sk-key", base_url, {"default_headers": {"X-Team": "a"}})
    run = client._new_run("deepseek-chat", [{"role": "user", "content": "hi"}], {}, stream=True)
    action = run.next_action(None, 0.0)
    assert isinstance(action, Connect)
    return run, WsAttempt(run, run.new_attempt(action.plan, 0.0))


def test_an_answer_streams_and_ends_complete() -> None:
    """started, chunks and done give the chunks and a complete outcome."""
    run, wx = start()
    create = msgspec.json.decode(wx.create_frame())
    assert create["type"] == "create"
    assert create["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert wx.on_frame(frame(type="started", id=wx.rid, stream_id="strm_1"), 0.1) == []
    got = wx.on_frame(frame(type="chunk", id=wx.rid, event="1", data=chunk("Hel")), 0.2)
    got += wx.on_frame(frame(type="chunk", id=wx.rid, event="2", data=chunk("lo", "stop")), 0.3)
    got += wx.on_frame(frame(type="done", id=wx.rid), 0.4)
    assert wx.over
    assert wx.cancel_frame() is None  # the gateway ended it: nothing to cancel
    _, outcome = wx.ended(None, 0.5)
    assert outcome.error is None
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices[0].delta) == ("Hello")
    assert run.response is not None
    assert run.response.headers["x-unbroken-stream-id"] == "strm_1"


def test_a_drop_resumes_after_the_last_event() -> None:
    """After a drop the attempt resumes with the last event id it decoded; a drop before
    `started` fails the attempt as a connection error (the flow retries it)."""
    _, wx = start()
    wx.on_frame(frame(type="started", id=wx.rid, stream_id="strm_9"), 0.1)
    wx.on_frame(frame(type="chunk", id=wx.rid, event="7", data=chunk("a")), 0.2)
    assert wx.cancel_frame() == msgspec.json.encode({"type": "cancel", "id": wx.rid})
    assert wx.lost(0.3)
    resume = msgspec.json.decode(wx.resume_frame())
    assert resume == {"type": "resume", "id": wx.rid, "stream_id": "strm_9", "after": "7"}
    assert [wx.next_delay() for _ in range(7)][-1] is None  # a bounded number of tries

    _, early = start()
    assert not early.lost(0.1)
    assert early.outcome is not None
    assert isinstance(early.outcome.error, UpstreamConnectError)


def test_error_frames_before_and_after_output() -> None:
    """An error before any chunk is the gateway's status error; after a chunk it is an
    error inside the stream; after a resume it ends the attempt as broken."""
    _, refused = start()
    refused.on_frame(frame(type="started", id=refused.rid, stream_id="s"), 0.1)
    refused.on_frame(
        frame(
            type="error",
            id=refused.rid,
            error={"message": "slow down", "type": "rate_limit_error", "code": "x"},
        ),
        0.2,
    )
    assert refused.outcome is not None
    error = refused.outcome.error
    assert isinstance(error, UpstreamStatusError)
    assert error.status_code == 429
    assert "slow down" in str(error)

    _, broken = start()
    broken.on_frame(frame(type="started", id=broken.rid, stream_id="s"), 0.1)
    broken.on_frame(frame(type="chunk", id=broken.rid, event="1", data=chunk("a")), 0.2)
    broken.on_frame(
        frame(type="error", id=broken.rid, error={"message": "boom", "type": "server_error"}),
        0.3,
    )
    _, outcome = broken.ended(None, 0.4)
    assert isinstance(outcome.error or (outcome.end and outcome.end.error), UpstreamStreamError)

    _, resumed = start()
    resumed.on_frame(frame(type="started", id=resumed.rid, stream_id="s"), 0.1)
    resumed.on_frame(frame(type="chunk", id=resumed.rid, event="1", data=chunk("a")), 0.2)
    resumed.resume_frame()
    assert (
        resumed.on_frame(frame(type="error", id=resumed.rid, error={"message": "gone"}), 0.3) == []
    )
    assert resumed.over
    assert resumed.outcome is None


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"type": "authentication_error", "code": "invalid_api_key"}, 401),
        ({"type": "permission_error"}, 403),
        ({"type": "invalid_request_error", "code": "model_not_found"}, 404),
        ({"type": "invalid_request_error", "code": "invalid_body"}, 400),
        ({"type": "rate_limit_error"}, 429),
        ({"type": "upstream_error", "code": "upstream_error"}, 502),
        ({"type": "upstream_error", "code": "upstream_timeout_idle"}, 504),
        ({"type": "server_error", "code": "upstream_unavailable"}, 503),
        ({"type": "server_error"}, 500),
        ({}, 500),
    ],
)
def test_status_of_error_frames(error: dict[str, str], status: int) -> None:
    """Error frames map to the status the gateway answers the same error with over HTTP."""
    assert status_of(error) == status


def test_transport_option_and_socket_addressing() -> None:
    """http/None/an httpx transport is HTTP, 'websocket' the socket, anything else a
    ConfigError naming it; the socket URL and headers follow the route."""
    assert check_transport(None, httpx.BaseTransport) is False
    assert check_transport("http", httpx.BaseTransport) is False
    assert check_transport(httpx.HTTPTransport(), httpx.BaseTransport) is False
    assert check_transport("websocket", httpx.BaseTransport) is True
    with pytest.raises(ConfigError, match="'web-socket'"):
        check_transport("web-socket", httpx.BaseTransport)
    run, wx = start("https://gw.test/v1")
    assert socket_url(run, wx.route) == "wss://gw.test/v1/chat/ws"
    headers = socket_headers(run, wx.route)
    assert headers["Authorization"] == "Bearer sk-key"
    assert headers["X-Team"] == "a"
    assert socket_key("ws://a", {"B": "1"}) == socket_key("ws://a", {"b": "1"})
    assert decode_frame("not json") is None
