"""Helpers for tests (importable as tests.support)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_binary(name: str) -> str:
    """The path of a system binary, or skip the test with a clear reason.

    With UNBROKEN_REQUIRE_BINARIES=1 (set by .ci/run) a missing binary fails instead, so
    CI always runs everything.
    """
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install {name}); .ci/run installs it"
        if os.environ.get("UNBROKEN_REQUIRE_BINARIES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
