"""Fixtures of the unit tests: `run`, for code that must behave the same on asyncio's loop
and on uvloop's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Any:
    """Runs `main()` to its end on a new loop of each kind (the gateway serves on uvloop)."""

    def go(main: Any) -> Any:
        if request.param == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()

    return go
