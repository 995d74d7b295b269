"""Booking what answers used, through store outages: a delivered answer is never failed
because its usage could not be written. A settlement the store refuses is queued and
retried in the background until the store is back (in order, each step once; see
`Limiter.finish`), and every store failure the gateway rides out is counted by outcome in
`unbroken_gateway_store_failures_total`. Imports prometheus_client and gateway siblings.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from unbroken.errors import StoreError
from unbroken.gateway.limits import Admission, Limiter

__all__ = ["Bookings"]

logger = logging.getLogger(__name__)

# Settlements kept while the store is down; past this the oldest are dropped (and counted):
# a day-long outage must not grow memory without bound. ~200 bytes each.
MAX_PENDING = 100_000
# Retry pacing while the store is down: short, so recovery is immediate in practice.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 1.0


class Bookings:
    """Settles admissions, queueing the ones the store cannot take now.

    Args:
        limiter: the limiter whose `finish` books usage.
        registry: where the failure counter and the pending gauge live.
        max_pending: the queue bound.
        clock: Unix time.
    """

    def __init__(
        self,
        limiter: Limiter,
        registry: CollectorRegistry,
        *,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = limiter
        self._max_pending = max_pending
        self._clock = clock
        self._queue: collections.deque[tuple[Admission, int | None, float]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self.failures = Counter(
            "unbroken_gateway_store_failures_total",
            "Store failures the gateway rode out, by outcome: admit_open (served without "
            "limits), admit_closed (refused with 503), booking_deferred (usage queued), "
            "booking_dropped (queue full), session_turn_lost (answer delivered, turn not kept)",
            ["outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "unbroken_gateway_bookings_pending",
            "Usage bookings waiting for the store to come back",
            registry=registry,
        )

    @property
    def n_pending(self) -> int:
        """Settlements waiting for the store."""
        return len(self._queue)

    def count_failure(self, outcome: str) -> None:
        """Count one store failure by its outcome."""
        self.failures.labels(outcome).inc()

    async def settle(self, admission: Admission, tokens: int | None, cost_usd: float) -> None:
        """Release `admission` and book its usage now, or queue it if the store fails."""
        if not self._queue:
            try:
                await self._limiter.finish(admission, tokens, cost_usd, self._clock())
                return
            except StoreError as exc:
                logger.warning("store unavailable; usage booking queued: %s", exc)
        self._defer(admission, tokens, cost_usd)

    def _defer(self, admission: Admission, tokens: int | None, cost_usd: float) -> None:
        self.count_failure("booking_deferred")
        if len(self._queue) >= self._max_pending:
            self._queue.popleft()
            self.count_failure("booking_dropped")
        self._queue.append((admission, tokens, cost_usd))
        self.pending.set(len(self._queue))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        delay = RETRY_FIRST_S
        while self._queue:
            admission, tokens, cost_usd = self._queue[0]
            try:
                await self._limiter.finish(admission, tokens, cost_usd, self._clock())
            except StoreError:
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            delay = RETRY_FIRST_S
            self._queue.popleft()
            self.pending.set(len(self._queue))
        logger.info("store back; queued usage bookings written")

    async def aclose(self) -> None:
        """Stop retrying; what is still queued is lost (and logged)."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        if self._queue:
            logger.warning("%d usage bookings not written: the store was down", len(self._queue))
