"""The pure parts of operating the gateway: the model list's TOML, routing decisions and
prices, proxy selection (NO_PROXY), OpenAI's reset durations, usage queries and the
access-log line."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import pytest

from unbroken.core.pricing import DEFAULT_PRICES
from unbroken.errors import ConfigError
from unbroken.gateway.accesslog import JsonFormatter, RequestIdFilter, RequestRecord
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.proxy import Proxy, ProxyConfig
from unbroken.gateway.quota import go_duration
from unbroken.gateway.routing import ModelRouter
from unbroken.gateway.usage import parse_usage_query
from unbroken.modelconf import parse_model_list
from unbroken.settings import GatewaySettings, LimitSettings, RouteSettings, Settings

ROUTES = ("a", "b")


def router(items: list[dict[str, Any]], **gateway: Any) -> ModelRouter:
    return ModelRouter(
        Settings(
            gateway=GatewaySettings(
                routes=(
                    RouteSettings("a", "http://a.example/v1", model="a-default"),
                    RouteSettings("b", "http://b.example/v1", dialect="vllm"),
                ),
                model_list=parse_model_list(items, ROUTES),
                **gateway,
            )
        )
    )


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ("x", "must be an array of tables"),
        ([1], "must be a table"),
        ([{"name": "m", "routes": ["a"], "colour": 1}], "unknown key(s) in gateway.model_list[0]"),
        ([{"routes": ["a"]}], "name must be a non-empty string"),
        ([{"name": "m"}], "routes must list at least one route"),
        ([{"name": "m", "routes": ["zz"]}], "route 'zz' is not configured"),
        (
            [{"name": "m", "routes": [{"route": "a", "x": 1}]}],
            "unknown key(s) in gateway.model_list[0].routes[0]",
        ),
        ([{"name": "m", "routes": [3]}], "must be a route name or a table"),
        (
            [{"name": "m", "routes": ["a"]}, {"name": "n", "aliases": ["m"], "routes": ["a"]}],
            "listed twice",
        ),
        ([{"name": "m", "routes": ["a"], "aliases": "x"}], "aliases must be a list"),
        (
            [{"name": "m", "routes": ["a"], "context_tokens": 0}],
            "context_tokens must be an integer",
        ),
        ([{"name": "m", "routes": ["a"], "price": {"input": 1}}], "needs `input` and `output`"),
        (
            [{"name": "m", "routes": ["a"], "price": {"input": -1, "output": 1}}],
            "must be a number >= 0",
        ),
        (
            [{"name": "m", "routes": ["a"], "price": {"input": 1, "output": 1, "x": 1}}],
            "unknown key(s)",
        ),
        ([{"name": "m", "routes": ["a"], "price": 3}], "must be a table"),
    ],
)
def test_model_list_errors_name_the_entry(items: Any, message: str) -> None:
    """A malformed model list is a ConfigError naming the entry and what is wrong."""
    with pytest.raises(ConfigError) as info:
        parse_model_list(items, ROUTES)
    assert message in info.value.message


def test_routes_follow_the_model_list() -> None:
    """Names, aliases and patterns get their own targets in order; a target without a
    model asks for the route's own model, or else passes the requested name through."""
    r = router(
        [
            {"name": "fast", "aliases": ["chat"], "routes": [{"route": "a", "model": "x"}, "b"]},
            {"name": "plain", "routes": ["a"], "context_tokens": 4096},
            {"name": "org/*", "routes": ["b"]},
        ]
    )
    fast = r.routes_for("chat")
    assert fast is not None
    assert [(x.name, x.model) for x in fast] == [("a:x", "x"), ("b", None)]
    plain = r.routes_for("plain")
    assert plain is not None
    assert [(x.name, x.model, x.context_tokens) for x in plain] == [("a", "a-default", 4096)]
    wild = r.routes_for("org/llama-3")
    assert wild is not None
    assert [(x.name, x.model, x.dialect) for x in wild] == [("b", None, "vllm")]
    assert r.routes_for("other") is None
    assert "org/anything" in r.served
    assert "other" not in r.served
    assert 3 not in r.served
    assert sorted(r.served) == ["chat", "fast", "plain"]
    assert r.served & {"fast", "other", "org/x"} == frozenset({"fast", "org/x"})
    assert r.fallback_routes(["b", "plain", "unknown"])[0] == "b"
    expanded = r.fallback_routes(["plain"])
    assert [getattr(x, "name", x) for x in expanded] == ["a"]


