"""anyio cancel scopes for the gateway's per-request paths, without anyio's per-call backend
lookup. Imports anyio only.

`anyio.CancelScope()` finds the running async library (sniffio, the current task) and
its backend module on every call: ~3 us, against ~0.5 us for the backend's own class, and
the gateway makes four or five scopes a request. The gateway runs on asyncio only, so the
class is looked up once, on the first call (from a running loop), and reused.

`shielded()` goes further for the clean-up at an answer's end (the booking, the producer's
last steps): a shield holds off the cancellation of the anyio cancel scopes around it in
its task, and a task with none (the producer's, made by the stream hub) has nothing to
hold off; there it is a no-op (~0.5 us), not a scope's creation, entry and exit (~2.5 us
each, and anyio's per-task state made for the task on its first scope).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio

__all__ = ["cancel_scope", "shielded"]

_scope_class: type[anyio.CancelScope] | None = None

_task_states: Any
try:
    # anyio's record of the cancel scope each task is in (anyio 4 on asyncio).
    from anyio._backends._asyncio import _task_states
except ImportError:  # pragma: no cover - another anyio: a shield every time
    _task_states = None

# What `shielded` returns where no scope is needed: reusable, as it holds no state.
_NO_SCOPE = contextlib.nullcontext()


def cancel_scope(*, shield: bool = False) -> anyio.CancelScope:
    """A new `anyio.CancelScope(shield=shield)` (call it from the event loop)."""
    global _scope_class
    cls = _scope_class
    if cls is None:
        scope = anyio.CancelScope(shield=shield)
        _scope_class = type(scope)
        return scope
    return cls(shield=shield)


def shielded() -> contextlib.AbstractContextManager[Any]:
    """A context in which the current task's anyio cancel scopes do not cancel it: a new
    shielded `anyio.CancelScope` when the task is in one, else a no-op (call it from a
    task, and enter it at once: a scope entered later inside it is shielded by its own)."""
    states = _task_states
    task = asyncio.current_task()
    if states is not None and task is not None:
        state = states.get(task)
        if state is None or state.cancel_scope is None:
            return _NO_SCOPE
    return cancel_scope(shield=True)
