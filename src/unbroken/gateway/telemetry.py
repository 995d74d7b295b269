"""OpenTelemetry traces of the gateway (the optional `[otel]` extra), with the GenAI
semantic conventions.

One span per chat request, `chat {model}`, with `gen_ai.*` request, response and usage
attributes; span events `unbroken.retry`, `unbroken.resume` and `unbroken.fallback` for the
attempts that took them (stamped when the attempt started); the W3C `traceparent` of the
span is sent upstream, and a client's `traceparent` is the span's parent. Spans go to the
tracer provider given to the gateway, or to an OTLP/HTTP exporter on
`gateway.otel_endpoint`. With neither, nothing here runs and opentelemetry is not imported
(a client's `traceparent` is then passed upstream as is). Imports opentelemetry lazily.
"""

from __future__ import annotations

import contextvars
import time
from typing import TYPE_CHECKING, Any

from unbroken.core.breaker import BreakerState
from unbroken.errors import ConfigError
from unbroken.gateway.accesslog import RequestRecord
from unbroken.instrumentation import AnswerRecord, AttemptRecord

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from unbroken.core.wire import ChatCompletion
    from unbroken.gateway.request import ChatRequest

__all__ = ["SpanHook", "Telemetry"]

_SPAN: contextvars.ContextVar[Span | None] = contextvars.ContextVar("unbroken_span", default=None)
# The request fields mapped to GenAI request attributes.
_REQUEST_ATTRIBUTES = {
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "seed": "gen_ai.request.seed",
}
_EVENT_KINDS = frozenset({"retry", "resume", "fallback"})


class SpanHook:
    """An instrumentation `Hook` that adds an event to the current request's span for each
    attempt that was a retry, a resume or a fallback."""

    def on_stream_start(self) -> None:
        """Nothing to record."""

    def on_attempt(self, record: AttemptRecord) -> None:
        """Add `unbroken.<kind>` to the current span, stamped when the attempt began."""
        span = _SPAN.get()
        if span is None or record.kind not in _EVENT_KINDS:
            return
        attributes: dict[str, Any] = {
            "unbroken.route": record.route,
            "gen_ai.request.model": record.model,
            "unbroken.attempt.outcome": record.outcome,
        }
        if record.status_code is not None:
            attributes["http.response.status_code"] = record.status_code
        started_ns = time.time_ns() - int(record.duration_s * 1e9)
        span.add_event(f"unbroken.{record.kind}", attributes, timestamp=started_ns)

    def on_answer(self, record: AnswerRecord) -> None:
        """Nothing to record (the gateway ends the span)."""

    def on_breaker(self, route: str, state: BreakerState) -> None:
        """Nothing to record."""


class Telemetry:
    """Starts and ends the gateway's spans.

    Args:
        provider: an OpenTelemetry `TracerProvider` (tests pass one with an in-memory
            exporter); default: a new SDK provider exporting to `endpoint`, if set.
        endpoint: OTLP/HTTP traces endpoint.

    Raises:
        ConfigError: an endpoint is set but the `[otel]` extra is not installed.
    """

    def __init__(self, provider: TracerProvider | None = None, endpoint: str = "") -> None:
        self._owned: Any = None
        self._tracer: Any = None
        if provider is None and not endpoint:
            return
        try:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise ConfigError(
                "gateway.otel_endpoint needs the [otel] extra: pip install 'unbroken[otel]'"
            ) from exc
        if provider is None:
            provider = self._owned = _otlp_provider(endpoint)
        self._tracer = provider.get_tracer("unbroken.gateway")
        self._propagator = TraceContextTextMapPropagator()

    @property
    def enabled(self) -> bool:
        """True when spans are recorded."""
        return self._tracer is not None

    def start(self, request: ChatRequest, traceparent: bytes | None, provider: str) -> Span:
        """Start the span of a chat request and make it current for `SpanHook`."""
        from opentelemetry.trace import SpanKind

        parent = None
        if traceparent is not None:
            parent = self._propagator.extract({"traceparent": traceparent.decode("latin-1")})
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": request.model,
            "unbroken.stream": request.stream,
        }
        for name, attribute in _REQUEST_ATTRIBUTES.items():
            value = request.extra.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[attribute] = value
        span: Span = self._tracer.start_span(
            f"chat {request.model}", context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        _SPAN.set(span)
        return span

    def inject(self, span: Span, headers: dict[str, str]) -> None:
        """Add the span's W3C `traceparent` to the upstream request's headers."""
        from opentelemetry.trace import set_span_in_context

        self._propagator.inject(headers, context=set_span_in_context(span))

    def end(self, span: Span, outcome: str, response: ChatCompletion | None) -> None:
        """Set the response attributes and end the span.

        Args:
            span: from `start`.
            outcome: `complete`, or how the answer failed.
            response: the completion (or what arrived of it), if any.
        """
        from opentelemetry.trace import StatusCode

        _SPAN.set(None)
        record = RequestRecord("", "", "", 0.0, 0.0)
        record.answer(outcome, response)
        if response is not None:
            if response.id:
                span.set_attribute("gen_ai.response.id", response.id)
            if response.model:
                span.set_attribute("gen_ai.response.model", response.model)
            reasons = [c.finish_reason for c in response.choices if c.finish_reason]
            if reasons:
                span.set_attribute("gen_ai.response.finish_reasons", reasons)
        if record.prompt_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
        if record.completion_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
        for name in ("route", "attempts", "resumes", "fallbacks", "cost_usd", "outcome"):
            value = getattr(record, name)
            if value is not None:
                span.set_attribute(f"unbroken.{name}", value)
        if record.ttft_s is not None:
            span.set_attribute("unbroken.time_to_first_token_s", record.ttft_s)
        if outcome != "complete":
            span.set_attribute("error.type", outcome)
            span.set_status(StatusCode.ERROR, outcome)
        span.end()

    def shutdown(self) -> None:
        """Flush and stop the exporter this object created (not a provider it was given)."""
        if self._owned is not None:
            self._owned.shutdown()


def _otlp_provider(endpoint: str) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            "gateway.otel_endpoint needs the [otel] extra: pip install 'unbroken[otel]'"
        ) from exc
    provider = SDKTracerProvider(resource=Resource.create({"service.name": "unbroken-gateway"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider
