"""Unit tests of core.routes: Route validation and URLs, RouteHealth."""

from __future__ import annotations

import pytest

from unbroken.core.breaker import BreakerState, CircuitBreaker
from unbroken.core.routes import DIALECTS, Route, RouteHealth
from unbroken.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "", "base_url": "https://x"}, "non-empty name"),
        ({"name": "r", "base_url": "ftp://x"}, "base_url must start with http:// or https://"),
        ({"name": "r", "base_url": "api.deepseek.com"}, "got 'api.deepseek.com'"),
        ({"name": "r", "base_url": "https://x", "dialect": "openai"}, "dialect must be one of"),
    ],
)
def test_route_rejects_invalid_values(kwargs: dict[str, str], match: str) -> None:
    """An empty name, a non-HTTP base URL or an unknown dialect raises ConfigError."""
    with pytest.raises(ConfigError, match=match):
        Route(**kwargs)  # type: ignore[arg-type]  # an invalid dialect on purpose


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_dialect_is_accepted(dialect: str) -> None:
    """All four documented dialects build a route."""
    # A plain str on purpose: a config file gives one, and the check is at run time.
    assert Route("r", "http://x", dialect=dialect).dialect == dialect  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("base_url", "beta", "url"),
    [
        ("https://api.deepseek.com", False, "https://api.deepseek.com/chat/completions"),
        ("https://api.deepseek.com/", False, "https://api.deepseek.com/chat/completions"),
        ("https://api.deepseek.com", True, "https://api.deepseek.com/beta/chat/completions"),
        ("https://api.deepseek.com/v1", True, "https://api.deepseek.com/beta/chat/completions"),
        ("https://api.deepseek.com/beta", True, "https://api.deepseek.com/beta/chat/completions"),
        ("https://api.deepseek.com/beta/", True, "https://api.deepseek.com/beta/chat/completions"),
        ("https://api.deepseek.com/beta", False, "https://api.deepseek.com/chat/completions"),
        ("https://api.deepseek.com/v1/", False, "https://api.deepseek.com/v1/chat/completions"),
        ("http://vllm:8000/v1", False, "http://vllm:8000/v1/chat/completions"),
    ],
)
def test_url(base_url: str, beta: bool, url: str) -> None:
    """Paths join the base URL; the beta base drops a `/v1` suffix before adding `/beta`."""
    assert Route("r", base_url).url("/chat/completions", beta=beta) == url


def test_custom_beta_path() -> None:
    """A route can name its own beta path segment."""
    route = Route("r", "https://x/v1", beta_path="/preview")
    assert route.url("/chat/completions", beta=True) == "https://x/preview/chat/completions"


def test_with_model() -> None:
    """with_model asks another model on the same route, named route:model unless named."""
    route = Route("ds", "https://x", api_key="sk-secret", model="deepseek-chat")
    other = route.with_model("deepseek-reasoner")
    assert (other.name, other.model, other.base_url) == (
        "ds:deepseek-reasoner",
        "deepseek-reasoner",
        "https://x",
    )
    assert other.api_key == "sk-secret"
    assert route.with_model("m", name="mine").name == "mine"
    assert route.model == "deepseek-chat"  # the original is unchanged


def test_api_key_and_headers_are_not_in_the_repr() -> None:
    """The Bearer key (and headers, which may hold one) never show in a repr."""
    route = Route("r", "https://x", api_key="sk-secret", headers={"X-Key": "hidden"})
    assert "sk-secret" not in repr(route)
    assert "hidden" not in repr(route)


def test_route_health_defaults_and_dialect_override() -> None:
    """A new RouteHealth is closed with no dropped params; an override replaces the dialect."""
    route = Route("r", "https://x", dialect="deepseek")
    health = RouteHealth()
    assert health.breaker.state is BreakerState.CLOSED
    assert health.dropped_params == set()
    assert health.dialect(route) == "deepseek"
    health.dialect_override = "instruction"
    assert health.dialect(route) == "instruction"


def test_route_health_keeps_the_given_breaker() -> None:
    """A breaker passed in is the one used."""
    breaker = CircuitBreaker(1, 1.0)
    assert RouteHealth(breaker).breaker is breaker
