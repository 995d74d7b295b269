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

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"Flag({'set' if self._value else 'unset'})"

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._value

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        """Unset the flag: later waiters wait for the next `set`."""
        self._value = False

    async def wait(self) -> bool:
        """Return (True) once the flag is set; at once when it is."""
        if self._value:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)
