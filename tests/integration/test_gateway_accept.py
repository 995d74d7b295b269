"""The gateway's listener takes every queued connection when it is readable (uvloop's own
server takes one per turn of the loop), stops on close, and pauses while the process is out
of file descriptors instead of spinning. Real sockets on 127.0.0.1, on uvloop."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from unbroken.gateway import accept
from unbroken.gateway.accept import Acceptor

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.integration

N = 40


class Counting(asyncio.Protocol):
    """Counts the connections made (a class attribute: one count per test)."""

    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counting.made += 1
        transport.close()


@contextmanager
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    try:
        yield sock
    finally:
        sock.close()


@contextmanager
def queued(sock: socket.socket, n: int) -> Iterator[list[socket.socket]]:
    """`n` client connections completed by the kernel, waiting in `sock`'s backlog."""
    with ExitStack() as stack:
        clients = [
            stack.enter_context(socket.create_connection(sock.getsockname())) for _ in range(n)
        ]
        yield clients


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_every_queued_connection_is_made_within_a_few_turns() -> None:
    """40 connections waiting in the backlog are all made within 5 turns of the loop (one
    readiness of the listener, then each one's connection_made)."""
    Counting.made = 0

    async def main(sock: socket.socket) -> int:
        acceptor = Acceptor(asyncio.get_running_loop(), sock, Counting)
        await turns(5)
        acceptor.close()
        await acceptor.wait_closed()
        return Counting.made

    with listener() as sock, queued(sock, N):
        assert uvloop.run(main(sock)) == N


def test_queued_connections_are_made_with_no_task_in_between() -> None:
    """The transports are made when the listener is readable, not in a task a turn later:
    every queued connection has had its `connection_made` two turns on (the listener's
    readiness, then the loop's call of `connection_made`; a task per connection took three)."""
    Counting.made = 0

    async def main(sock: socket.socket) -> tuple[int, int]:
        acceptor = Acceptor(asyncio.get_running_loop(), sock, Counting)
        await turns(2)
        made_then = Counting.made
        acceptor.close()
        await acceptor.wait_closed()
        return made_then, Counting.made

    with listener() as sock, queued(sock, 10):
        assert uvloop.run(main(sock)) == (10, 10)


def test_a_connection_failing_while_made_is_closed_and_the_others_are_made() -> None:
    """A connection whose setup fails at once (its protocol cannot be made: reset) is
    closed, and the acceptor goes on with the connections queued behind it."""
    Counting.made = 0
    calls = [0]

    def factory() -> asyncio.Protocol:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionResetError("reset while being made")
        return Counting()

    async def main(sock: socket.socket) -> int:
        acceptor = Acceptor(asyncio.get_running_loop(), sock, factory)
        await turns(5)
        acceptor.close()
        await acceptor.wait_closed()
        return Counting.made

    with listener() as sock, queued(sock, 4) as clients:
        assert uvloop.run(main(sock)) == 3
        clients[0].settimeout(5)
        assert clients[0].recv(1) == b""  # closed by the gateway, not left hanging
        assert calls[0] == 4


def test_close_stops_accepting() -> None:
    """After close, queued connections stay in the backlog: none is made."""
    Counting.made = 0

    async def main(sock: socket.socket) -> tuple[bool, int]:
        acceptor = Acceptor(asyncio.get_running_loop(), sock, Counting)
        acceptor.close()
        await turns(5)
        return acceptor.serving, Counting.made

    with listener() as sock, queued(sock, 3):
        assert uvloop.run(main(sock)) == (False, 0)


class OutOfFds(socket.socket):
    """A listening socket whose first accept fails as a process out of descriptors does."""

    failed = False

    # The C accept, which `Acceptor` calls (as `socket.accept` does).
    def _accept(self) -> tuple[int, object]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()  # type: ignore[misc, no-any-return]  # the C socket's


def test_out_of_fds_pauses_then_accepts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE: the listener is unwatched (the connections wait in the backlog), then watched
    again after RETRY_AFTER_S, and the waiting connections are made."""
    monkeypatch.setattr(accept, "RETRY_AFTER_S", 0.05)
    Counting.made = 0

    async def main(sock: socket.socket) -> tuple[bool, int, int]:
        all_made = asyncio.Event()

        class Fifth(Counting):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                if Counting.made == 5:
                    all_made.set()

        acceptor = Acceptor(asyncio.get_running_loop(), sock, Fifth)
        await turns(3)
        paused, made = acceptor.serving, Counting.made
        await all_made.wait()  # the retry is a timer: wait for its effect
        acceptor.close()
        return paused, made, Counting.made

    sock = OutOfFds(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        with queued(sock, 5):
            assert uvloop.run(asyncio.wait_for(main(sock), 10)) == (False, 0, 5)
    finally:
        sock.close()