def test_prices_come_from_the_model_list_then_the_built_in_table() -> None:
    """A priced entry prices its public names and upstream models; a pattern prices what it
    matches; other models keep the built-in price."""
    r = router(
        [
            {
                "name": "fast",
                "routes": [{"route": "a", "model": "up"}],
                "price": {"input": 2, "output": 8},
            },
            {
                "name": "org/*",
                "routes": ["b"],
                "price": {"input": 1, "output": 3, "cached_input": 0.5},
            },
        ]
    )
    for name in ("fast", "up"):
        price = r.prices.price(name)
        assert price is not None
        assert (price.cache_hit, price.cache_miss, price.output) == (2, 2, 8)
    price = r.prices.price("org/m")
    assert price is not None
    assert (price.cache_hit, price.cache_miss, price.output) == (0.5, 1, 3)
    assert r.prices.price("deepseek-v4-pro") == DEFAULT_PRICES["deepseek-v4-pro"]
    assert r.prices.price("nobody") is None


@pytest.mark.anyio
async def test_discovery_lists_then_passes_through() -> None:
    """With no list DeepSeek's names are served until the upstream's /models is asked;
    then its names are; a 404 there means pass-through, and so does an upstream that
    cannot answer (asked again soon, not on every request)."""
    from unbroken.errors import UpstreamConnectError, UpstreamStatusError

    r = router([])
    assert r.discovers
    assert sorted(r.served) == ["deepseek-chat", "deepseek-reasoner"]
    assert "anything" not in r.served
    calls = 0

    async def listing() -> list[Any]:
        nonlocal calls
        calls += 1
        return [{"id": "m1"}, {"id": ""}, {"x": 1}, "junk"]

    await r.refresh(listing, 0.0)
    await r.refresh(listing, 10.0)
    assert calls == 1
    assert sorted(r.served) == ["m1"]
    assert "m2" not in r.served

    async def missing() -> list[Any]:
        raise UpstreamStatusError("no", status_code=404)

    await r.refresh(missing, 1000.0)
    assert "m2" in r.served
    assert sorted(r.served) == ["deepseek-chat", "deepseek-reasoner"]

    async def down() -> list[Any]:
        raise UpstreamConnectError("down")

    async def failing() -> list[Any]:
        raise UpstreamStatusError("busy", status_code=503)

    await r.refresh(listing, 2000.0)
    assert "m2" not in r.served
    await r.refresh(down, 5000.0)
    assert "m2" in r.served
    assert sorted(r.served) == ["m1"]
    await r.refresh(failing, 5031.0)
    assert "m2" in r.served
    static = router([], models=("only",))
    assert not static.discovers
    await static.refresh(listing, 0.0)
    assert calls == 2  # the listing at 2000 s, none for the static router


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("", "api.example.com", 443, False),
        ("*", "api.example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("api.example.com:8443", "api.example.com", 443, False),
        ("api.example.com:443", "api.example.com", 443, True),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "example.com", 443, False),
        ("[::1]:443", "::1", 443, True),
        ("::1", "::1", 443, True),
    ],
)
def test_no_proxy_matching(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    """NO_PROXY takes hosts, domains, host:port, CIDR ranges and `*`."""
    config = ProxyConfig.from_env({"HTTPS_PROXY": "proxy:3128", "NO_PROXY": no_proxy})
    assert (config.select("https", host, port) is None) is bypass


def test_proxy_urls() -> None:
    """Proxy URLs: scheme optional, credentials become Basic auth (never in the label),
    https and socks proxies are refused, ALL_PROXY covers both schemes."""
    proxy = Proxy.parse("http://u%40x:p@h:3128", "HTTPS_PROXY")
    assert (proxy.host, proxy.port, proxy.label) == ("h", 3128, "h:3128")
    assert proxy.authorization == b"Basic dUB4OnA="
    assert "p@" not in repr(proxy)
    assert Proxy.parse("h", "HTTP_PROXY").port == 80
    with pytest.raises(ConfigError, match="HTTPS_PROXY must be an http://host:port"):
        Proxy.parse("socks5://h:1080", "HTTPS_PROXY")
    with pytest.raises(ConfigError, match="malformed port"):
        Proxy.parse("http://h:99999", "HTTP_PROXY")
    every = ProxyConfig.from_env({"ALL_PROXY": "http://all:1"})
    assert every.select("http", "x", 80) == every.select("https", "x", 443)
    assert ProxyConfig.from_env({}).select("https", "x", 443) is None
    assert Settings.from_env({"https_proxy": "http://p:1", "NO_PROXY": "a"}).proxy_env == (
        ("HTTPS_PROXY", "http://p:1"),
        ("NO_PROXY", "a"),
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0ms"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (7325.25, "2h2m5.25s")],
)
def test_reset_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    """x-ratelimit-reset-* values use Go's duration format, as OpenAI sends them."""
    assert go_duration(seconds) == text


def test_usage_queries() -> None:
    """Defaults, explicit ranges, admin-only keys and price_at are checked."""
    prices = router([]).prices
    now = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC).timestamp()
    user = Caller("k:1", "alice", LimitSettings())
    admin = Caller("k:2", "ops", LimitSettings(), role="admin")
    query = parse_usage_query({}, user, prices, now)
    assert (str(query.start), str(query.end), query.key) == ("2026-11-28", "2026-12-04", "alice")
    query = parse_usage_query(
        {"key": "*", "start": "2026-12-01", "end": "2026-12-02"}, admin, prices, now
    )
    assert (str(query.start), query.key) == ("2026-12-01", None)
    for params, code in [
        ({"key": "bob"}, "admin_required"),
        ({"days": "0"}, "invalid_value"),
        ({"days": "x"}, "invalid_value"),
        ({"days": "\u00b3"}, "invalid_value"),
        ({"start": "2026-13-01"}, "invalid_value"),
        ({"start": "2026-12-05"}, "invalid_value"),
        ({"start": "2020-01-01"}, "invalid_value"),
        ({"price_at": "no-such-model"}, "invalid_value"),
    ]:
        with pytest.raises(GatewayError) as info:
            parse_usage_query(params, user, prices, now)
        assert info.value.code == code


