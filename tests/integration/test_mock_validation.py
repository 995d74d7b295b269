"""Bad input never gets a 500 or kills the mock: every malformed request gets a DeepSeek-shaped
4xx whose message names the problem."""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest

from tests.servers import raw_exchange
from unbroken.errors import ConfigError
from unbroken.mock import FaultRule, FaultSpecError, Latency, MockConfig, MockServer, parse_faults

pytestmark = pytest.mark.integration

USER = [{"role": "user", "content": "hi"}]
OK: dict[str, Any] = {"model": "deepseek-chat", "messages": USER}

# (body, status, a phrase the message must contain)
BAD_BODIES: list[tuple[Any, int, str]] = [
    (b"", 400, "JSON"),
    (b"{not json", 400, "JSON"),
    (b"\xff\xfe\x00garbage", 400, "JSON"),
    (b"[" * 5000 + b"]" * 5000, 400, "deeply"),
    ([1, 2], 400, "object"),
    ("text", 400, "object"),
    ({}, 400, "`model`"),
    ({"messages": USER}, 400, "`model`"),
    ({"model": 7, "messages": USER}, 422, "`model`"),
    ({"model": "gpt-4o", "messages": USER}, 400, "Model Not Exist"),
    ({"model": "deepseek-chat"}, 400, "`messages`"),
    ({"model": "deepseek-chat", "messages": []}, 400, "empty"),
    ({"model": "deepseek-chat", "messages": "hi"}, 400, "array"),
    ({"model": "deepseek-chat", "messages": [1]}, 400, "messages[0]"),
    ({"model": "deepseek-chat", "messages": [{"content": "x"}]}, 400, "role"),
    ({"model": "deepseek-chat", "messages": [{"role": "wizard", "content": "x"}]}, 400, "wizard"),
    ({"model": "deepseek-chat", "messages": [{"role": "user"}]}, 400, "content"),
    ({"model": "deepseek-chat", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    (
        {
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
        },
        400,
        "image_url",
    ),
    (
        {"model": "deepseek-chat", "messages": [{"role": "tool", "content": "x"}]},
        400,
        "tool_call_id",
    ),
    (
        {
            "model": "deepseek-chat",
            "messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}],
        },
        400,
        "tool",
    ),
    ({**OK, "temperature": 3}, 422, "`temperature`"),
    ({**OK, "temperature": "hot"}, 422, "`temperature`"),
    ({**OK, "top_p": 1.5}, 422, "`top_p`"),
    ({**OK, "presence_penalty": -9}, 422, "`presence_penalty`"),
    ({**OK, "max_tokens": 0}, 422, "max_tokens"),
    ({**OK, "max_tokens": 9000}, 422, "[1, 8192]"),
    ({**OK, "max_tokens": 1.5}, 422, "`max_tokens`"),
    ({**OK, "model": "deepseek-reasoner", "max_tokens": 70000}, 422, "[1, 65536]"),
    ({**OK, "stream": "yes"}, 422, "`stream`"),
    ({**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({**OK, "stream": True, "stream_options": {"include_usage": 1}}, 422, "include_usage"),
    ({**OK, "stop": ["a"] * 17}, 422, "`stop`"),
    ({**OK, "stop": 5}, 422, "`stop`"),
    ({**OK, "tools": {}}, 422, "`tools`"),
    ({**OK, "tools": [{"type": "function"}]}, 422, "tools[0]"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 422, "name"),
    ({**OK, "tool_choice": "sometimes"}, 422, "`tool_choice`"),
    ({**OK, "tool_choice": "required"}, 422, "requires `tools`"),
    ({**OK, "response_format": {"type": "yaml"}}, 422, "`response_format`"),
    ({**OK, "top_logprobs": 3}, 422, "logprobs"),
    ({**OK, "logprobs": True, "top_logprobs": 30}, 422, "top_logprobs"),
    ({**OK, "seed": "x"}, 422, "`seed`"),
    ({**OK, "thinking": {"type": "maybe"}}, 422, "`thinking`"),
    ({**OK, "messages": [{"role": "user", "content": "x" * 500_000}]}, 400, "maximum context"),
    (
        {**OK, "max_tokens": 8000, "messages": [{"role": "user", "content": "é" * 215_000}]},
        400,
        "context",
    ),
]


@pytest.mark.parametrize(("body", "status", "phrase"), BAD_BODIES)
def test_bad_body_gets_a_deepseek_shaped_4xx(
    mock: MockServer, body: Any, status: int, phrase: str
) -> None:
    """Each malformed body gets the expected status and a message naming the problem."""
    payload = body if isinstance(body, bytes) else None
    with httpx.Client(base_url=mock.url, headers={"Authorization": "Bearer sk"}) as client:
        if payload is None:
            response = client.post("/chat/completions", json=body)
        else:
            response = client.post(
                "/chat/completions", content=payload, headers={"Content-Type": "application/json"}
            )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert phrase in error["message"]
    assert mock.stats()["statuses"].get("500") is None


@pytest.mark.parametrize(
    ("headers", "phrase"),
    [
        ({"X-Mock-Fault": "explode"}, "unknown fault kind 'explode'"),
        ({"X-Mock-Fault": "reset after=x"}, "after must be an integer"),
        ({"X-Mock-Fault": "reset speed=2"}, "unknown parameter 'speed'"),
        ({"X-Mock-Fault": "reset after"}, "name=value"),
        ({"X-Mock-Fault": "429; 503"}, "conflict"),
        ({"X-Mock-Fault": "crlf; cr"}, "conflict"),
        ({"X-Mock-Fault": "503 body=xml"}, "html or json"),
        ({"X-Mock-TTFT-Ms": "soon"}, "x-mock-ttft-ms"),
        ({"X-Mock-Token-Ms": "-5"}, "x-mock-token-ms"),
        ({"X-Mock-Keepalive-Ms": "0"}, "x-mock-keepalive-ms"),
        ({"X-Mock-Tokens": "lots"}, "x-mock-tokens"),
        ({"X-Mock-Tokens": "99999999999"}, "x-mock-tokens"),
    ],
)
def test_bad_mock_headers_are_400(api: httpx.Client, headers: dict[str, str], phrase: str) -> None:
    """A malformed X-Mock-* header is a 400 that names the header and the problem."""
    response = api.post("/chat/completions", json=OK, headers=headers)
    assert response.status_code == 400
    assert phrase in response.json()["error"]["message"]


def test_oversized_body_is_413_and_the_server_lives_on(mock: MockServer) -> None:
    """A body over max_body_bytes is refused with 413; the next request is served."""
    result = raw_exchange(mock.url, b"{" + b" " * (9 * 1024 * 1024) + b"}")
    assert result.status == 413
    assert "exceeds" in result.json()["error"]["message"]
    ok = raw_exchange(mock.url, OK)
    assert ok.status == 200


def test_garbage_http_and_admin_input(mock: MockServer) -> None:
    """Unknown admin paths, a bad /_mock/config body and garbage on the socket leave the
    server serving."""
    assert httpx.get(mock.url + "/_mock/nothing").status_code == 404
    bad_configs: list[Any] = [
        b"nope",
        [],
        {"latency": {"ttft_ms": -1}},
        {"faults": [{"fault": "explode"}]},
        {"seed": "x"},
        {"colour": 1},
        {"answer_tokens": [5, 1]},
    ]
    for body in bad_configs:
        content = body if isinstance(body, bytes) else None
        response = (
            httpx.post(mock.url + "/_mock/config", content=content)
            if content is not None
            else httpx.post(mock.url + "/_mock/config", json=body)
        )
        assert response.status_code == 400, body
        assert response.json()["error"]["message"]
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(mock.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert raw_exchange(mock.url, OK).status == 200
    assert mock.stats()["statuses"].get("500") is None


MORE_BAD_MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"role": "user", "content": "x", "name": 5}, "name"),
    ({"role": "user", "content": "x", "prefix": "yes"}, "prefix"),
    ({"role": "user", "content": "x", "prefix": True}, "assistant"),
    ({"role": "assistant", "content": "x", "reasoning_content": 1}, "reasoning_content"),
    ({"role": "assistant", "content": None, "tool_calls": "call"}, "tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}, "tool_calls[0]"),
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, "text"),
]


@pytest.mark.parametrize(("message", "phrase"), MORE_BAD_MESSAGES)
def test_bad_messages_name_the_field(
    api: httpx.Client, message: dict[str, Any], phrase: str
) -> None:
    """Malformed message fields are a 400 naming the message and the field."""
    body = {"model": "deepseek-chat", "messages": [*USER, message, *USER]}
    response = api.post("/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert phrase in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"latency": "fast"}, "latency"),
        ({"answer_tokens": (5, 1)}, "answer_tokens"),
        ({"balance": "lots"}, "balance"),
        ({"context_tokens": 10}, "context_tokens"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"send_bytes": 10}, "send_bytes"),
        ({"log_size": -1}, "log_size"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], phrase: str) -> None:
    """MockConfig, Latency and FaultRule refuse bad values with a ConfigError naming them."""
    if kwargs.get("latency") == "fast":
        with pytest.raises(ConfigError, match="ttft_ms"):
            Latency(ttft_ms=-1)
        with pytest.raises(ConfigError, match="keepalive_ms"):
            Latency(keepalive_ms=0)
        return
    with pytest.raises(ConfigError, match=phrase):
        MockConfig(**kwargs)


def test_fault_rule_validation() -> None:
    """A FaultRule checks its spec, probability and windows."""
    with pytest.raises(ConfigError, match="unknown fault kind"):
        FaultRule("explode")
    with pytest.raises(ConfigError, match="probability"):
        FaultRule("503", probability=1.5)
    with pytest.raises(ConfigError, match="first_requests"):
        FaultRule("503", first_requests=-1)
    with pytest.raises(ConfigError, match="first_s"):
        FaultRule("503", first_s=-1.0)
    with pytest.raises(FaultSpecError, match="too long"):
        parse_faults("503;" * 600)
    assert parse_faults("none") == []


def test_module_entry_point_parses_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m unbroken.mock` builds the config from its flags and prints the URL."""
    import io

    import unbroken.mock.__main__ as entry

    calls: list[tuple[Any, ...]] = []

    def fake_serve(config: MockConfig, host: str, port: int, **kw: Any) -> None:
        calls.append((config.seed, host, port, kw["loop"]))
        kw["on_ready"]("http://127.0.0.1:1")

    out = io.StringIO()
    monkeypatch.setattr(entry, "serve", fake_serve)
    monkeypatch.setattr(sys, "stdout", out)
    entry.main(["--port", "0", "--seed", "9", "--loop", "uvloop"])
    assert calls == [(9, "127.0.0.1", 0, "uvloop")]
    assert out.getvalue() == "mock DeepSeek listening on http://127.0.0.1:1\n"
