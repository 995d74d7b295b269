"""Bad input never reaches the upstream and never earns a 500: malformed JSON, wrong
types, oversized bodies, unknown models and paths each get an OpenAI-shaped 4xx naming the
problem; hypothesis throws generated bodies at the API to prove it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=3, answer_tokens=(2, 4))) as server:
        yield server


@pytest.fixture(scope="module")
def client(upstream: MockServer) -> Iterator[httpx.Client]:
    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(max_body_bytes=4096, retry_attempts=2, retry_wait_initial_s=0.01),
    )
    with (
        ServerThread(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20) as http,
    ):
        yield http


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    return dict(error)


BAD = [
    (b"", 400, None, "empty"),
    (b"{", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b'"text"', 400, None, "JSON object"),
    (json.dumps({"messages": MESSAGES}).encode(), 400, "model", "model is required"),
    (json.dumps({"model": 7, "messages": MESSAGES}).encode(), 400, "model", "model"),
    (json.dumps({"model": "gpt-5", "messages": MESSAGES}).encode(), 404, "model", "gpt-5"),
    (json.dumps({"model": "deepseek-chat"}).encode(), 400, "messages", "messages"),
    (json.dumps({"model": "deepseek-chat", "messages": []}).encode(), 400, "messages", "non-empty"),
    (json.dumps({"model": "deepseek-chat", "messages": "hi"}).encode(), 400, "messages", "array"),
    (
        json.dumps({"model": "deepseek-chat", "messages": [1]}).encode(),
        400,
        "messages[0]",
        "object",
    ),
    (
        json.dumps(
            {"model": "deepseek-chat", "messages": [{"role": "robot", "content": "x"}]}
        ).encode(),
        400,
        "messages[0].role",
        "robot",
    ),
    (
        json.dumps(
            {"model": "deepseek-chat", "messages": [{"role": "user", "content": 5}]}
        ).encode(),
        400,
        "messages[0].content",
        "content",
    ),
    (
        json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stream": "yes"}).encode(),
        400,
        "stream",
        "boolean",
    ),
    (
        json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "temperature": "hot"}).encode(),
        400,
        "temperature",
        "number",
    ),
    (
        json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "temperature": 9}).encode(),
        400,
        "temperature",
        "[0, 2]",
    ),
    (
        json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "max_tokens": 0}).encode(),
        400,
        "max_tokens",
        ">= 1",
    ),
    (
        json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "n": True}).encode(),
        400,
        "n",
        "boolean",
    ),
    (
        json.dumps({"model": "deepseek-chat", "messages": MESSAGES, "stop": [1]}).encode(),
        400,
        "stop",
        "strings",
    ),
    (
        json.dumps(
            {"model": "deepseek-chat", "messages": MESSAGES, "stream_options": {"include_usage": 1}}
        ).encode(),
        400,
        "stream_options",
        "boolean",
    ),
    (b'{"model": "deepseek-chat", "messages": [' + b" " * 5000 + b"]}", 413, None, "4096 bytes"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD, ids=[b[3] for b in BAD])
def test_bad_body_is_an_openai_shaped_4xx(
    client: httpx.Client, body: bytes, status: int, param: str | None, words: str
) -> None:
    """Each bad body gets its status, the field at fault and a message naming it."""
    error = assert_openai_error(
        client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        ),
        status,
    )
    assert error["param"] == param
    assert words in error["message"]


def test_bad_path_and_method(client: httpx.Client) -> None:
    """Unknown paths are 404 and wrong methods 405 with Allow, in the same shape."""
    assert_openai_error(client.get("/v2/nothing"), 404)
    response = client.get("/v1/chat/completions")
    assert assert_openai_error(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
    assert assert_openai_error(client.post("/v1/models"), 405)["code"] == "method_not_allowed"


def test_lying_content_length_is_refused_early(client: httpx.Client) -> None:
    """A declared body over the limit is refused before it is read."""
    response = client.post(
        "/v1/chat/completions",
        content=b"x" * 5000,
        headers={"Content-Type": "application/json"},
    )
    assert assert_openai_error(response, 413)["code"] == "request_too_large"


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["deepseek-chat", "deepseek-reasoner", "", "x"]) | _json,
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | _json,
                    "content": st.text(max_size=20) | _json,
                },
            ),
            max_size=3,
        )
        | _json,
        "stream": _json,
        "temperature": _json,
        "max_tokens": st.integers(-3, 6) | _json,
        "n": _json,
        "stop": _json,
        "tools": _json,
        "stream_options": _json,
        "fallbacks": _json,
        "seed": _json,
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=_bodies)
def test_generated_bodies_never_earn_a_500(client: httpx.Client, body: dict[str, Any]) -> None:
    """Whatever the body, the answer is a 200 or an OpenAI-shaped 4xx/upstream error."""
    response = client.post("/v1/chat/completions", json=body)
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith(("data: [DONE]", "}"))
        else:
            assert response.json()["object"] == "chat.completion"
        return
    assert response.status_code < 500 or response.status_code in (502, 504), response.text
    assert_openai_error(response, response.status_code)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_earn_a_500(client: httpx.Client, raw: bytes) -> None:
    """Arbitrary bytes as a body are refused with a 4xx."""
    response = client.post("/v1/chat/completions", content=raw)
    assert 400 <= response.status_code < 500
    assert_openai_error(response, response.status_code)
