"""The mock's keep-alive beats keep to their grid when the loop wakes late (a busy host)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from unbroken.mock.exchange import Exchange
from unbroken.mock.respond import _keepalives


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


class _LateExchange:
    """The part of an Exchange `_keepalives` uses, on a virtual clock whose every sleep
    wakes `late_s` after it was due, as a loop busy with other streams does."""

    def __init__(self, late_s: float) -> None:
        self.loop = _Clock()
        self.late_s = late_s
        self.beats: list[float] = []

    async def write(self, data: bytes) -> None:
        self.beats.append(self.loop.now)

    async def sleep(self, delay_s: float) -> None:
        if delay_s > 0:
            self.loop.now += delay_s + self.late_s


def _beats(until_s: float, interval_s: float, late_s: float) -> _LateExchange:
    ex = _LateExchange(late_s)
    asyncio.run(_keepalives(cast(Exchange, ex), until_s, interval_s, b": keep-alive\n\n"))
    return ex


@pytest.mark.parametrize("late_s", [0.0, 0.012, 0.025])
def test_a_wait_gets_one_beat_per_interval_started_within_it(late_s: float) -> None:
    """150 ms at 40 ms: beats due at 0, 40, 80 and 120 ms, however late each wake-up is
    (less than an interval); the wait ends at its end, not one interval later."""
    ex = _beats(0.150, 0.040, late_s)
    assert len(ex.beats) == 4
    for k, at in enumerate(ex.beats):
        assert k * 0.040 <= at <= k * 0.040 + late_s + 1e-9
    assert 0.150 <= ex.loop.now <= 0.150 + late_s + 1e-9


def test_a_wait_already_over_gets_one_beat_and_no_sleep() -> None:
    ex = _beats(-1.0, 0.040, 0.0)
    assert ex.beats == [0.0]
    assert ex.loop.now == 0.0
