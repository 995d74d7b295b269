"""Tasks whose first step may run at once, in the loop turn that makes them (what Python
3.12's eager task start does, for Python 3.11).

Why it exists: on the way to an answer's first token the gateway started two tasks, the
request's (uvicorn's task per request) and the producer's (gateway/streams.py), and each
waited for the loop to come round to it: the upstream request was written two loop turns
after the client's request bytes arrived. A turn of a busy loop is the rest of its batch of
I/O callbacks (hundreds of relayed chunks at 256 streams). `EagerStart.step_now` runs the
task's first step, up to its first real wait (the upstream request written, the upstream's
response head awaited), in the caller's turn; the task then goes on from that wait.

How: the task is made on an `EagerStart` (a coroutine-like object around the coroutine)
and scheduled as usual. `step_now` runs the coroutine's first step with the task as the
loop's current task (as the task itself would: `asyncio.current_task()`, timeouts and
cancel scopes see it) in the task's context, and keeps what the step gave (the future it
waits on, its result or its exception); the task's own first step, when the loop runs it,
takes that instead of stepping again. Without `step_now` the task runs as any other.

The task's own first step may come late: a task made from a callback of the loop's ready
queue (the request bytes a connection brought with it as it was accepted, gateway/accept.py)
has its first step in the loop's next pass over that queue, after the next poll for I/O, on
uvloop. What the first step waited on may end before then (the upstream's head, from that
poll). Two things keep such an end from costing more turns of the loop:
* a wait that can wake its waiter from the callback that ends it (`wakes_now`, gateway/
  upstream.py `_HeadWait`) wakes the `EagerStart` itself until the task takes it over: the
  next step runs from that callback, as the task's would (`_woken`);
* a first step of the task that finds the kept wait already over goes on at once, as
  awaiting a done future does, instead of handing it to the task (which would wake itself
  from the loop one more turn later).
Imports asyncio and contextvars only.
"""

from __future__ import annotations

import asyncio
import contextvars

# asyncio's own current-task bookkeeping (3.11 has no eager start to do it for us).
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["EagerStart", "current_tasks", "eager_task"]


class _CurrentTasks:
    """`current_tasks` where asyncio keeps no such table (a `get` that asks asyncio)."""

    def get(
        self, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Task[Any] | None:  # pragma: no cover - a Python without the table
        return asyncio.current_task(loop)


# The current task of each loop, asyncio's own table: `current_tasks.get(loop)` is
# `asyncio.current_task(loop)` without its call (a Python function on 3.11 around this
# lookup: ~10 bytecodes a call, several calls an answer).
_table: Any = getattr(asyncio.tasks, "_current_tasks", None)
current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | _CurrentTasks = (
    _table if isinstance(_table, dict) else _CurrentTasks()
)

_T = TypeVar("_T")

# `EagerStart._state`: not stepped yet, first step done by `step_now` (it yielded; or it
# ended, raising), running (every step goes to the coroutine).
_NEW, _STEPPED, _RAISED, _RUNNING = 0, 1, 2, 3


class EagerStart(Coroutine[Any, Any, _T]):
    """A task's coroutine whose first step `step_now` may run before the loop does (see
    the module docstring). Made by `eager_task`."""

    # One per live answer (the producer's task holds it): no instance dict, five slots.
    __slots__ = ("_coro", "_ctx", "_out", "_state", "_task")

    def __init__(self, coro: Coroutine[Any, Any, _T], ctx: contextvars.Context) -> None:
        self._coro = coro
        self._ctx: contextvars.Context | None = ctx
        self._state = _NEW
        # What the steps run before the task's own first step yielded or raised.
        self._out: Any = None
        # The task (set by `eager_task`), until it takes its coroutine over.
        self._task: asyncio.Task[_T] | None = None

    def __await__(self) -> Generator[Any, Any, _T]:
        return self  # type: ignore[return-value]  # a coroutine-like iterator

    def __next__(self) -> Any:
        return self.send(None)

    def step_now(self) -> bool:
        """Run the task's first step now, unless it has run: True when this ran it.

        Called from a loop callback or from another task's step (that task is the current
        one again afterwards)."""
        task, ctx = self._task, self._ctx
        if self._state != _NEW or task is None or ctx is None:
            return False
        self._state = _STEPPED
        self._step(task, ctx)
        return True

    def _step(self, task: asyncio.Task[_T], ctx: contextvars.Context) -> None:
        """One step of the coroutine as its task would run it (the current task, in its
        context), kept for the task."""
        loop = task.get_loop()
        outer = current_tasks.get(loop)
        if outer is not None:
            _leave_task(loop, outer)
        _enter_task(loop, task)
        try:
            out = self._out = ctx.run(self._coro.send, None)
        except BaseException as exc:
            self._out, self._state = exc, _RAISED
            self._task = self._ctx = None
        else:
            if getattr(out, "wakes_now", False) and not out.done():
                # Until the task's first step adds its own wake-up (which replaces this one).
                out.add_done_callback(self._woken)
        finally:
            _leave_task(loop, task)
            if outer is not None:
                _enter_task(loop, outer)

    def _woken(self, wait: Any) -> None:
        """The kept wait ended before the task's first step: the next step runs now."""
        task, ctx = self._task, self._ctx
        if self._state == _STEPPED and self._out is wait and task is not None and ctx is not None:
            wait._asyncio_future_blocking = False  # as the task does with what it takes
            self._step(task, ctx)

    def send(self, value: Any) -> Any:
        """The task's step: the first one gives what `step_now` kept, or goes on past it if
        that wait is over already."""
        state = self._state
        if state == _RUNNING:
            return self._coro.send(value)
        self._state = _RUNNING
        out, self._out, self._ctx, self._task = self._out, None, None, None
        if state == _NEW:
            return self._coro.send(value)
        if state == _RAISED:
            raise out
        if getattr(out, "_asyncio_future_blocking", False) and out.done():
            # The task would only wake itself from the loop, a turn later, to send this.
            out._asyncio_future_blocking = False
            return self._coro.send(None)
        return out

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Raise into the coroutine (a cancellation): after `step_now`, where it waits."""
        state = self._state
        self._state = _RUNNING
        out, self._out, self._ctx, self._task = self._out, None, None, None
        if state == _RAISED:
            raise out  # it ended already: the cancellation came too late
        if state == _STEPPED and isinstance(out, asyncio.Future):
            # As a task cancelled while it waits: its future is cancelled too.
            out.cancel()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        """Close the coroutine."""
        self._state = _RUNNING
        self._out = self._ctx = self._task = None
        self._coro.close()


def eager_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]
) -> tuple[asyncio.Task[_T], EagerStart[_T]]:
    """A task of `coro` in a copy of the current context, scheduled as `create_task`
    schedules it, and its `EagerStart` (whose `step_now` may run its first step at once)."""
    ctx = contextvars.copy_context()
    start: EagerStart[_T] = EagerStart(coro, ctx)
    task = loop.create_task(start, context=ctx)
    start._task = task  # for `step_now`
    return task, start
