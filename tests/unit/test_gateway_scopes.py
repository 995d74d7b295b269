"""gateway/scopes.py `shielded`: the clean-up it guards runs on when the anyio cancel scope
around it (in its task, or its task group's) is cancelled, as under a shielded
`anyio.CancelScope`; a task in no anyio scope gets no scope, and a native cancellation
still lands inside, as it does under anyio's shield."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from unbroken.gateway.scopes import shielded


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]  # a coroutine


def test_a_cancelled_scope_around_it_does_not_cancel_its_await() -> None:
    async def main() -> None:
        steps: list[str] = []
        with anyio.CancelScope() as outer:
            outer.cancel()
            with shielded():
                await asyncio.sleep(0)  # would raise without a shield
                await anyio.lowlevel.checkpoint()
                steps.append("shielded work done")
            await anyio.lowlevel.checkpoint()  # the outer scope's cancellation lands here
            steps.append("unreachable")
        assert outer.cancelled_caught
        assert steps == ["shielded work done"]

    _run(main())


def test_a_cancelled_task_group_does_not_cancel_its_task_s_clean_up() -> None:
    async def main() -> None:
        steps: list[str] = []
        started = asyncio.Event()

        async def child() -> None:
            try:
                started.set()
                await asyncio.Event().wait()
            finally:
                with shielded():
                    await anyio.lowlevel.checkpoint()
                    await asyncio.sleep(0)
                    steps.append("booked")

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            await started.wait()
            tg.cancel_scope.cancel()
        assert steps == ["booked"]

    _run(main())


def test_a_scope_entered_inside_it_still_cancels_its_own_body() -> None:
    async def main() -> None:
        with shielded():
            with anyio.move_on_after(0) as inner:
                await anyio.sleep(1)
        assert inner.cancelled_caught

    _run(main())


def test_a_task_in_no_scope_gets_a_no_op_a_native_cancellation_still_lands() -> None:
    async def main() -> None:
        entered = asyncio.Event()

        async def clean_up() -> None:
            with shielded() as scope:
                assert not isinstance(scope, anyio.CancelScope)
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(clean_up())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(main())
