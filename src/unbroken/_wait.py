"""`SlotWait`: the part of an asyncio future that a task awaiting it and the code resolving
it use, in a few slots, for the waits a gateway makes per live answer. Imports asyncio only.

Why: an asyncio future is 144 bytes, and a gateway holds one wait per live answer for the
answer's life (the SDK's fast lane, client/_engine.py) and one per request until its
response head (gateway/upstream.py); subclasses say how the wait ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any, ClassVar

__all__ = ["SlotWait"]

# A wait's states.
WAITING, WOKEN, CANCELLED = 0, 1, 2


class SlotWait:
    """Awaitable by one task as an asyncio future is (the task adds its wake-up, reads
    `result`, may `cancel` it); over, it calls its callbacks from the loop, as a future
    does. Subclasses end it with `_end`."""

    __slots__ = ("_asyncio_future_blocking", "_ctx", "_fn", "_loop", "_more", "_state")

    # `result`'s message before the wait is over.
    not_over: ClassVar[str] = "the wait is not over"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = WAITING
        # The awaiting task's wake-up and its context (one, as a rule), and the callbacks
        # added after it, as (fn, context) pairs.
        self._fn: Callable[[Any], object] | None = None
        self._ctx: Any = None
        self._more: list[tuple[Callable[[Any], object], Any]] | None = None
        self._asyncio_future_blocking = False

    def __await__(self) -> Generator[Any, Any, None]:
        if self._state == WAITING:
            self._asyncio_future_blocking = True
            yield self  # to the task, which adds its wake-up
        self.result()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop it was made in (the task awaiting it checks)."""
        return self._loop

    def done(self) -> bool:
        """Whether it was resolved or cancelled."""
        return self._state != WAITING

    def cancelled(self) -> bool:
        """Whether it was cancelled."""
        return self._state == CANCELLED

    def result(self) -> None:
        """None once resolved; raises CancelledError once cancelled, InvalidStateError
        before either."""
        if self._state == CANCELLED:
            raise asyncio.CancelledError
        if self._state == WAITING:
            raise asyncio.InvalidStateError(self.not_over)

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        """Call `fn(self)` from the loop once it is over (soon, if it is)."""
        if self._state != WAITING:
            self._loop.call_soon(fn, self, context=context)
        elif self._fn is None:
            self._fn, self._ctx = fn, context
        elif self._more is None:
            self._more = [(fn, context)]
        else:
            self._more.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        """Forget `fn`'s callbacks; how many there were."""
        n = 0
        if self._fn is not None and self._fn == fn:
            self._fn = self._ctx = None
            n = 1
        if self._more is not None:
            kept = [pair for pair in self._more if pair[0] != fn]
            n += len(self._more) - len(kept)
            self._more = kept or None
        return n

    def cancel(self, msg: Any = None) -> bool:
        """Cancel it (its task is cancelled); False when it was over already."""
        if self._state != WAITING:
            return False
        self._end(CANCELLED)
        return True

    def _end(self, state: int) -> asyncio.Handle | None:
        """End it in `state` (WOKEN or CANCELLED): its callbacks are called soon from the
        loop; the first one's handle (the task's wake-up, as a rule) is returned. The first
        callback and its context are kept (see gateway/upstream.py `_HeadWait.run_now`)."""
        self._state = state
        loop = self._loop
        more, self._more = self._more, None
        fn = self._fn
        handle = None if fn is None else loop.call_soon(fn, self, context=self._ctx)
        for other, ctx in more or ():
            loop.call_soon(other, self, context=ctx)
        return handle
