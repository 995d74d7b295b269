"""`unbroken serve --workers N`: one gateway process per core on one port.

Theory of operation
-------------------
The supervisor (the process the user started) binds the address once without listening,
to resolve port 0 and hold the port, then forks N workers. Each worker opens its own
listening socket on that port with SO_REUSEPORT, so the kernel spreads new connections
over the workers, builds its own gateway (event loop, upstream pool, store connections)
after the fork, and serves until SIGTERM. The supervisor forwards SIGTERM / SIGINT to the
workers (each drains its streams, gateway/server.py) and waits for them; a worker that
dies while the supervisor is not stopping is started again, at most once a second.

Workers share nothing in memory, so everything that must be shared lives in the store:
rate-limit buckets, stream logs and leases in Redis, sessions in Redis or SQLite. A memory
store with more than one worker is refused (`check_workers`). Imports settings and gateway
siblings; POSIX only (fork, SO_REUSEPORT).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

from unbroken.errors import ConfigError
from unbroken.settings import GatewaySettings, Settings

__all__ = ["check_workers", "default_workers", "serve_workers"]

logger = logging.getLogger(__name__)

# A worker that keeps dying is started again no more often than this.
RESPAWN_EVERY_S = 1.0
# <linux/prctl.h>: deliver a signal to this process when its parent dies.
PR_SET_PDEATHSIG = 1


def default_workers(g: GatewaySettings) -> int:
    """One worker per core when the state is shared (a Redis store), else one."""
    return (os.cpu_count() or 1) if g.store != "memory" and g.sessions != "memory" else 1


def check_workers(g: GatewaySettings, workers: int) -> None:
    """Refuse settings under which several workers would disagree.

    Raises:
        ConfigError: fewer than one worker, or several workers on in-process state.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and (g.store == "memory" or g.sessions == "memory"):
        raise ConfigError(
            f"--workers {workers} needs state the workers share: set gateway.store to a "
            "redis:// URL (limits, stream logs, leases) and gateway.sessions to redis:// or "
            "sqlite (each worker would otherwise keep its own)"
        )


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (host, port) with SO_REUSEPORT without listening: it resolves port 0 and holds
    the port, and, not listening, it is given no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_workers(
    settings: Settings,
    workers: int,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Run `workers` gateway processes on `settings.gateway.host:port` until SIGTERM.

    Args:
        settings: the settings every worker serves.
        workers: how many processes.
        on_ready: called with the base URL once the workers were started.

    Returns:
        0 when every worker drained and exited cleanly, else 1.

    Raises:
        ConfigError: as `check_workers`.
        OSError: the address cannot be bound.
    """
    g = settings.gateway
    check_workers(g, workers)
    reserved = _reserve(g.host, g.port)
    host, port = reserved.getsockname()[:2]
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's side runs in the forked process
            code = 1
            try:
                reserved.close()
                _worker(settings, host, port)
                code = 0
            except BaseException:
                logger.exception("gateway worker %d failed", number)
            finally:
                os._exit(code)
        children[pid] = number

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in range(workers):
            spawn(number)
        if on_ready is not None:
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{port}")
        clean = True
        last_spawn = 0.0
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait
                continue
            if pid not in children:
                continue
            number = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                # uvicorn re-raises the stop signal once it has drained: a worker that ends
                # by the signal it was sent has stopped cleanly.
                clean = clean and code in (0, -signal.SIGTERM, -signal.SIGINT)
                continue
            logger.warning(
                "gateway worker %d (pid %d) exited with %d; starting it again", number, pid, code
            )
            wait = last_spawn + RESPAWN_EVERY_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last_spawn = time.monotonic()
            spawn(number)
        return 0 if clean else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()


def _die_with_parent() -> None:  # pragma: no cover - forked
    """Linux: SIGTERM this worker (it drains) if the supervisor dies, even by SIGKILL, so
    no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own SIGTERM still reaches the workers


def _worker(settings: Settings, host: str, port: int) -> None:  # pragma: no cover - forked
    """One worker: its own listening socket (SO_REUSEPORT), app and event loop."""
    from unbroken.gateway.app import create_app
    from unbroken.gateway.server import bind, serve

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent()
    sock = bind(host, port, reuse_port=True)
    serve(create_app(settings), sock)
