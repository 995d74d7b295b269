"""The client connection's flow control holds no writable flag of its own while its writes
flow (the shared set one), and one while they are paused: `drain` waits for the resume."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from unbroken.gateway import guard

pytestmark = pytest.mark.anyio


class _Transport:
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_drain_waits_only_while_writes_are_paused() -> None:
    transport: Any = _Transport()
    one, two = guard._FlowControl(transport), guard._FlowControl(transport)
    shared = getattr(guard, "_WRITABLE", None)
    assert one._is_writable_event is shared
    assert two._is_writable_event is shared
    await one.drain()  # at once
    one.pause_writing()
    one.pause_writing()  # paused already: the same wait
    assert one._is_writable_event is not shared
    assert two._is_writable_event is shared
    waiting = asyncio.ensure_future(one.drain())
    await asyncio.sleep(0)  # one loop turn: it runs up to its wait
    assert not waiting.done()
    await two.drain()  # the other connection's writes flow
    one.resume_writing()
    await waiting
    assert one._is_writable_event is shared
    assert shared is not None
    assert shared.is_set()
    one.resume_writing()  # not paused: nothing changes
    assert one._is_writable_event is shared
