"""`Flag`: asyncio.Event's interface at a fraction of its memory, for the objects a gateway
keeps per live stream. Imports asyncio only.

Why: an asyncio.Event allocates a deque for its waiters up front, a 64-slot block of ~760
bytes; a live stream held six of them (~4.5 KB of the gateway's memory per stream,
bench/stream_memory.py), nearly all never waited on by more than one task.
"""

from __future__ import annotations

import asyncio

__all__ = ["Flag"]


class Flag:
    """A drop-in for `asyncio.Event` (`set`, `clear`, `is_set`, `await wait()`) whose
    waiters' list is made on the first wait."""

    # One slot: True (set), False (unset, nobody waits) or the waiters' list (unset): a
    # gateway holds six per live stream (40 bytes each, not 48).
    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state: bool | list[asyncio.Future[None]] = False

    def __repr__(self) -> str:
        return f"Flag({'set' if self._state is True else 'unset'})"

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._state is True

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        state = self._state
        if state is not True:
            self._state = True
            for waiter in state or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        """Unset the flag: later waiters wait for the next `set`."""
        if self._state is True:
            self._state = False

    async def wait(self) -> bool:
        """Return (True) once the flag is set; at once when it is."""
        waiters = self._state
        if waiters is True:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if waiters is False:
            waiters = self._state = []
        waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            waiters.remove(waiter)
            if not waiters and self._state is waiters:
                self._state = False  # nobody waits: the list goes
