"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# The tests run the sources, in this process and in the processes they start (gateways, the
# CLI): coverage measures Python source and cannot see the compiled chunk path
# (unbroken/_native.py), and the results do not depend on whether `make` built it.
# tests/integration/test_native_gateway.py runs gateways on the compiled chunk path, and
# UNBROKEN_PURE_PYTHON=0 set by the caller has every process the tests start run it (this
# one still runs the sources).
_CALLER_MODE = os.environ.get("UNBROKEN_PURE_PYTHON")
os.environ["UNBROKEN_PURE_PYTHON"] = "1"
import unbroken  # noqa: E402 - after the mode above
import unbroken.core.stream  # noqa: E402
from tests.support import redis_server  # noqa: E402

if _CALLER_MODE == "0":
    os.environ["UNBROKEN_PURE_PYTHON"] = "0"

# Property tests: a quick profile for the edit-test loop, a thorough one for CI
# (.ci/run sets HYPOTHESIS_PROFILE=ci). Tests with their own max_examples keep it.
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("ci", max_examples=150, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test another checkout's code: a PYTHONPATH inherited from the caller (or a
    stale install) would have this process import that tree, while the gateway and mock
    subprocesses run this one, so the results and the coverage would mix two trees."""
    here = config.rootpath / "src" / "unbroken"
    imported = Path(unbroken.__file__).resolve().parent
    if imported != here.resolve():
        raise pytest.UsageError(
            f"the tests import unbroken from {imported}, not from this checkout ({here}); "
            "unset PYTHONPATH or reinstall with `pip install -e .`"
        )
    # The sources, not the compiled chunk path (src/unbroken/_compiled/): the coverage.
    stream = Path(unbroken.core.stream.__file__).resolve()
    if stream != here.resolve() / "core" / "stream.py":
        raise pytest.UsageError(f"the tests import the compiled chunk path ({stream})")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the redis-server fixture, directly or through a store parameter named
    `redis`, carry the `redis` marker (`-m "not redis"` deselects them where no
    redis-server can run)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if "redis_url" in getattr(item, "fixturenames", ()) or "redis" in params:
            item.add_marker(pytest.mark.redis)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (anyio's pytest plugin, STYLE.md §9)."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (no persistence), one for the whole
    test session; tests keep apart by key prefix or flush it themselves."""
    with redis_server(tmp_path_factory.mktemp("redis")) as (_, url):
        yield url
