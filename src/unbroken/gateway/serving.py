"""Which upstream route would serve the gateway's next answer, as far as it can tell.

Imports core and instrumentation only.
"""

from __future__ import annotations

from collections.abc import Sequence

from unbroken.core.breaker import BreakerState
from unbroken.core.routes import Route
from unbroken.instrumentation import AnswerRecord, AttemptRecord

__all__ = ["BreakerWatch"]


class BreakerWatch:
    """An instrumentation hook that follows the routes' circuit breakers.

    The client's flow starts an answer on the first route whose breaker lets traffic
    through (core.flow); `first_allowed` makes the same choice from the states the client
    reported, so the gateway can prepare a request (trim a session) for the route that
    will serve it rather than for the first one configured.
    """

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: set[str] = set()

    def first_allowed(self, routes: Sequence[Route]) -> Route:
        """The first of `routes` whose breaker is not open (the first one when all are)."""
        for route in routes:
            if route.name not in self._open:
                return route
        return routes[0]

    def on_breaker(self, route: str, state: BreakerState) -> None:
        """Remember whether `route` is skipped."""
        if state is BreakerState.OPEN:
            self._open.add(route)
        else:
            self._open.discard(route)

    def on_stream_start(self) -> None:
        """Not needed here."""

    def on_attempt(self, record: AttemptRecord) -> None:
        """Not needed here."""

    def on_answer(self, record: AnswerRecord) -> None:
        """Not needed here."""
