"""OpenTelemetry spans of the gateway, read from the SDK's in-memory exporter: GenAI
attributes and usage, span events for retry, resume and fallback, the client's
traceparent as parent, the span's traceparent sent upstream, and the OTLP exporter
posting to a configured endpoint."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_gateway_routing import QWEN, FakeVLLM
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.modelconf import ModelSettings, ModelTarget
from unbroken.settings import GatewaySettings, RouteSettings, Settings

pytest.importorskip("opentelemetry.sdk", reason="the [otel] extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Trace me."}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(
        MockConfig(seed=8, answer_tokens=(12, 16), api_keys=frozenset({"sk-up"}))
    ) as server:
        yield server


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def provider_for(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def settings_for(mock: MockServer) -> Settings:
    return Settings(
        api_key="sk-up",
        gateway=GatewaySettings(
            routes=(
                # A key the mock refuses (401): requests for `sturdy` fall back.
                RouteSettings("locked", mock.url, "sk-revoked"),
                RouteSettings("mock", mock.url, "sk-up"),
            ),
            model_list=(
                ModelSettings("deepseek-chat", (ModelTarget("mock"),)),
                ModelSettings(
                    "sturdy",
                    (ModelTarget("locked", "deepseek-chat"), ModelTarget("mock", "deepseek-chat")),
                ),
            ),
            forward_headers=("x-mock-*",),
            retry_attempts=3,
            retry_wait_initial_s=0.01,
            retry_wait_max_s=0.02,
        ),
    )


def post(client: httpx.Client, model: str, fault: str | None = None, **headers: str) -> Any:
    if fault is not None:
        headers = {**headers, "X-Mock-Fault": fault, "X-Mock-Fault-Key": uuid.uuid4().hex}
    body = {"model": model, "messages": MESSAGES, "stream": True, "temperature": 0.5}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


def events(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


def test_spans_carry_genai_attributes_usage_and_retry_resume_fallback_events(
    mock: MockServer, exporter: InMemorySpanExporter
) -> None:
    """One span per chat request, named `chat <model>`, with gen_ai.* request, response
    and usage attributes, the client's trace as parent, and one event per retry, resume
    or fallback."""
    app = create_app(settings_for(mock), tracer_provider=provider_for(exporter))
    with (
        ServerThread(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        post(client, "deepseek-chat", traceparent=TRACEPARENT)
        post(client, "deepseek-chat", "503 times=1")
        post(client, "deepseek-chat", "reset after=4 times=1")
        post(client, "sturdy")
        client.get("/healthz")
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["chat deepseek-chat"] * 3 + ["chat sturdy"]
    plain, retried, resumed, fell_back = spans
    attributes: dict[str, Any] = dict(plain.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "deepseek"
    assert attributes["gen_ai.request.model"] == "deepseek-chat"
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.response.model"] == "deepseek-chat"
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] >= 12
    assert attributes["unbroken.outcome"] == "complete"
    assert plain.parent is not None
    assert f"{plain.context.trace_id:032x}" == TRACE_ID
    assert events(plain) == []
    assert events(retried) == ["unbroken.retry"]
    assert events(resumed) == ["unbroken.resume"]
    assert "unbroken.fallback" in events(fell_back)
    fallback = next(e for e in fell_back.events if e.name == "unbroken.fallback")
    assert dict(fallback.attributes or {})["unbroken.route"] == "mock:deepseek-chat"
    assert dict(fell_back.attributes or {})["unbroken.route"] == "mock:deepseek-chat"
    assert dict(fell_back.attributes or {})["unbroken.fallbacks"] == 1


def test_traceparent_goes_upstream(exporter: InMemorySpanExporter) -> None:
    """The upstream gets the gateway span's traceparent (same trace as the client's); with
    tracing off, the client's own traceparent is passed through."""
    vllm = FakeVLLM((QWEN,))
    with ServerThread(vllm) as upstream:
        settings = Settings(api_key="sk-vllm", base_url=upstream.url + "/v1")
        traced = create_app(settings, tracer_provider=provider_for(exporter))
        for app in (traced, create_app(settings)):
            with (
                ServerThread(app, lifespan="on") as server,
                httpx.Client(base_url=server.url, timeout=20) as client,
            ):
                post(client, QWEN, traceparent=TRACEPARENT)
    (span,) = exporter.get_finished_spans()
    sent_traced, sent_plain = (h["traceparent"] for h in vllm.headers)
    assert sent_traced == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert sent_plain == TRACEPARENT


def test_otlp_exporter_posts_to_the_configured_endpoint(mock: MockServer) -> None:
    """With gateway.otel_endpoint set, spans are exported over OTLP/HTTP (protobuf) to it;
    the exporter flushes when the gateway stops."""
    received: list[tuple[str, bytes, bytes]] = []

    async def collector(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        kind = dict(scope["headers"]).get(b"content-type", b"")
        received.append((scope["path"], kind, body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with ServerThread(collector) as otlp:
        settings = Settings(
            api_key="sk-up",
            base_url=mock.url,
            gateway=GatewaySettings(otel_endpoint=otlp.url + "/v1/traces"),
        )
        with (
            ServerThread(create_app(settings), lifespan="on") as server,
            httpx.Client(base_url=server.url, timeout=20) as client,
        ):
            post(client, "deepseek-chat")
    assert [(path, kind) for path, kind, _ in received] == [
        ("/v1/traces", b"application/x-protobuf")
    ]
    assert b"chat deepseek-chat" in received[0][2]
    assert b"gen_ai.usage.output_tokens" in received[0][2]
