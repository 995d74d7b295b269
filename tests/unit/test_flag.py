"""unbroken._flag.Flag behaves as asyncio.Event does, and costs less memory."""

from __future__ import annotations

import asyncio
import sys

import pytest

from unbroken._flag import Flag

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", [Flag, asyncio.Event])
async def test_waiters_wake_on_set_and_not_before(kind: type[Flag] | type[asyncio.Event]) -> None:
    flag = kind()
    assert not flag.is_set()
    woken: list[int] = []

    async def waiter(i: int) -> None:
        assert await flag.wait() is True
        woken.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert woken == []
    flag.set()
    flag.set()  # a second set changes nothing
    await asyncio.gather(*tasks)
    assert sorted(woken) == [0, 1, 2]
    assert flag.is_set()
    assert await flag.wait() is True  # set: returns at once


@pytest.mark.parametrize("kind", [Flag, asyncio.Event])
async def test_clear_makes_waiters_wait_again(kind: type[Flag] | type[asyncio.Event]) -> None:
    flag = kind()
    flag.set()
    flag.clear()
    assert not flag.is_set()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await flag.wait()


async def test_a_cancelled_waiter_is_forgotten_and_others_still_wake() -> None:
    flag = Flag()
    cancelled = asyncio.create_task(flag.wait())
    kept = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert isinstance(flag._state, list)
    assert len(flag._state) == 1  # only the waiter still waiting
    assert repr(flag) == "Flag(unset)"
    flag.set()
    assert await kept is True
    assert _state(flag) is True
    assert repr(flag) == "Flag(set)"


async def test_the_waiters_list_goes_when_the_last_waiter_leaves() -> None:
    flag = Flag()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    flag.clear()  # unset already: the waiter keeps waiting
    assert isinstance(flag._state, list)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert _state(flag) is False
    flag.set()
    flag.clear()
    assert _state(flag) is False


def _state(flag: Flag) -> object:
    # Read afresh (not narrowed by an earlier isinstance check).
    return flag._state


def test_a_flag_is_smaller_than_an_event() -> None:
    event = asyncio.Event()
    flag_bytes = sys.getsizeof(Flag())
    event_bytes = (
        sys.getsizeof(event)
        + sys.getsizeof(event.__dict__)
        + sys.getsizeof(event._waiters)  # the deque Flag avoids
    )
    assert flag_bytes * 8 < event_bytes
