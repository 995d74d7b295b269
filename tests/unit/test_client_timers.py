"""The async engine's stream timers share one heap per event loop (`client._engine._Timers`):
an armed timer fires at its expiry, a disarmed one never, and the entries of disarmed
timers do not pile up in the heap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from unbroken.client._engine import _StreamTimer, _timers
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Attempt, Timeouts
from unbroken.core.flow import AttemptPlan
from unbroken.core.routes import Route

pytestmark = pytest.mark.anyio

ROUTE = Route("primary", "https://api.example")
# Only the headers timer runs: it expires once, 50 ms after the request.
TIMEOUTS = Timeouts(headers_s=0.05, first_token_s=None, idle_s=None)


class _Abort:
    """A connection's abort, as the timer calls it."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.abort = call


def _attempt() -> Attempt:
    plan = AttemptPlan(route=ROUTE, body={})
    return Attempt(plan, ChunkAccumulator(), now=time.monotonic(), timeouts=TIMEOUTS)


async def test_disarmed_timers_leave_the_heap_and_never_fire() -> None:
    """200 timers disarmed at once, one left armed: the heap is compacted (not 201
    entries), the armed one aborts its connection at its expiry, the others never do."""
    loop = asyncio.get_running_loop()
    aborted: list[str] = []
    done = asyncio.Event()

    def live_abort() -> None:
        aborted.append("live")
        done.set()

    live = _StreamTimer(loop, _attempt(), _Abort(live_abort))
    live._arm()
    for _ in range(200):
        dead = _StreamTimer(loop, _attempt(), _Abort(lambda: aborted.append("dead")))
        dead._arm()
        dead.cancel()
    assert len(_timers(loop)._heap) <= 1 + 200 // 2 + 1  # compacted as stale entries grew
    await asyncio.wait_for(done.wait(), 10)
    assert aborted == ["live"]  # the disarmed ones expired in the same pass, unseen
    assert live.fired == "headers"


async def test_a_timer_armed_in_the_next_loop_turn() -> None:
    """`_arm_soon` (the engine arms an attempt's timer after the request's write): it arms
    a live timer once, at the expiry counted from the attempt's start; a timer cancelled
    before the loop got to it is not armed at all."""
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    done = asyncio.Event()

    def live_abort() -> None:
        fired.append("live")
        done.set()

    live = _StreamTimer(loop, _attempt(), _Abort(live_abort))
    gone = _StreamTimer(loop, _attempt(), _Abort(lambda: fired.append("gone")))
    loop.call_soon(live._arm_soon)
    loop.call_soon(live._arm_soon)  # armed already by then: not pushed again
    loop.call_soon(gone._arm_soon)
    gone.cancel()
    heap = _timers(loop)._heap
    before = heap.count(live)
    await asyncio.sleep(0)
    assert heap.count(live) == before + 1
    assert gone not in heap
    await asyncio.wait_for(done.wait(), 10)
    assert fired == ["live"]
    assert live.fired == "headers"
