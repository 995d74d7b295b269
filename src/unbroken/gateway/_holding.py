"""The thread-local state of gateway/direct.py's held writes, in a module of its own.

Why apart: gateway/direct.py may be compiled with mypyc, which makes a class defined there a
native class whose attributes live in the object itself, one for all threads; a class from a
module mypyc does not compile keeps `threading.local`'s per-thread attributes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unbroken.gateway.direct import DirectBody


class Holding(threading.local):
    """This thread's bodies with writes held back (`hold_writes`), or None."""

    held: list[DirectBody] | None = None
