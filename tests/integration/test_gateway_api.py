"""The gateway's API against the mock DeepSeek over loopback: whole answers through
upstream faults, non-stream answers, models, health, metrics, OpenAPI, request ids, CORS,
gzip, per-request fallbacks, and upstream keys that never leave the gateway."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.healing import assert_fault_fired
from tests.servers import raw_exchange, read_stream
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text
from unbroken.settings import GatewaySettings, RouteSettings, Settings

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
MOCK = MockConfig(seed=21, api_keys=frozenset({UPSTREAM_KEY}))
MESSAGES = [{"role": "user", "content": "Tell me about gateways."}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MOCK) as server:
        yield server


def make_settings(url: str, **gateway: Any) -> Settings:
    options: dict[str, Any] = {
        "forward_headers": ("x-mock-*",),
        "retry_wait_initial_s": 0.01,
        "retry_wait_max_s": 0.05,
        "headers_s": 3.0,
        "first_token_s": 3.0,
        "idle_s": 0.5,
    }
    options.update(gateway)
    return Settings(api_key=UPSTREAM_KEY, base_url=url, gateway=GatewaySettings(**options))


@contextmanager
def running(settings: Settings) -> Iterator[ServerThread]:
    with ServerThread(create_app(settings), lifespan="on") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: MockServer) -> Iterator[ServerThread]:
    with running(make_settings(upstream.url, cors_origins=("https://shop.example",))) as server:
        yield server


@pytest.fixture
def api(gateway: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=20.0) as client:
        yield client


def fault(spec: str, key: str) -> dict[str, str]:
    return {"X-Mock-Fault": spec, "X-Mock-Fault-Key": key}


HEALING = [
    ("none", "deepseek-chat"),
    ("503 times=2", "deepseek-chat"),
    ("429 retry_after=0.05 times=1", "deepseek-chat"),
    ("reset_before_headers times=1", "deepseek-chat"),
    ("reset after=5 times=1", "deepseek-chat"),
    ("close after=7 times=1", "deepseek-chat"),
    ("stall after=4 keepalive=1 times=1", "deepseek-chat"),
    ("malformed after=3 times=1", "deepseek-chat"),
    ("error after=5 times=1", "deepseek-chat"),
    ("insufficient after=6 times=1", "deepseek-chat"),
    ("split_utf8", "deepseek-chat"),
    ("json_body", "deepseek-chat"),
    ("reset after=40 times=1", "deepseek-reasoner"),
]


@pytest.mark.parametrize(("spec", "model"), HEALING)
def test_stream_through_upstream_faults_is_whole(
    api: httpx.Client, upstream: MockServer, spec: str, model: str
) -> None:
    """Every healing upstream fault ends downstream in the whole answer, byte-identical to
    the fault-free one, with one role, one finish and [DONE]."""
    reasoning, content = answer_text(model, MESSAGES, config=MOCK)
    mismatches = upstream.stats()["prefix_mismatches"]
    read = read_stream(
        api,
        {"model": model, "messages": MESSAGES, "stream": True},
        path="/v1/chat/completions",
        headers=fault(spec, f"api:{model}:{spec}"),
    )
    assert read.status == 200
    assert read.error is None
    assert read.headers["content-type"].startswith("text/event-stream")
    assert read.content == content
    assert read.reasoning == reasoning
    assert read.decoder.done
    assert read.finish_reason == "stop"
    roles = [c for c in read.chunks for ch in c.choices if ch.delta and ch.delta.role]
    assert len(roles) == 1
    assert read.raw.count(b"data: [DONE]") == 1
    # The gateway forwarded the fault headers, the fault fired, and every resume continued
    # the answer's own text.
    assert_fault_fired(upstream, f"api:{model}:{spec}", spec, mismatches)


def test_non_stream_answer_and_alias_path(api: httpx.Client) -> None:
    """stream=false answers one chat.completion (with usage and unbroken's meta), also
    under /chat/completions, after healing a reset."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK)
    for path in ("/v1/chat/completions", "/chat/completions"):
        response = api.post(
            path,
            json={"model": "deepseek-chat", "messages": MESSAGES},
            headers=fault("reset after=4 times=1", f"nonstream:{path}"),
        )
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == content
        assert body["usage"]["completion_tokens"] > 0
        assert body["unbroken"]["resumes"] == 1


def test_models_health_ready_openapi(api: httpx.Client) -> None:
    """The small endpoints answer as documented."""
    models = api.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["deepseek-chat", "deepseek-reasoner"]
    assert api.get("/models").status_code == 200
    health = api.get("/healthz").json()
    assert health.pop("pid") > 0
    assert health == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    spec = api.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/chat/completions" in spec["paths"]
    assert "/v1/usage" in spec["paths"]
    assert "fallbacks" in spec["components"]["schemas"]["ChatRequest"]["properties"]


def test_metrics_expose_gateway_and_sdk_series(api: httpx.Client) -> None:
    """/metrics carries the gateway's counters and the SDK's (one registry)."""
    api.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES, "stream": True},
    )
    text = api.get("/metrics").text
    assert 'unbroken_gateway_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "unbroken_gateway_chunks_total" in text
    assert 'unbroken_gateway_streams_total{outcome="complete"}' in text
    assert 'unbroken_attempts_total{kind="first",outcome="complete",route="default"}' in text
    assert UPSTREAM_KEY not in text


