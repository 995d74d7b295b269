"""The gateway's listener takes every queued connection when it is readable (uvloop's own
server takes one per turn of the loop), stops on close, and pauses while the process is out
of file descriptors instead of spinning. Real sockets on 127.0.0.1, on uvloop."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
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


class Recording(asyncio.Protocol):
    """Records what reaches it, and where the turn of its `connection_made` ends (a
    callback scheduled from it, which runs after those already scheduled)."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append("made")
        # Whether the loop still has bytes to read (it reads only after a poll).
        fd = transport.get_extra_info("socket").fileno()  # uvloop's has no recv
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                self.events.append(("unread", len(sock.recv(1 << 20, socket.MSG_PEEK))))
            except BlockingIOError:
                self.events.append(("unread", 0))
        asyncio.get_running_loop().call_soon(self.events.append, "turn ends")

    def data_received(self, data: bytes) -> None:
        self.events.append(data)

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


def _serve_one(sock: socket.socket, until_lost: bool = False) -> list[object]:
    """The events of the one protocol an `Acceptor` on `sock` makes (within 5 turns, or
    until its connection is lost)."""

    async def main() -> list[object]:
        made: list[Recording] = []

        def factory() -> Recording:
            made.append(Recording())
            return made[-1]

        acceptor = Acceptor(asyncio.get_running_loop(), sock, factory)
        await turns(5)
        if until_lost:
            await asyncio.wait_for(made[0].lost, 10)
        elif made and made[0].transport is not None:
            made[0].transport.close()
            await asyncio.wait_for(made[0].lost, 10)
        acceptor.close()
        await acceptor.wait_closed()
        assert len(made) == 1
        return made[0].events

    events: list[object] = uvloop.run(main())
    return events


def test_bytes_waiting_at_accept_reach_the_protocol_in_the_turn_of_connection_made() -> None:
    """A request written as soon as the client connected is in the socket when a busy
    gateway accepts it: it is read then, and reaches `data_received` right after
    `connection_made`, with no poll of the loop in between (the loop's own first read came
    after one, and a loaded loop's poll runs hundreds of other reads first)."""
    with listener() as sock, queued(sock, 1) as clients:
        clients[0].sendall(b"POST / HTTP/1.1\r\n\r\n")
        assert _serve_one(sock) == [
            "made",
            ("unread", 0),
            b"POST / HTTP/1.1\r\n\r\n",
            "turn ends",
        ]


def test_more_than_one_read_waiting_at_accept_arrives_whole_and_in_order() -> None:
    """What the first read leaves in the socket follows from the loop's reads, in order,
    and the client's close after it is seen as the end of the stream."""
    sent = bytes(range(256)) * (3 * accept.FIRST_READ // 256 + 7)
    first = accept.FIRST_READ + 1000  # more than one read, less than the socket buffers
    with listener() as sock, queued(sock, 1) as clients:
        client = clients[0]
        client.sendall(sent[:first])

        def write() -> None:
            client.sendall(sent[first:])
            client.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)  # the rest would not fit: sent meanwhile
        writer.start()
        try:
            events = _serve_one(sock, until_lost=True)
        finally:
            writer.join(10)
    assert events[0] == "made"
    assert events[2] == sent[: accept.FIRST_READ]  # read at accept, then the loop's reads
    assert events[-1] == "eof"
    assert b"".join(e for e in events if isinstance(e, bytes)) == sent


def test_a_connection_closed_before_it_is_accepted_reads_nothing_and_ends() -> None:
    """A client gone before its connection is accepted: no bytes, the end of the stream."""
    with listener() as sock, queued(sock, 1) as clients:
        clients[0].shutdown(socket.SHUT_WR)
        events = _serve_one(sock, until_lost=True)
    assert events[:2] == ["made", ("unread", 0)]
    assert "eof" in events
    assert not any(isinstance(e, bytes) for e in events)


class Told(Recording):
    """A `Recording` that wants the peer's address from the acceptor."""

    def accepted_from(self, peer: object) -> None:
        self.events.append(("peer", peer))


def test_a_protocol_that_asks_is_told_the_peer_address_before_connection_made() -> None:
    """The address `accept` returned reaches the protocol before `connection_made`, so the
    gateway's protocol need not ask the kernel for it (getpeername) per connection."""
    with listener() as sock, queued(sock, 1) as clients:

        async def main() -> list[object]:
            made: list[Told] = []

            def factory() -> Told:
                made.append(Told())
                return made[-1]

            acceptor = Acceptor(asyncio.get_running_loop(), sock, factory)
            await turns(5)
            assert made[0].transport is not None
            made[0].transport.close()
            await asyncio.wait_for(made[0].lost, 10)
            acceptor.close()
            return made[0].events

        events: list[object] = uvloop.run(main())
        assert events[:2] == [("peer", clients[0].getsockname()), "made"]


def test_a_protocol_that_does_not_ask_is_made_as_before() -> None:
    """Protocols without `accepted_from` (asyncio's, uvicorn's own) are not told."""
    with listener() as sock, queued(sock, 1):
        assert _serve_one(sock)[:1] == ["made"]


def test_an_accepted_connection_is_non_blocking_with_nodelay_from_a_listener_without() -> None:
    """The acceptor leaves both to the loop's transport: a connection accepted from a
    listener without TCP_NODELAY still gets it (Nagle would hold a first chunk behind the
    head until the client's delayed ACK), and is non-blocking."""

    async def main() -> tuple[int, int]:
        with listener() as sock, queued(sock, 1):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            made: list[Recording] = []

            def factory() -> Recording:
                made.append(Recording())
                return made[-1]

            acceptor = Acceptor(asyncio.get_running_loop(), sock, factory)
            await turns(5)
            transport = made[0].transport
            assert transport is not None
            fd = transport.get_extra_info("socket").fileno()
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
                nodelay = dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            blocking = os.get_blocking(fd)
            transport.close()
            await asyncio.wait_for(made[0].lost, 10)
            acceptor.close()
            return nodelay, int(blocking)

    nodelay, blocking = uvloop.run(main())
    assert nodelay != 0
    assert blocking == 0
