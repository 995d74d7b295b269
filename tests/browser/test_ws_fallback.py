"""Behind nginx configured to buffer responses (as a misconfigured proxy does to server-sent
events), the page finds its first answer arrived all at once, says so, switches to the
WebSocket, and streams the next answers incrementally over it - resuming after a drop with
the last event id it holds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser.conftest import ASSISTANT, MESSAGE, SEND, gateway_settings, shot
from tests.browser.test_buffering import BufferingProxy
from tests.nginx import nginx
from unbroken.gateway.app import create_app
from unbroken.mock import MockServer, ServerThread

pytestmark = pytest.mark.browser

N_TOKENS = 120  # 2.4 s at 20 ms a token: long enough to see it grow, and to cut it


def buffering(conf: str) -> str:
    """deploy/nginx.conf turned into a proxy that holds each response until it is whole:
    buffering on (the gateway's `X-Accel-Buffering: no` ignored) and gzip on event streams -
    the compressor passes nothing on until its buffer fills or the response ends, which no
    answer here reaches. A classic cause of "SSE arrives all at once" behind nginx."""
    assert "proxy_buffering off;" in conf
    return conf.replace(
        "proxy_buffering off;",
        "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"
        " gzip on; gzip_types text/event-stream; gzip_proxied any; gzip_min_length 0;"
        " gzip_buffers 16 64k;",
    )


@pytest.fixture(scope="module")
def gateway(mock_server: MockServer) -> Iterator[ServerThread]:
    """A gateway without keys that also speaks WebSocket (uvicorn's websockets sans-io)."""
    app = create_app(gateway_settings(mock_server.url))
    with ServerThread(app, lifespan="on", ws="websockets-sansio") as server:
        yield server


@pytest.fixture
def proxy(gateway: ServerThread) -> Iterator[str]:
    with nginx([gateway.url.removeprefix("http://")], edit=buffering) as url:
        yield url


def latest(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("() => window.unbrokenChat.messages().at(-1)")
    return result


def ask(page: Any, text: str) -> None:
    page.fill(MESSAGE, text)
    page.click(SEND)


def stored_answers(proxy: str, page: Any) -> list[str]:
    session = page.evaluate("() => window.unbrokenChat.sessionId")
    messages = httpx.get(f"{proxy}/v1/sessions/{session}", timeout=10).json()["messages"]
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_page_behind_a_buffering_proxy_streams_over_the_websocket(
    context: Any, proxy: str, mock: MockServer
) -> None:
    """First answer: whole at the end (SSE buffered), the notice says so and names the
    WebSocket. Second answer: over the WebSocket, shown while it streams and spread over
    the answer's time; stored in the session like an SSE turn."""
    context.set_extra_http_headers({"X-Mock-Tokens": str(N_TOKENS)})
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sockets: list[Any] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    loaded = page.goto(proxy + "/")
    assert loaded is not None
    assert loaded.ok, loaded.status
    page.wait_for_selector('.ub-app[data-ready="true"]')

    ask(page, "hello")
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    first = latest(page)
    assert first["transport"] == "sse"
    # Buffered: every token arrived in one read, well after the question.
    assert first["lastTokenAt"] - first["firstTokenAt"] <= 50
    notice = page.locator('[role="status"]').text_content() or ""
    assert "buffers streamed responses" in notice
    assert "WebSocket" in notice
    assert page.locator('.ub-app[data-transport="websocket"]').count() == 1
    assert sockets == []
    shot(page, "ws-fallback-1-switched")

    ask(page, "and the next question?")
    page.wait_for_function(
        "() => { const m = window.unbrokenChat.messages().at(-1);"
        " return m.role === 'assistant' && m.state === 'streaming' && m.content.length > 30; }",
        timeout=20_000,
    )
    partial = latest(page)["content"]
    shot(page, "ws-fallback-2-streaming")
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"] >> nth=1', timeout=20_000)
    second = latest(page)
    shot(page, "ws-fallback-3-done")
    assert second["transport"] == "websocket"
    assert second["state"] == "done"
    assert second["content"].startswith(partial)
    assert len(second["content"]) > len(partial)
    # Incremental: the tokens arrived over the answer's time, not in one read.
    assert second["lastTokenAt"] - second["firstTokenAt"] >= 500
    assert len(sockets) == 1
    assert sockets[0].url.endswith("/v1/chat/ws")
    assert "via WebSocket" in (page.locator(f"{ASSISTANT} >> nth=1").text_content() or "")
    assert stored_answers(proxy, page) == [first["content"], second["content"]]
    assert errors == []


def test_websocket_answer_resumes_after_a_drop(context: Any, proxy: str, mock: MockServer) -> None:
    """Once on the WebSocket, a network drop mid-answer closes the socket; back online the
    page opens a new one and sends `resume` with the last event id it holds; the answer
    ends whole, with no gap and no repeat (the session stores the same text)."""
    context.set_extra_http_headers({"X-Mock-Tokens": str(N_TOKENS)})
    page = context.new_page()
    sent: list[dict[str, Any]] = []
    page.on(
        "websocket",
        lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))),
    )
    loaded = page.goto(proxy + "/")
    assert loaded is not None
    assert loaded.ok, loaded.status
    page.wait_for_selector('.ub-app[data-ready="true"]')
    ask(page, "hello")
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    assert page.locator('.ub-app[data-transport="websocket"]').count() == 1

    ask(page, "tell me more")
    page.wait_for_function(
        "() => { const m = window.unbrokenChat.messages().at(-1);"
        " return m.role === 'assistant' && m.state === 'streaming' && m.content.length > 30; }",
        timeout=20_000,
    )
    context.set_offline(True)
    page.wait_for_function("() => !navigator.onLine")
    shown = latest(page)["content"]
    context.set_offline(False)
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"] >> nth=1', timeout=20_000)
    final = latest(page)
    shot(page, "ws-fallback-4-resumed")
    assert final["transport"] == "websocket"
    assert final["content"].startswith(shown)
    assert len(final["content"]) > len(shown)
    resumes = [f for f in sent if f.get("type") == "resume"]
    assert resumes, "the page never resumed"
    assert resumes[0]["after"] is not None
    assert int(resumes[0]["after"]) > 0
    assert [f["type"] for f in sent if f.get("type") == "create"] == ["create"]
    assert stored_answers(proxy, page)[-1] == final["content"]


