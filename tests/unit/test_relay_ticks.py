"""The relays' tick wheel (gateway/relay.py `_TickWheel`): one loop timer ticks every relay
of a period about once a period, drops those whose tick says stop or that leave, and leaves
the loop's registry when it empties."""

from __future__ import annotations

import asyncio

import pytest

from unbroken.gateway.relay import WHEEL_SLOTS, _TickWheel

pytestmark = pytest.mark.anyio

PERIOD_S = 0.08


class Failing:
    """A relay whose tick raises."""

    def __init__(self) -> None:
        self.calls = 0

    def _on_tick(self, now: float) -> bool:
        self.calls += 1
        raise RuntimeError("tick failed")


class Ticked:
    """Stands in for a StreamRelay: counts its ticks, stops after `stop_after`."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.times: list[float] = []
        self.stop_after = stop_after
        self.stopped = asyncio.Event()

    def _on_tick(self, now: float) -> bool:
        self.times.append(now)
        if self.stop_after is not None and len(self.times) >= self.stop_after:
            self.stopped.set()
            return False
        return True


async def test_each_relay_is_ticked_once_a_period_until_it_stops_or_leaves() -> None:
    loop = asyncio.get_running_loop()
    wheel = _TickWheel.of(loop, PERIOD_S)
    assert _TickWheel.of(loop, PERIOD_S) is wheel
    started = loop.time()
    stopping, leaving = Ticked(stop_after=3), Ticked()
    slot_stopping = wheel.add(stopping)  # type: ignore[arg-type]  # duck-typed relay
    slot_leaving = wheel.add(leaving)  # type: ignore[arg-type]  # duck-typed relay
    await asyncio.wait_for(stopping.stopped.wait(), 5.0)
    # About a period apart, the first about a period after joining.
    assert stopping.times[0] - started >= PERIOD_S * (WHEEL_SLOTS - 1) / WHEEL_SLOTS * 0.9
    gaps = [b - a for a, b in zip(stopping.times, stopping.times[1:], strict=False)]
    assert all(PERIOD_S * 0.8 <= gap <= PERIOD_S * 3 for gap in gaps), gaps
    wheel.remove(stopping, slot_stopping)  # type: ignore[arg-type]  # already off: no-op
    ticks = len(leaving.times)
    assert ticks >= 2
    wheel.remove(leaving, slot_leaving)  # type: ignore[arg-type]  # duck-typed relay
    # Empty: the wheel left the registry and its timer is cancelled.
    assert _TickWheel.of(loop, PERIOD_S) is not wheel
    await asyncio.sleep(PERIOD_S * 2)  # time for ticks that must not come
    assert len(leaving.times) == ticks
    assert len(stopping.times) == 3


async def test_a_relay_whose_tick_fails_leaves_and_the_others_keep_ticking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    wheel = _TickWheel.of(loop, PERIOD_S)
    failing, other = Failing(), Ticked(stop_after=3)
    # Both in the same slot, the failing one ticked first.
    wheel.add(failing)  # type: ignore[arg-type]  # duck-typed relay
    wheel.add(other)  # type: ignore[arg-type]  # duck-typed relay
    await asyncio.wait_for(other.stopped.wait(), 5.0)
    assert failing.calls == 1
    assert "a relay's tick failed" in caplog.text
    assert _TickWheel.of(loop, PERIOD_S) is not wheel  # both left: the wheel emptied
