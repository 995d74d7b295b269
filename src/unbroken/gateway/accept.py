"""Accepting connections in batches: the gateway's listener.

Why it exists: uvloop's server (`loop.create_server`) accepts through libuv, which since
libuv 1.45 accepts one connection per readiness of the listening socket, so at most one per
turn of the event loop. A gateway busy relaying hundreds of streams turns its loop a few
hundred times a second; new connections then queued in the kernel's backlog faster than
they were taken: at 256 streams of 5 ms tokens (bench/gateway.py's load, 256 new streams a
second) the time from a client's connect to the gateway's `connection_made` reached 0.6 s at
the 90th percentile, which was the whole time-to-first-token tail. `Acceptor` takes every
connection waiting (up to `ACCEPT_BATCH`) each time the listener is readable, as asyncio's
own selector loop does, and hands each to the loop with `connect_accepted_socket`.

It also reads what a connection brought with it as it is accepted (a client writes its
request as soon as it is connected, and a busy gateway accepts it later): those bytes reach
the protocol's `data_received` right after its `connection_made`, in the same turn of the
loop. Why: the loop's own first read of a new connection came one more turn later (after a
whole batch of other connections' reads): at 256 new streams a second, 1-20 ms p50 (12-150
ms p90) between `connection_made` and the request's `data_received`, on the way to every
first token (a per-request probe on a loaded host). A protocol that closes its transport in
`connection_made` must ignore them (the gateway's does: a refused connection reads nothing
more).
Imports asyncio and socket only.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["ACCEPT_BATCH", "Acceptor"]

logger = logging.getLogger(__name__)

# Connections taken per readiness of the listener at most (asyncio takes its backlog's worth,
# 100 by default): enough to drain a burst in a few turns, few enough that a storm of
# connects does not hold up the streams already being relayed.
ACCEPT_BATCH = 128
# Bytes read from a connection as it is accepted, at most (as much as a read of the loop takes).
FIRST_READ = 65536
# Out of file descriptors: stop accepting this long (as asyncio does), the connections wait
# in the backlog meanwhile.
RETRY_AFTER_S = 1.0
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The flag of a read that does not wait (where there is none, Windows, the socket is made
# non-blocking first).
_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)


def _accepted_class(family: socket.AddressFamily, kind: socket.SocketKind) -> type[socket.socket]:
    """A socket class whose `family` and `type` are those of a listener's connections, as
    values: the loop reads both of every accepted socket, which `socket.socket` works out
    through enum conversions (5 `enum` calls, ~110 bytecodes a connection)."""
    return type(
        "AcceptedSocket", (socket.socket,), {"__slots__": (), "family": family, "type": kind}
    )


class Acceptor:
    """Accept connections on a listening socket and serve each with a new protocol.

    Duck-types the part of `asyncio.Server` uvicorn uses (`close`, `wait_closed`).

    Args:
        loop: the running loop.
        sock: a bound, listening TCP socket (left open by `close`: its owner closes it).
        protocol_factory: makes the protocol of one connection.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        # The futures of connections being made (`_step`).
        self._waiting: set[asyncio.Future[Any]] = set()
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        # The protocol `_make` made for the connection being set up (one at most).
        self._made: list[asyncio.Protocol] = []
        sock.setblocking(False)
        # `socket.accept` without its per-connection enum conversions of the listener's
        # family and type (5 `enum` calls a connection): the C accept, and the
        # connection's socket made from these ints.
        self._accept_fd: Callable[[], tuple[int, object]] = sock._accept  # type: ignore[attr-defined]  # the C socket's, as socket.accept uses
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self._socket_class = _accepted_class(sock.family, sock.type)
        self._start()

    def __repr__(self) -> str:
        return f"Acceptor({self._sock.getsockname()!r}, serving={self._serving})"

    @property
    def serving(self) -> bool:
        """Whether the listener is watched (False once closed or while out of fds)."""
        return self._serving

    def _start(self) -> None:
        self._retry = None
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._serving = True

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = self._accept_fd()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: the next one may be there
            except OSError as exc:
                if exc.errno not in _OUT_OF_FDS:
                    raise
                # The connections stay in the backlog; taking them again later beats
                # spinning on a listener that stays readable.
                logger.error("accepting connections paused for %g s: %s", RETRY_AFTER_S, exc)
                self._loop.remove_reader(self._sock.fileno())
                self._serving = False
                self._retry = self._loop.call_later(RETRY_AFTER_S, self._start)
                return
            family, kind, proto = self._kind
            conn = self._socket_class(family, kind, proto, fd)
            # No setblocking(False) or TCP_NODELAY here: the loop's transport sets both
            # (uvloop and asyncio alike, for a TCP socket), and each is a system call per
            # connection. This one read must not wait: MSG_DONTWAIT.
            if not _DONTWAIT:  # pragma: no cover - Windows
                conn.setblocking(False)
            try:
                first = conn.recv(FIRST_READ, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                first = b""  # nothing yet: the loop reads it when it comes
            except OSError as exc:
                logger.debug("an accepted connection failed at once: %r", exc)
                conn.close()
                continue
            # (An empty read is also the end of the stream: the loop's own read sees it
            # again and reports it.)
            made = self._made
            self._step(self._loop.connect_accepted_socket(self._make, conn), conn)
            if made:
                protocol = made.pop()
                # The peer's address as accept gave it, before `connection_made` (which
                # then asks the kernel for nothing): a protocol that wants it says so.
                accepted = getattr(protocol, "accepted_from", None)
                if accepted is not None:
                    accepted(peer)
                if first:
                    # After `connection_made`, which the loop has just scheduled.
                    self._loop.call_soon(protocol.data_received, first)

    def _make(self) -> asyncio.Protocol:
        protocol = self._factory()
        self._made.append(protocol)
        return protocol

    def _step(
        self, connect: Coroutine[Any, Any, object], conn: socket.socket, waited: Any = None
    ) -> None:
        """Drive `connect_accepted_socket` by hand, as a task would: it makes the transport
        at once and then only waits for `connection_made`. Why no task: a task per
        connection and its two steps cost CPU for nothing (with the C accept above, ~5 us
        less of ~80 per connection: 3000 connections through an `Acceptor`, alternating
        with the task version, medians), and the transport is made in this loop turn
        instead of the next."""
        if waited is not None:
            self._waiting.discard(waited)
        try:
            waiter = connect.send(None)
        except StopIteration:
            return
        except (ConnectionError, OSError, asyncio.CancelledError) as exc:
            # Reset before the transport was made (or the loop is closing).
            logger.debug("an accepted connection failed at once: %r", exc)
            conn.close()
            return
        step = functools.partial(self._step, connect, conn)
        if waiter is None:  # a bare yield: asyncio's `sleep(0)`
            self._loop.call_soon(step)
            return
        self._waiting.add(waiter)  # a strong reference until it is done
        waiter.add_done_callback(step)

    def close(self) -> None:
        """Stop accepting (connections already made go on)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False

    async def wait_closed(self) -> None:
        """Wait for the connections being set up when `close` was called."""
        if self._waiting:
            await asyncio.gather(*self._waiting, return_exceptions=True)
