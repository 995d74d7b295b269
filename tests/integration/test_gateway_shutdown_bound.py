"""Shutdown is bounded: a gateway on a Redis store that stops answering (redis-server frozen
with SIGSTOP), or whose client's close never returns (even ignoring cancellation), still
exits within grace + drain + the close bound + a margin after SIGTERM, and a second SIGTERM
during shutdown exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_gateway_lifecycle import _start_gateway, _stop, long_answer
from tests.support import redis_server
from unbroken.gateway.app import CLOSE_TIMEOUT_S
from unbroken.gateway.server import ABORT_GRACE_S, EXIT_MARGIN_S, FORCED_EXIT, SAME_SIGNAL_S
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

DRAIN_S = 0.5
GRACE_S = 0.0


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A private redis-server (this test freezes it, so not the shared one)."""
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=4)) as server:
        yield server


def _gateway_on(url: str, store: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    # One worker, as the process that hangs is a worker (with a Redis store the default is
    # a supervisor and workers).
    return _start_gateway(
        url,
        "--workers",
        "1",
        UNBROKEN_GATEWAY_STORE=store,
        UNBROKEN_GATEWAY_SESSIONS=store,
        UNBROKEN_GATEWAY_DRAIN_TIMEOUT_S=str(DRAIN_S),
        UNBROKEN_GATEWAY_DRAIN_GRACE_S=str(GRACE_S),
        **env,
    )


# A sitecustomize for the gateway's process making redis-py's `Redis.aclose` never return:
# the store's close waits on a peer that never answers. With IGNORE set, it also swallows
# its cancellation, as a badly written close can.
STUCK_CLOSE = """
import asyncio
import redis.asyncio

IGNORE = {ignore}


async def aclose(self, *args, **kwargs):
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if not IGNORE:
                raise


redis.asyncio.Redis.aclose = aclose
"""


@pytest.mark.redis
@pytest.mark.parametrize("ignore", [False, True], ids=["cancellable", "ignores-cancel"])
def test_sigterm_exits_in_bounded_time_when_closing_the_store_never_ends(
    upstream: MockServer,
    frozen_redis: tuple[subprocess.Popen[bytes], str],
    tmp_path: Path,
    ignore: bool,
) -> None:
    """A close step that never ends (even one ignoring its cancellation) is abandoned past
    the close bound, with an error naming it, and the process exits as after any drain."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STUCK_CLOSE.format(ignore=ignore), encoding="utf-8")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    _, store = frozen_redis
    proc, url = _gateway_on(upstream.url, store, PYTHONPATH=path)
    try:
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        bound = DRAIN_S + GRACE_S + ABORT_GRACE_S + CLOSE_TIMEOUT_S + EXIT_MARGIN_S
        try:
            code = proc.wait(bound + 1)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the gateway did not exit within {bound + 1} s of SIGTERM")
        took = time.monotonic() - signalled
        assert proc.stderr is not None
        errors = proc.stderr.read()
        assert "did not finish within" in errors
        assert store.split("//")[1] not in errors  # no store address (credentials) in logs
        assert code in (0, -signal.SIGTERM), code
        assert took < DRAIN_S + GRACE_S + ABORT_GRACE_S + CLOSE_TIMEOUT_S + 2
    finally:
        _stop(proc)


@pytest.mark.redis
def test_sigterm_exits_in_bounded_time_when_the_store_stops_answering(
    upstream: MockServer, frozen_redis: tuple[subprocess.Popen[bytes], str]
) -> None:
    """With a stream in flight and the store frozen, SIGTERM still ends the process within
    grace + drain + abort grace + close bound + margin."""
    redis_proc, store = frozen_redis
    proc, url = _gateway_on(upstream.url, store)
    try:
        with long_answer(url) as response:
            next(response.iter_raw())
            redis_proc.send_signal(signal.SIGSTOP)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            bound = DRAIN_S + GRACE_S + ABORT_GRACE_S + CLOSE_TIMEOUT_S + EXIT_MARGIN_S
            try:
                code = proc.wait(bound)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the gateway did not exit within {bound} s of SIGTERM")
        took = time.monotonic() - signalled
        assert code in (0, FORCED_EXIT, -signal.SIGTERM), code
        assert took < bound
    finally:
        _stop(proc)


def test_second_sigterm_during_the_drain_exits_at_once(upstream: MockServer) -> None:
    """A stream that would keep the drain going for 20 s: a second SIGTERM ends the process
    at once, with the forced-exit status and an error line saying why; a repeat right after
    the first (a process group's signal forwarded again) does not."""
    proc, url = _start_gateway(
        upstream.url, UNBROKEN_GATEWAY_DRAIN_TIMEOUT_S="20", UNBROKEN_GATEWAY_DRAIN_GRACE_S="0"
    )
    try:
        with long_answer(url) as response:
            reads = response.iter_raw()
            next(reads)
            proc.send_signal(signal.SIGTERM)
            first = time.monotonic()
            next(reads)
            proc.send_signal(signal.SIGTERM)  # a repeat: the drain goes on
            # Still draining: the stream goes on after the first SIGTERM. The second comes
            # past the window in which a repeat counts as the same signal.
            while time.monotonic() - first < SAME_SIGNAL_S + 0.2:
                next(reads)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                pytest.fail("the gateway did not exit within 5 s of a second SIGTERM")
        assert time.monotonic() - signalled < 5
        assert code == FORCED_EXIT
        assert proc.stderr is not None
        assert "second SIGTERM during shutdown" in proc.stderr.read()
    finally:
        _stop(proc)
