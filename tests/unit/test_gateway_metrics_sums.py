"""The gateway's metrics show at each scrape what was counted before it, though requests and
answers add to sums that reach the collectors only when the registry is collected."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from unbroken.gateway import metrics as metrics_module
from unbroken.gateway.metrics import GatewayMetrics


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_scrape_shows_what_was_counted_before_it() -> None:
    registry = CollectorRegistry()
    m = GatewayMetrics(registry)
    for _ in range(3):
        m.request("/v1/chat/completions", 200)
    m.request("/nowhere", 404)
    m.observe("/v1/chat/completions", "complete", 0.01)
    m.observe("/v1/chat/completions", "complete", 7.0)
    m.stream_ended("complete")
    m.active.inc()
    m.active.inc()
    m.active.dec()
    m.chunks.inc(5)
    m.chunks_direct.inc(4)
    m.keepalives.inc(2)
    m.stream_writers.inc()

    chat = "/v1/chat/completions"
    requests = "unbroken_gateway_requests_total"
    assert _value(registry, requests, endpoint=chat, status="200") == 3
    assert _value(registry, requests, endpoint="other", status="404") == 1
    duration = "unbroken_gateway_request_duration_seconds"
    assert _value(registry, f"{duration}_count", endpoint=chat, outcome="complete") == 2
    assert _value(registry, f"{duration}_sum", endpoint=chat, outcome="complete") == 7.01
    assert (
        _value(registry, f"{duration}_bucket", endpoint=chat, outcome="complete", le="0.025") == 1
    )
    assert _value(registry, f"{duration}_bucket", endpoint=chat, outcome="complete", le="10.0") == 2
    assert _value(registry, "unbroken_gateway_streams_total", outcome="complete") == 1
    assert _value(registry, "unbroken_gateway_active_requests") == 1
    assert _value(registry, "unbroken_gateway_chunks_total") == 5
    assert _value(registry, "unbroken_gateway_chunks_direct_total") == 4
    assert _value(registry, "unbroken_gateway_keepalives_total") == 2
    assert _value(registry, "unbroken_gateway_stream_writers") == 1

    # Counted after a scrape: added once, at the next.
    m.request(chat, 200)
    m.active.dec()
    m.stream_writers.dec()
    text = m.render().decode()
    assert f'{requests}{{endpoint="{chat}",status="200"}} 4.0' in text
    assert "unbroken_gateway_active_requests 0.0" in text
    assert generate_latest(registry).decode().count("unbroken_gateway_stream_writers 0.0") == 1
    assert _value(registry, requests, endpoint=chat, status="200") == 4


def test_past_the_bound_of_kept_series_a_request_is_counted_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "_MAX_CHILDREN", 1)
    registry = CollectorRegistry()
    m = GatewayMetrics(registry)
    m.request("/healthz", 200)  # kept
    m.request("/healthz", 503)  # past the bound
    m.stream_ended("error")
    m.observe("/healthz", "ok", 0.001)
    m.observe("/healthz", "rejected", 0.001)
    requests = "unbroken_gateway_requests_total"
    assert _value(registry, requests, endpoint="/healthz", status="200") == 1
    assert _value(registry, requests, endpoint="/healthz", status="503") == 1
    assert _value(registry, "unbroken_gateway_streams_total", outcome="error") == 1
    count = "unbroken_gateway_request_duration_seconds_count"
    assert _value(registry, count, endpoint="/healthz", outcome="ok") == 1
    assert _value(registry, count, endpoint="/healthz", outcome="rejected") == 1
