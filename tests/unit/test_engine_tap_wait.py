"""The fast lane's wait (client/_engine.py `_TapWait`): awaited by a task as an asyncio
future is - woken by `set_result`, its task cancelled through it, callbacks run from the
loop - in a slotted object instead of a future."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from unbroken.client._engine import _TapWait


def run(main: Any) -> Any:
    return asyncio.run(main())


def test_a_task_awaiting_it_is_woken_by_set_result() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        wait = _TapWait(loop)
        seen: list[str] = []

        async def waiter() -> None:
            await wait
            seen.append("woken")

        task = loop.create_task(waiter())
        await asyncio.sleep(0)
        assert not wait.done()
        assert seen == []
        wait.set_result(None)
        assert wait.done()
        assert not wait.cancelled()
        await task
        return seen

    assert run(main) == ["woken"]


def test_cancelling_its_task_cancels_it_and_the_task_sees_cancelled_error() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wait = _TapWait(loop)
        got: list[BaseException] = []

        async def waiter() -> None:
            try:
                await wait
            except asyncio.CancelledError as exc:
                got.append(exc)
                raise

        task = loop.create_task(waiter())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert wait.cancelled()
        assert len(got) == 1
        # Over: neither a second cancel nor a result changes it.
        assert not wait.cancel()
        with pytest.raises(asyncio.InvalidStateError):
            wait.set_result(None)
        with pytest.raises(asyncio.CancelledError):
            wait.result()

    run(main)


def test_result_before_the_end_is_an_invalid_state() -> None:
    async def main() -> None:
        wait = _TapWait(asyncio.get_running_loop())
        with pytest.raises(asyncio.InvalidStateError):
            wait.result()
        wait.set_result(None)
        wait.result()  # no error once resolved

    run(main)


def test_callbacks_run_from_the_loop_in_order_and_can_be_removed() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        wait = _TapWait(loop)
        calls: list[str] = []

        def one(w: Any) -> None:
            assert w is wait
            calls.append("one")

        def two(w: Any) -> None:
            calls.append("two")

        def three(w: Any) -> None:
            calls.append("three")

        wait.add_done_callback(one)
        wait.add_done_callback(two)
        wait.add_done_callback(three)
        wait.add_done_callback(two)
        assert wait.remove_done_callback(two) == 2
        assert wait.remove_done_callback(two) == 0
        wait.set_result(None)
        assert calls == []  # from the loop, not inside set_result
        await asyncio.sleep(0)
        assert calls == ["one", "three"]
        # Added once it is over: run soon, from the loop.
        wait.add_done_callback(two)
        assert calls == ["one", "three"]
        await asyncio.sleep(0)
        return calls

    assert run(main) == ["one", "three", "two"]


def test_callbacks_run_in_their_context() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outside")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        wait = _TapWait(loop)
        seen: list[str] = []
        ctx = contextvars.copy_context()
        ctx.run(var.set, "inside")
        wait.add_done_callback(lambda _: seen.append(var.get()), context=ctx)
        wait.add_done_callback(lambda _: seen.append(var.get()))
        wait.cancel()
        await asyncio.sleep(0)
        return seen

    assert run(main) == ["inside", "outside"]


def test_it_is_smaller_than_a_future() -> None:
    """The reason it exists: one per live answer in a gateway."""
    import sys

    async def main() -> tuple[int, int, bool]:
        loop = asyncio.get_running_loop()
        wait = _TapWait(loop)
        return sys.getsizeof(wait), sys.getsizeof(loop.create_future()), hasattr(wait, "__dict__")

    ours, future, has_dict = run(main)
    assert ours < future
    assert not has_dict