def test_request_id_is_taken_or_generated(api: httpx.Client) -> None:
    """A well-formed X-Request-ID is echoed; a malformed or missing one is replaced."""
    assert api.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == (
        "abc-123"
    )
    generated = api.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert generated.headers["x-request-id"] != "bad id\twith spaces"
    assert len(api.get("/healthz").headers["x-request-id"]) == 32
    error = api.post("/v1/chat/completions", content=b"{", headers={"X-Request-ID": "r-1"})
    assert error.headers["x-request-id"] == "r-1"


def test_cors_allow_list(api: httpx.Client) -> None:
    """An allowed origin gets preflight and response headers; another gets a 403."""
    ok = api.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == "https://shop.example"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert ok.headers["access-control-allow-headers"] == "authorization, content-type"
    denied = api.options(
        "/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in denied.headers
    simple = api.get("/v1/models", headers={"Origin": "https://shop.example"})
    assert simple.headers["access-control-allow-origin"] == "https://shop.example"
    assert "x-request-id" in simple.headers["access-control-expose-headers"]


def test_gzip_only_for_non_stream_when_asked(gateway: ServerThread) -> None:
    """A non-stream answer is gzipped when the client accepts it; a stream never is."""
    body = {"model": "deepseek-chat", "messages": MESSAGES}
    zipped = raw_exchange(
        gateway.url, body, path="/v1/chat/completions", headers={"Accept-Encoding": "gzip"}
    )
    assert zipped.header("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(zipped.body))["object"] == "chat.completion"
    plain = raw_exchange(gateway.url, body, path="/v1/chat/completions")
    assert plain.header("content-encoding") is None
    assert plain.json()["object"] == "chat.completion"
    streamed = raw_exchange(
        gateway.url,
        {**body, "stream": True},
        path="/v1/chat/completions",
        headers={"Accept-Encoding": "gzip"},
    )
    assert streamed.header("content-encoding") is None
    assert b"data: [DONE]" in streamed.body


def test_per_request_fallback_to_another_model(api: httpx.Client) -> None:
    """When the model's route refuses (401 once), a `fallbacks` model answers; without
    fallbacks the same refusal is an upstream error that names no key."""
    reasoning, content = answer_text("deepseek-reasoner", MESSAGES, config=MOCK)
    response = api.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES, "fallbacks": ["deepseek-reasoner"]},
        headers=fault("401 times=1", "fallback-model"),
    )
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["content"] == content
    assert message["reasoning_content"] == reasoning
    assert response.json()["unbroken"]["fallbacks"] == 1
    refused = api.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES},
        headers=fault("401", "no-fallback"),
    )
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "upstream_auth_failed"


@pytest.mark.parametrize(
    "fallbacks",
    [["http://evil.example/v1"], ["some-route"], "deepseek-reasoner", [1], ["m"] * 9],
)
def test_fallbacks_never_name_an_upstream_url(api: httpx.Client, fallbacks: Any) -> None:
    """`fallbacks` takes only served models and configured route names."""
    response = api.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES, "fallbacks": fallbacks},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "fallbacks"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_configured_fallback_route_takes_over(upstream: MockServer) -> None:
    """A dead first route fails over to the next configured one, and the answer is whole."""
    routes = (
        RouteSettings("dead", f"http://127.0.0.1:{_free_port()}", UPSTREAM_KEY),
        RouteSettings("backup", upstream.url, UPSTREAM_KEY),
    )
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK)
    with (
        running(make_settings(upstream.url, routes=routes)) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        read = read_stream(
            client,
            {"model": "deepseek-chat", "messages": MESSAGES, "stream": True},
            path="/v1/chat/completions",
        )
    assert read.content == content
    assert b'"route":"backup"' in read.raw  # the final event's `unbroken` field


def test_upstream_key_never_leaves_the_gateway(upstream: MockServer) -> None:
    """An upstream refusing the gateway's key yields a 502 that shows no key or key tail,
    nor do the metrics."""
    settings = make_settings(upstream.url)
    settings = Settings(
        api_key="sk-wrong-key-abcdef987654", base_url=upstream.url, gateway=settings.gateway
    )
    with running(settings) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        for stream in (False, True):
            response = client.post(
                "/v1/chat/completions",
                json={"model": "deepseek-chat", "messages": MESSAGES, "stream": stream},
            )
            assert response.status_code == 502
            text = response.text
            assert "sk-wrong" not in text
            assert "7654" not in text
            assert response.json()["error"]["code"] == "upstream_auth_failed"
        metrics = client.get("/metrics").text
    assert "sk-wrong" not in metrics


def test_failure_after_start_is_an_error_event(upstream: MockServer) -> None:
    """An upstream that keeps breaking ends the stream with an OpenAI-style error event and
    no [DONE]; a failure before any chunk is a real HTTP error status."""
    with (
        running(make_settings(upstream.url, retry_attempts=3, max_resumes=1)) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        read = read_stream(
            client,
            {"model": "deepseek-chat", "messages": MESSAGES, "stream": True},
            path="/v1/chat/completions",
            headers=fault("reset after=3", "persistent-reset"),
        )
        assert read.status == 200
        assert b"data: [DONE]" not in read.raw
        last = read.raw.strip().split(b"\n\n")[-1]
        assert last.startswith(b"id: ")  # every event has its id
        error = json.loads(last.split(b"data: ", 1)[1])["error"]
        assert error["type"] == "upstream_error"
        assert "attempts" in error["message"]
        refused = client.post(
            "/v1/chat/completions",
            json={"model": "deepseek-chat", "messages": MESSAGES, "stream": True},
            headers=fault("503", "persistent-503"),
        )
        assert refused.status_code == 502
        assert refused.json()["error"]["code"] == "upstream_error"
