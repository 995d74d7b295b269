"""anyio cancel scopes for the gateway's per-request paths, without anyio's per-call backend
lookup. Imports anyio only.

`anyio.CancelScope()` finds the running async library (sniffio, the current task) and
its backend module on every call: ~3 us, against ~0.5 us for the backend's own class, and
the gateway makes four or five scopes a request. The gateway runs on asyncio only, so the
class is looked up once, on the first call (from a running loop), and reused.
"""

from __future__ import annotations

import anyio

__all__ = ["cancel_scope"]

_scope_class: type[anyio.CancelScope] | None = None


def cancel_scope(*, shield: bool = False) -> anyio.CancelScope:
    """A new `anyio.CancelScope(shield=shield)` (call it from the event loop)."""
    global _scope_class
    cls = _scope_class
    if cls is None:
        scope = anyio.CancelScope(shield=shield)
        _scope_class = type(scope)
        return scope
    return cls(shield=shield)
