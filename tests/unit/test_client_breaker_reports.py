"""The hooks hear of every breaker state once: when it is first seen and after each
change, however the reports are skipped while nothing changed."""

from __future__ import annotations

from typing import Any

from unbroken.client._common import ClientConfig
from unbroken.core.breaker import BreakerState, CircuitBreaker
from unbroken.core.routes import Route


class _Breakers:
    def __init__(self) -> None:
        self.seen: list[tuple[str, BreakerState]] = []

    def on_stream_start(self) -> None:
        pass

    def on_attempt(self, record: Any) -> None:
        pass

    def on_answer(self, record: Any) -> None:
        pass

    def on_breaker(self, route: str, state: BreakerState) -> None:
        self.seen.append((route, state))


def _config(hook: _Breakers, *names: str) -> ClientConfig:
    routes = [Route(name, "http://127.0.0.1:9", api_key="sk") for name in names]
    return ClientConfig.build(
        None, None, {"routes": routes, "hooks": [hook], "breaker_threshold": 1}
    )


def test_each_change_is_reported_once_on_the_same_routes() -> None:
    hook = _Breakers()
    config = _config(hook, "a", "b")
    routes = config.routes
    config.route_maps(routes)
    config.report_breakers(routes)
    assert hook.seen == [("a", BreakerState.CLOSED), ("b", BreakerState.CLOSED)]
    config.report_breakers(routes)
    assert len(hook.seen) == 2  # nothing changed
    config.health["b"].breaker.record_failure(0.0)  # threshold 1: open
    config.report_breakers(routes)
    assert hook.seen[2:] == [("b", BreakerState.OPEN)]
    config.report_breakers(routes)
    assert len(hook.seen) == 3
    assert config.health["b"].breaker.allow(10.0)  # the cooldown is over: a probe
    config.report_breakers(routes)
    assert hook.seen[3:] == [("b", BreakerState.HALF_OPEN)]


def test_a_change_made_elsewhere_is_still_reported() -> None:
    """A breaker that changed while other routes were reported (or one made since) is
    reported with the routes it belongs to."""
    hook = _Breakers()
    config = _config(hook, "a")
    routes = config.routes
    config.route_maps(routes)
    config.report_breakers(routes)
    other = CircuitBreaker(1, 5.0)  # another client's breaker changing meanwhile
    other.record_failure(0.0)
    config.health["a"].breaker.record_failure(0.0)
    config.report_breakers([Route("x", "http://127.0.0.1:9", api_key="sk")])
    config.report_breakers(routes)
    assert hook.seen == [("a", BreakerState.CLOSED), ("a", BreakerState.OPEN)]


def test_changes_are_counted_only_when_the_state_moves() -> None:
    breaker = CircuitBreaker(3, 5.0)
    before = CircuitBreaker.changes
    breaker.record_failure(0.0)  # closed, still closed
    breaker.record_success(0.0)
    assert CircuitBreaker.changes == before
    for _ in range(3):
        breaker.record_failure(0.0)
    assert CircuitBreaker.changes == before + 1
