"""Tasks whose first step runs at once (gateway/eager.py): `step_now` runs the coroutine up
to its first wait in the caller's turn, as the task (current task, context); the task then
goes on from that wait, ends with what the step ended with, and is cancelled as a task
waiting there would be. Without `step_now` the task runs as any other."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from unbroken.gateway.eager import EagerStart, eager_task
from unbroken.gateway.upstream import _HeadWait

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_step_now_runs_the_first_step_at_once_as_the_task_in_its_context(run: Any) -> None:
    seen: list[Any] = []

    async def body(gate: asyncio.Future[str]) -> str:
        seen.append((asyncio.current_task(), VAR.get()))
        VAR.set("inside")
        got = await gate
        seen.append((asyncio.current_task(), VAR.get()))
        return got

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[str] = loop.create_future()
        VAR.set("outer")
        task, start = eager_task(loop, body(gate))
        assert start.step_now()
        assert seen == [(task, "outer")]  # ran before any turn of the loop
        assert VAR.get() == "outer"  # its context is the task's copy, not the caller's
        assert not start.step_now()  # once only
        gate.set_result("done")
        assert await task == "done"
        assert seen[1] == (task, "inside")

    run(main)


def test_without_step_now_the_task_runs_in_its_turn(run: Any) -> None:
    order: list[str] = []

    async def body() -> int:
        order.append("task")
        await asyncio.sleep(0)
        return 7

    async def main() -> None:
        task, start = eager_task(asyncio.get_running_loop(), body())
        order.append("caller")
        assert await task == 7
        assert not start.step_now()  # the task started itself

    run(main)
    assert order == ["caller", "task"]


def test_a_first_step_that_ends_or_raises_ends_the_task_so(run: Any) -> None:
    async def returns() -> str:
        return "at once"

    async def raises() -> None:
        raise ValueError("bad")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done, start = eager_task(loop, returns())
        start.step_now()
        assert await done == "at once"
        failed, raising = eager_task(loop, raises())
        raising.step_now()
        with pytest.raises(ValueError, match="bad"):
            await failed

    run(main)


def test_step_now_inside_another_task_gives_the_current_task_back(run: Any) -> None:
    async def inner() -> asyncio.Task[Any] | None:
        return asyncio.current_task()

    async def main() -> None:
        outer = asyncio.current_task()
        task, start = eager_task(asyncio.get_running_loop(), inner())
        start.step_now()
        assert asyncio.current_task() is outer
        assert await task is task

    run(main)


def test_a_bare_yield_in_the_first_step_is_a_turn_of_the_task(run: Any) -> None:
    async def body() -> str:
        await asyncio.sleep(0)
        return "after a turn"

    async def main() -> None:
        task, start = eager_task(asyncio.get_running_loop(), body())
        start.step_now()
        assert await task == "after a turn"

    run(main)


def test_cancelled_after_step_now_cancels_the_wait_and_the_task(run: Any) -> None:
    cleaned: list[str] = []

    async def body(gate: asyncio.Future[None]) -> None:
        try:
            await gate
        finally:
            cleaned.append("finally")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        task, start = eager_task(loop, body(gate))
        start.step_now()
        task.cancel()  # before the task's own first step
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.cancelled()
        assert cleaned == ["finally"]

    run(main)


def test_cancelled_after_a_first_step_that_ended_keeps_its_result(run: Any) -> None:
    async def returns() -> int:
        return 3

    async def main() -> None:
        task, start = eager_task(asyncio.get_running_loop(), returns())
        start.step_now()
        task.cancel()  # too late: the coroutine has ended
        assert await task == 3

    run(main)


def test_cancelled_while_it_waits_after_its_first_turn(run: Any) -> None:
    async def body(gate: asyncio.Future[None]) -> None:
        await gate

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        task, start = eager_task(loop, body(gate))
        start.step_now()
        await asyncio.sleep(0)  # the task took the kept wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.cancelled()

    run(main)


def test_close_closes_the_coroutine_unrun() -> None:
    ran: list[str] = []

    async def body() -> None:
        ran.append("ran")

    coro = body()
    EagerStart(coro, contextvars.copy_context()).close()
    with pytest.raises(RuntimeError, match="cannot reuse"):
        coro.send(None)  # closed (never started: no warning either)
    assert ran == []


def test_a_wait_over_before_the_tasks_first_step_is_gone_past_in_that_step(run: Any) -> None:
    """The task's own first step finds the kept wait done: it goes on at once, not after
    waking itself from the loop one more turn later."""
    seen: list[str] = []

    async def body(gate: asyncio.Future[str]) -> None:
        seen.append(await gate)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[str] = loop.create_future()
        task, start = eager_task(loop, body(gate))
        start.step_now()
        gate.set_result("past")  # before the task's first step
        await asyncio.sleep(0)  # one turn: the task's first step runs before this one ends
        assert seen == ["past"]
        await task

    run(main)


def test_a_wait_over_before_the_tasks_first_step_with_an_error_raises_there(run: Any) -> None:
    async def body(gate: asyncio.Future[str]) -> str:
        try:
            return await gate
        except ValueError as exc:
            return f"caught {exc}"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[str] = loop.create_future()
        task, start = eager_task(loop, body(gate))
        start.step_now()
        gate.set_exception(ValueError("bad"))
        assert await task == "caught bad"

    run(main)


def test_a_head_read_before_the_tasks_first_step_runs_the_next_step_in_that_read(
    run: Any,
) -> None:
    """A wait woken from the callback that ends it (the upstream head's, `_HeadWait.
    run_now`) runs the coroutine's next step in that callback even when the task made from
    a loop callback has not had its own first step yet; the task goes on from there."""
    steps: list[Any] = []

    async def body(head: _HeadWait, then: asyncio.Future[str]) -> str:
        await head
        steps.append(("after head", asyncio.current_task(), VAR.get()))
        return await then

    async def main() -> None:
        loop = asyncio.get_running_loop()
        head = _HeadWait(loop)
        then: asyncio.Future[str] = loop.create_future()
        made: list[asyncio.Task[str]] = []
        in_read: list[list[Any]] = []
        done = loop.create_future()

        def request_read() -> None:  # makes the task and runs its first step
            VAR.set("request")
            task, start = eager_task(loop, body(head, then))
            made.append(task)
            start.step_now()

        def head_read() -> None:  # as the upstream's data callback: not in a task
            head.set_result(None)
            head.run_now()
            in_read.append(list(steps))
            done.set_result(None)

        def reads() -> None:
            # Both before the task's own first step (queued after this callback's turn).
            request_read()
            head_read()

        loop.call_soon(reads)
        await done
        assert in_read == [[("after head", made[0], "request")]]
        then.set_result("whole")
        assert await made[0] == "whole"

    run(main)


def test_a_head_wait_woken_from_the_loop_before_the_tasks_first_step(run: Any) -> None:
    """Woken otherwise (a lost connection: no `run_now`), the step runs from the loop, once,
    whoever comes first: the task's first step or the wake-up."""
    steps: list[str] = []

    async def body(head: _HeadWait) -> str:
        await head
        steps.append("after head")
        return "ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        head = _HeadWait(loop)
        made: list[asyncio.Task[str]] = []

        def request_read() -> None:
            task, start = eager_task(loop, body(head))
            made.append(task)
            start.step_now()
            head.set_result(None)

        loop.call_soon(request_read)
        await asyncio.sleep(0)
        assert await made[0] == "ok"
        assert steps == ["after head"]

    run(main)
