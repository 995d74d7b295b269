"""Failover conduct against the mock: one row per rule, each asserting how many requests
reached which route and the gaps between them, from the mock's own request log (not from
what the client says it did).

Routes are told apart in the log by the model they ask for: the primary asks for
`deepseek-chat`, the fallback for `deepseek-reasoner`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import unbroken
from unbroken import Client, RetryPolicy, Route
from unbroken.client._driver import map_transport_error
from unbroken.mock import FaultRule, MockConfig, MockServer

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Explain failover briefly."}]
PRIMARY = "deepseek-chat"
FALLBACK = "deepseek-reasoner"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=11)) as server:
        yield server


@dataclass
class Row:
    """One rule: the primary's fault, whether a fallback route exists, and what the log
    must show."""

    rule: str
    fault: str
    fallback: bool
    primary_requests: int
    fallback_requests: int
    min_gap_s: float = 0.0  # every gap between the primary's requests is at least this
    max_gap_s: float | None = None  # and at most this
    fails: bool = False  # the answer ends in a typed error
    route_kwargs: dict[str, Any] = field(default_factory=dict)
    use_model_fallback: bool = False


ROWS = [
    Row("429 without Retry-After: >= 1 s apart, then the fallback", "429", True, 3, 1, 1.0),
    Row(
        "429 without Retry-After, no fallback: keeps waiting >= 1 s",
        "429 times=3",
        False,
        4,
        0,
        1.0,
    ),
    Row("429 with Retry-After: honoured", "429 retry_after=1 times=2", True, 3, 0, 0.95),
    Row("5xx: one quick retry, then the fallback", "503", True, 2, 1, 0.0, 0.5),
    Row(
        "context_length_exceeded: the next route whose context is unknown, no resend",
        "context_length times=1",  # the fallback model shares the route's fault header
        True,
        1,
        1,
        route_kwargs={"context_tokens": 8192},
        use_model_fallback=True,
    ),
    Row(
        "content-policy refusal: returned after one attempt",
        "content_filter",
        True,
        1,
        0,
        fails=True,
    ),
    Row(
        "content-policy refusal with the per-route opt-in: routed around",
        "content_filter",
        True,
        1,
        1,
        route_kwargs={"reroute_refusals": True},
    ),
]


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("row", ROWS, ids=[r.rule for r in ROWS])
def test_failover_conduct(upstream: MockServer, row: Row) -> None:
    """Each rule of polite, fast failover, checked against the mock's request log."""
    upstream.reset()
    key = f"{row.rule}-{time.time()}"
    primary = Route(
        "primary",
        upstream.url,
        api_key="sk",
        headers={"X-Mock-Fault": row.fault, "X-Mock-Fault-Key": key},
        **row.route_kwargs,
    )
    routes = [primary]
    fallbacks = None
    if row.fallback and row.use_model_fallback:
        fallbacks = [FALLBACK]  # a fallback given by model name, on the same server
    elif row.fallback:
        routes.append(Route("fallback", upstream.url, api_key="sk", model=FALLBACK))
    with Client(routes=routes, retry=RetryPolicy(attempts=8)) as client:
        if row.fails:
            with pytest.raises(unbroken.UnbrokenError):
                client.chat.completions.create(
                    model=PRIMARY, messages=MESSAGES, fallbacks=fallbacks
                )
        else:
            done = client.chat.completions.create(
                model=PRIMARY, messages=MESSAGES, fallbacks=fallbacks
            )
            assert done.choices[0].finish_reason == "stop"
    log = [e for e in upstream.log(1000) if "chat" in str(e["path"])]
    on_primary = [float(e["time"]) for e in log if e["model"] == PRIMARY]
    on_fallback = [e for e in log if e["model"] == FALLBACK]
    assert (len(on_primary), len(on_fallback)) == (row.primary_requests, row.fallback_requests)
    gaps = _gaps(on_primary)
    assert all(g >= row.min_gap_s for g in gaps), gaps
    if row.max_gap_s is not None:
        assert all(g <= row.max_gap_s for g in gaps), gaps
    # At most 4 attempts on a route in any 3 s.
    assert all(b - a >= 3.0 - 0.05 for a, b in zip(on_primary, on_primary[4:], strict=False))
    assert all(e["status"] == 200 for e in on_fallback)


def test_unknown_host_is_not_retried_on_its_route(upstream: MockServer) -> None:
    """A host name that does not resolve is a permanent error: the fallback at once (the
    mock sees one request), or the error after one attempt when there is none."""
    upstream.reset()
    dead = Route("dead", "http://nonexistent-host.invalid", api_key="sk")
    live = Route("live", upstream.url, api_key="sk", model=FALLBACK)
    with Client(routes=[dead, live]) as client:
        done = client.chat.completions.create(model=PRIMARY, messages=MESSAGES)
    assert done.unbroken is not None
    assert [(a.route, a.outcome) for a in done.unbroken.attempts] == [
        ("dead", "unreachable"),
        ("live", "complete"),
    ]
    assert [e["model"] for e in upstream.log(100) if "chat" in str(e["path"])] == [FALLBACK]
    started = time.monotonic()
    with Client(routes=[dead]) as client, pytest.raises(unbroken.UpstreamConnectError) as info:
        client.chat.completions.create(model=PRIMARY, messages=MESSAGES)
    assert info.value.kind == "unreachable"
    assert time.monotonic() - started < 5.0  # no backoff ladder


def test_certificate_failure_is_permanent() -> None:
    """A certificate that does not verify maps to the permanent kind (never retried)."""
    route = Route("tls", "https://self-signed.example", api_key="sk")
    exc = httpx.ConnectError(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
    )
    assert map_transport_error(exc, route, got_headers=False).kind == "unreachable"  # type: ignore[attr-defined]
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    assert map_transport_error(refused, route, got_headers=False).kind == "server_error"  # type: ignore[attr-defined]


def test_breaker_probes_the_primary_back_within_ten_seconds(upstream: MockServer) -> None:
    """After an outage (503 for 3 s), the primary's breaker half-opens and a probe puts
    traffic back on it within 10 s of its recovery; meanwhile answers come from the
    fallback. Times are the mock's own."""
    with MockServer(MockConfig(seed=11, faults=(FaultRule("503", first_s=3.0),))) as primary_mock:
        upstream.reset()
        primary_mock.reset()
        recovered_at = time.time() + 3.0
        routes = [
            Route("primary", primary_mock.url, api_key="sk"),
            Route("fallback", upstream.url, api_key="sk", model=FALLBACK),
        ]
        with Client(routes=routes) as client:
            deadline = time.monotonic() + 16.0
            while time.monotonic() < deadline:
                done = client.chat.completions.create(model=PRIMARY, messages=MESSAGES)
                assert done.choices[0].finish_reason == "stop"
                back = [
                    e for e in primary_mock.log(1000) if e["status"] == 200 and "chat" in e["path"]
                ]
                if back:
                    break
                time.sleep(0.5)  # a steady trickle of answers, as traffic would be
        served = [e for e in primary_mock.log(1000) if "chat" in str(e["path"])]
    first_ok = next(float(e["time"]) for e in served if e["status"] == 200)
    assert first_ok - recovered_at <= 10.0
    # The breaker kept most answers off the primary during the outage: far fewer requests
    # reached it than the ~2 per answer it would take without one.
    failed = [e for e in served if e["status"] == 503]
    assert len(failed) < 2 * len([e for e in upstream.log(1000) if "chat" in str(e["path"])])