def test_access_line_text_and_json() -> None:
    """The access line names the request's facts in text and as flat JSON fields; every
    record gets the current request id, `-` outside a request."""
    record = RequestRecord.begin("rid-1", "POST", "/v1/chat/completions")
    log = logging.makeLogRecord({"msg": "inside", "levelname": "WARNING", "name": "x"})
    assert RequestIdFilter().filter(log)
    assert getattr(log, "request_id", None) == "rid-1"
    record.key, record.model, record.error = "alice", "m", "boom"
    record.outcome = "SomeExceptionName"
    record.finish(502)
    assert record.outcome == "failed"  # only known outcomes are kept
    line = record.line()
    assert line.startswith("POST /v1/chat/completions 502 key=alice model=m outcome=failed")
    assert "error=boom" in line
    outside = logging.makeLogRecord({"msg": "outside"})
    RequestIdFilter().filter(outside)
    assert getattr(outside, "request_id", None) == "-"
    access = logging.makeLogRecord(
        {"msg": "%s", "args": (line,), "access": record.fields(), "request_id": "rid-1"}
    )
    data = json.loads(JsonFormatter().format(access))
    assert data["request_id"] == "rid-1"
    assert data["status"] == 502
    assert data["key"] == "alice"
    assert data["message"] == line


def test_answer_outcomes_are_a_fixed_set_never_class_names() -> None:
    """The outcome label of an answer that failed is an error kind, a timeout phase,
    `connect_error`, `protocol_error` or `error`, also through RetriesExhausted."""
    from unbroken.client._common import _error_outcome
    from unbroken.errors import (
        ProtocolError,
        ResumeError,
        RetriesExhausted,
        UpstreamConnectError,
        UpstreamStatusError,
        UpstreamTimeout,
        retries_exhausted,
    )

    reset = UpstreamConnectError("reset")
    overloaded = UpstreamStatusError("busy", status_code=503, kind="overloaded")
    exhausted = retries_exhausted("gave up", attempts=3, last=overloaded)
    exhausted.__cause__ = overloaded
    broken = RetriesExhausted("gave up", attempts=2)
    broken.__cause__ = ProtocolError("bad chunk")
    cases = {
        reset: "connect_error",
        overloaded: "overloaded",
        UpstreamTimeout("slow", phase="first_token", timeout_s=1.0): "timeout_first_token",
        exhausted: "overloaded",
        broken: "protocol_error",
        ResumeError("gone"): "error",
    }
    for error, outcome in cases.items():
        assert _error_outcome(error) == outcome
