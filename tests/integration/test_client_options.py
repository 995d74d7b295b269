"""The client constructor's openai surface: keys and URLs from the environment, a clear
error with no key, options checked at once, openai's timeout mapped onto our timers, headers
and query parameters sent, a `/beta` base URL, with_options copies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import unbroken
from tests.servers import serve
from unbroken.core.attempt import Timeouts
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.settings import env_client

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Options, please."}]
CONFIG = MockConfig(seed=31)


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


def test_no_key_is_an_error_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a key anywhere the constructor says so, before any request."""
    for name in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY", "DEEPSEEK_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(unbroken.ConfigError, match="DEEPSEEK_API_KEY"):
        unbroken.Client()
    with pytest.raises(unbroken.ConfigError, match="no API key"):
        unbroken.AsyncClient(base_url="http://127.0.0.1:9")


def test_keys_and_urls_from_the_environment() -> None:
    """DEEPSEEK_* first; OPENAI_BASE_URL too; OPENAI_API_KEY only off DeepSeek's host."""
    assert env_client({"DEEPSEEK_API_KEY": "d", "OPENAI_API_KEY": "o"}) == ("d", None)
    assert env_client({"OPENAI_API_KEY": "o"}) == (None, None)
    assert env_client({"OPENAI_API_KEY": "o", "OPENAI_BASE_URL": "http://h/v1"}) == (
        "o",
        "http://h/v1",
    )
    assert env_client({"OPENAI_API_KEY": "o", "OPENAI_BASE_URL": "https://api.deepseek.com"}) == (
        None,
        "https://api.deepseek.com",
    )
    assert env_client({"DEEPSEEK_BASE_URL": "http://a", "OPENAI_BASE_URL": "http://b"}) == (
        None,
        "http://a",
    )


def test_the_environment_reaches_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client built with no arguments uses the environment's key and base URL."""
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    monkeypatch.delenv("DEEPSEEK_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    with unbroken.Client() as client:
        assert client.api_key == "sk-env"
        assert str(client.base_url) == "http://127.0.0.1:9/v1/"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retry": 2}, "unknown client option 'max_retry'"),
        ({"timeout": 5, "timeouts": Timeouts()}, "either timeout="),
        ({"max_retries": 1, "retry": unbroken.RetryPolicy()}, "either max_retries="),
        ({"max_retries": -1}, "max_retries must be"),
        ({"timeout": "5"}, "timeout must be"),
        ({"deadline": 0}, "deadline must be"),
    ],
)
def test_options_are_checked_at_once(options: dict[str, Any], message: str) -> None:
    """A typo or a contradiction is a ConfigError naming it, not a silent default."""
    with pytest.raises(unbroken.ConfigError, match=message):
        unbroken.Client(api_key="sk", base_url="http://127.0.0.1:9", **options)


def test_openai_timeout_maps_onto_each_wait() -> None:
    """timeout= limits each wait (connect, headers, first token, idle), not the answer;
    deadline= is the whole answer."""
    with unbroken.Client(api_key="sk", base_url="http://x", timeout=7.0, deadline=90) as c:
        assert c.timeout == Timeouts(7.0, 7.0, 7.0, 7.0, 90.0)
    timeout = httpx.Timeout(30.0, connect=2.0)
    with unbroken.Client(api_key="sk", base_url="http://x", timeout=timeout, max_retries=3) as c:
        assert c.timeout == Timeouts(2.0, 30.0, 30.0, 30.0, None)
        assert c.max_retries == 3


def test_a_per_call_timeout_is_per_read_and_deadline_is_whole(upstream: MockServer) -> None:
    """A healthy answer slower than `timeout` in total is delivered; `deadline` cuts it."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    slow = {"X-Mock-Token-Ms": "30"}
    with unbroken.Client(api_key="sk", base_url=upstream.url, max_retries=0) as c:
        started = time.monotonic()
        done = c.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, timeout=0.5, extra_headers=slow
        )
        assert done.choices[0].message.content == content
        assert time.monotonic() - started > 0.5  # longer than `timeout`, and still whole
        with pytest.raises(unbroken.UpstreamTimeout) as info:
            c.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, deadline=0.3, extra_headers=slow
            )
    assert info.value.phase == "deadline"


def test_headers_and_query_are_sent() -> None:
    """organization, project, default_headers, default_query and extra_query arrive."""
    seen: list[tuple[dict[str, str], str]] = []
    answer = (
        b'data: {"id":"a","choices":[{"index":0,"delta":{"content":"ok"},'
        b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.append((headers, scope["query_string"].decode()))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    with (
        serve(app) as server,
        unbroken.Client(
            api_key="sk-h",
            base_url=server.url,
            organization="org-1",
            project="proj-1",
            default_headers={"X-Team": "a"},
            default_query={"api-version": "2024"},
        ) as c,
    ):
        done = c.chat.completions.create(model="m", messages=MESSAGES, extra_query={"trace": "1"})
    assert done.choices[0].message.content == "ok"
    ((headers, query),) = seen
    assert headers["openai-organization"] == "org-1"
    assert headers["openai-project"] == "proj-1"
    assert headers["x-team"] == "a"
    assert headers["authorization"] == "Bearer sk-h"
    assert sorted(query.split("&")) == ["api-version=2024", "trace=1"]


def test_a_beta_base_url_resumes_on_beta_once(upstream: MockServer) -> None:
    """With base_url ending in /beta, a resume goes to /beta/chat/completions (not
    /beta/beta/...), and the answer is whole."""
    upstream.reset()
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    with unbroken.Client(api_key="sk", base_url=f"{upstream.url}/beta") as c:
        done = c.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_headers={"X-Mock-Fault": "reset after=5 times=1", "X-Mock-Fault-Key": "beta"},
        )
    assert done.choices[0].message.content == content
    paths = [e["path"] for e in upstream.log()]
    assert paths == ["/chat/completions", "/beta/chat/completions"]


def test_with_options_shares_the_pool_and_changes_only_what_it_names(
    upstream: MockServer,
) -> None:
    """A copy has its own options; closing it leaves the original usable."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    with unbroken.Client(api_key="sk", base_url=upstream.url, max_retries=4) as c:
        copy = c.with_options(timeout=9.0)
        assert copy.max_retries == 4
        assert copy.timeout.idle_s == 9.0
        assert c.timeout.idle_s == Timeouts().idle_s
        other = c.with_options(api_key="sk-other")
        assert other.api_key == "sk-other"
        assert other.base_url == c.base_url
        copy.close()
        done = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert done.choices[0].message.content == content


@pytest.mark.anyio
async def test_async_with_options_shares_the_pool(upstream: MockServer) -> None:
    """The async copy uses the same connections; closing it does not close them; a copy
    may also get its own http_client."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    async with unbroken.AsyncClient(api_key="sk", base_url=upstream.url) as c:
        copy = c.with_options(max_retries=0)
        assert copy.max_retries == 0
        assert copy._transport is c._transport
        await copy.close()
        done = await c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        assert done.choices[0].message.content == content
        async with httpx.AsyncClient() as own:
            mine = c.with_options(http_client=own)
            again = await mine.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
        assert again.choices[0].message.content == content
