"""The gateway's view of the serving route (BreakerWatch), the session budget per route, and
the typed SessionNotFound the session endpoints rely on."""

from __future__ import annotations

import pytest

from unbroken.core.breaker import BreakerState
from unbroken.core.routes import Route
from unbroken.errors import SessionNotFound, StoreError
from unbroken.gateway.serving import BreakerWatch
from unbroken.gateway.sessions import session_budget
from unbroken.sessions.store import MemorySessionStore

A = Route("a", "http://a.test", context_tokens=4096)
B = Route("b", "http://b.test", dialect="vllm")


def test_first_allowed_follows_reported_breakers() -> None:
    watch = BreakerWatch()
    assert watch.first_allowed([A, B]) is A
    watch.on_breaker("a", BreakerState.OPEN)
    assert watch.first_allowed([A, B]) is B
    watch.on_breaker("b", BreakerState.OPEN)
    assert watch.first_allowed([A, B]) is A  # all open: the first is still tried
    watch.on_breaker("a", BreakerState.HALF_OPEN)
    assert watch.first_allowed([A, B]) is A
    watch.on_breaker("a", BreakerState.OPEN)
    watch.on_breaker("b", BreakerState.CLOSED)
    assert watch.first_allowed([A, B]) is B


@pytest.mark.parametrize(
    ("route", "max_tokens", "budget"),
    [
        (A, None, 4096 - 2048),  # the 8K reserve is capped at half the window
        (A, 1000, 4096 - 1000),
        (A, True, 4096 - 2048),  # a bool is not a token count
        (A, 0, 4096 - 2048),
        (B, None, 128_000 - 8_192),  # unknown window: DeepSeek's 128K
        (B, 100, 128_000 - 100),
    ],
)
def test_session_budget(route: Route, max_tokens: object, budget: int) -> None:
    assert session_budget(route, max_tokens) == budget


def test_missing_session_is_typed() -> None:
    with pytest.raises(SessionNotFound) as caught:
        MemorySessionStore().load("nope")
    assert caught.value.session_id == "nope"
    assert isinstance(caught.value, StoreError)
    assert "nope" in str(caught.value)