@pytest.fixture
def refusing_proxy(gateway: ServerThread) -> Iterator[str]:
    """The buffering proxy of test_buffering.py, which refuses WebSocket upgrades."""
    with ServerThread(BufferingProxy(gateway.url), "127.0.0.1", 0) as server:
        yield server.url


def test_page_stays_on_sse_when_websockets_are_refused(
    context: Any, refusing_proxy: str, mock: MockServer
) -> None:
    """Behind a buffering proxy that also refuses WebSocket upgrades, the page tries the
    socket once for the next answer, gets that answer over SSE instead (whole, stored),
    and does not try again on this page."""
    context.set_extra_http_headers({"X-Mock-Tokens": "100"})
    page = context.new_page()
    sockets: list[Any] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    loaded = page.goto(refusing_proxy + "/")
    assert loaded is not None
    assert loaded.ok, loaded.status
    page.wait_for_selector('.ub-app[data-ready="true"]')
    ask(page, "hello")
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    assert page.locator('.ub-app[data-transport="websocket"]').count() == 1
    ask(page, "and again")
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"] >> nth=1', timeout=30_000)
    second = latest(page)
    assert second["transport"] == "sse"
    assert second["state"] == "done"
    assert page.locator('.ub-app[data-transport="websocket"]').count() == 0
    notice = page.locator('[role="status"]').text_content() or ""
    assert "buffers streamed responses" in notice
    assert "WebSocket" not in notice
    assert len(sockets) == 1
    assert stored_answers(refusing_proxy, page)[-1] == second["content"]
