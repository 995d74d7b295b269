"""The SDK's request builder (`client._driver.post_request`) against httpx's own: the same
request, byte for byte, for every shape of headers a caller can give."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import msgspec
import pytest

from unbroken.client import AsyncClient
from unbroken.client._driver import Exchange, post_request
from unbroken.client._reconnect import OPT_IN
from unbroken.core.flow import Connect, PackedMessages, Sleep
from unbroken.core.routes import Route

URL = httpx.URL("http://127.0.0.1:8000/v1/chat/completions?x=1")
TIMEOUT: dict[str, float | None] = {"connect": 5.0, "read": None, "write": 5.0, "pool": 5.0}
BASE = {
    "Content-Type": "application/json",
    "Accept": "text/event-stream, application/json",
    "User-Agent": "unbroken/0.1",
}


def _httpx(
    url: httpx.URL, content: bytes, headers: dict[str, Any], also: tuple[str, str] | None
) -> httpx.Request:
    request = httpx.Request(
        "POST", url, content=content, headers=headers, extensions={"timeout": TIMEOUT}
    )
    if also is not None:
        request.headers[also[0]] = also[1]
    return request


CASES = [
    pytest.param({**BASE, "Authorization": "Bearer sk-1"}, None, id="plain"),
    pytest.param({**BASE, "X-Request-ID": "abc"}, ("X-Unbroken-Resumable", "1"), id="also-new"),
    pytest.param(
        {**BASE, "x-unbroken-resumable": "0", "X-UNBROKEN-RESUMABLE": "2"},
        ("X-Unbroken-Resumable", "1"),
        id="also-replaces-first-drops-rest",
    ),
    pytest.param({**BASE, "host": "example.test"}, None, id="own-host"),
    pytest.param({**BASE, "content-length": "99"}, None, id="own-content-length"),
    pytest.param({**BASE, "Transfer-Encoding": "chunked"}, None, id="transfer-encoding"),
    pytest.param({**BASE, "X-Raw": b"\xe9t\xe9"}, None, id="bytes-value"),
]


@pytest.mark.parametrize(("headers", "also"), CASES)
@pytest.mark.parametrize("content", [b'{"model":"m"}', b""], ids=["body", "empty"])
def test_post_request_is_the_request_httpx_builds(
    headers: dict[str, Any], also: tuple[str, str] | None, content: bytes
) -> None:
    ours = post_request(URL, content, headers, dict(TIMEOUT), also=also)
    theirs = _httpx(URL, content, headers, also)
    assert ours.method == theirs.method
    assert ours.url == theirs.url
    assert ours.headers.raw == theirs.headers.raw
    assert ours.headers.encoding == theirs.headers.encoding
    assert ours.content == theirs.content
    assert ours.extensions == theirs.extensions
    assert isinstance(ours.stream, httpx.ByteStream)
    assert b"".join(ours.stream) == content


def test_post_request_rejects_what_httpx_rejects() -> None:
    with pytest.raises(TypeError):
        post_request(URL, b"{}", {"X-Count": 3}, dict(TIMEOUT))  # type: ignore[dict-item]
    with pytest.raises(UnicodeEncodeError):
        post_request(URL, b"{}", {"X-Name": "caf\u00e9"}, dict(TIMEOUT))
    with pytest.raises(AttributeError):
        post_request(URL, b"{}", {3: "x"}, dict(TIMEOUT))  # type: ignore[dict-item]
    with pytest.raises(AttributeError):
        httpx.Request("POST", URL, content=b"{}", headers={3: "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("route_headers", "extra", "api_key"),
    [
        pytest.param({}, {"X-Request-ID": "abc"}, "sk-1", id="plain"),
        pytest.param({"X-Route": "r"}, {"X-Request-ID": "abc"}, None, id="no-key"),
        pytest.param({"User-Agent": "mine"}, {}, "sk-1", id="route-replaces-default"),
        pytest.param({"authorization": "Basic x"}, {}, "sk-1", id="route-own-authorization"),
        pytest.param({"X-Route": "r"}, {"x-route": "e"}, "sk-1", id="extra-replaces-route"),
        pytest.param({}, {"Accept": "text/plain"}, "sk-1", id="extra-replaces-default"),
        pytest.param({}, {"x-unbroken-resumable": "0"}, "sk-1", id="extra-replaces-also"),
        pytest.param({}, {"Host": "other.test"}, "sk-1", id="extra-host"),
    ],
)
def test_an_exchange_head_is_its_request_headers(
    route_headers: dict[str, str], extra: dict[str, str], api_key: str | None
) -> None:
    """`Exchange.head` (the header lines a transport taking a POST's parts sends, cached
    per route) is the httpx.Request's headers, whatever the route and the request set."""
    route = Route(
        name="r", base_url="http://127.0.0.1:9/v1", api_key=api_key, headers=route_headers
    )
    client = AsyncClient(routes=[route])
    for _ in range(2):  # the second request on the route uses its cached lines
        run = client._new_run(
            "deepseek-chat",
            [{"role": "user", "content": "hi"}],
            {"extra_headers": extra},
            stream=True,
        )
        action = run.next_action(None, time.monotonic())
        assert isinstance(action, Connect)
        attempt = run.new_attempt(action.plan, time.monotonic())
        ex = Exchange(run, attempt, read_s=None, also=OPT_IN)
        content = ex.content()
        expected = b"".join(b"%s: %s\r\n" % pair for pair in ex.request.headers.raw)
        assert ex.head(content) == expected
        assert content == ex.request.content


MESSAGES: list[Any] = [
    {"role": "system", "content": "Answer in French: \u00e9t\u00e9, \u2028 and \U0001f600."},
    {"role": "user", "content": [{"type": "text", "text": 'a "quoted" part\n'}]},
    {"role": "assistant", "content": "Le d\u00e9but", "prefix": True},
]


def test_an_exchange_body_packs_the_messages_and_sends_their_json() -> None:
    """`Exchange.content` packs a chat request's messages (`AnswerRun.pack_messages`) and
    puts that JSON in the body as it is: the body sent is the body encoded whole, for
    the first attempt and for one after a failure (the messages read back, packed again)."""
    client = AsyncClient(routes=[Route(name="r", base_url="http://127.0.0.1:9/v1")])
    run = client._new_run("deepseek-chat", [dict(m) for m in MESSAGES], {}, stream=True)
    action = run.next_action(None, time.monotonic())
    for _ in range(2):
        assert isinstance(action, Connect)
        attempt = run.new_attempt(action.plan, time.monotonic())
        expected = msgspec.json.encode(run.body)
        ex = Exchange(run, attempt, read_s=None, also=OPT_IN)
        content = ex.content()
        assert content == expected
        assert ex.content(exact=False) == expected
        # Held as their JSON from the encoding on, not as objects.
        assert type(run._body["messages"]) is PackedMessages
        assert msgspec.json.decode(run._body["messages"]) == MESSAGES
        assert json.loads(ex.request.content) == {**json.loads(expected), "messages": MESSAGES}
        # The attempt fails before its answer streams: the next one is planned from the
        # messages read back.
        outcome = ex.failed(httpx.ConnectError("refused"), time.monotonic())
        action = run.next_action(outcome, time.monotonic())
        if isinstance(action, Sleep):
            action = run.next_action(None, time.monotonic())
    assert run.body["messages"] == MESSAGES
