"""LeanTransport's connects to plain-http upstreams on a socket of its own (`_Dialing`): the
request is written from the callback in which the loop sees the connect complete, before
the loop's transport exists; failures, timeouts and cancellations end as before, and no
socket is left open. Each test runs on the asyncio loop and on uvloop, against real
sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from typing import Any

import httpx
import pytest

from tests.support import Watched, on_loop
from unbroken.gateway.upstream import LeanTransport
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

LOOPS = ["asyncio", "uvloop"]
HEAD = b"Host: 127.0.0.1\r\nContent-Length: 2\r\n"


def _fds() -> set[str]:
    """The process's open sockets (a loop opens other files once, lazily)."""
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed since
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:"):
                sockets.add(link)
    return sockets


async def _no_fd_left(before: set[str]) -> None:
    """Until the loop has closed what was closed (its close callbacks run over a few
    passes): no socket open that was not in `before`."""
    for _ in range(100):
        if _fds() <= before:
            return
        await asyncio.sleep(0)
    assert _fds() <= before, "a socket was left open"


async def _others_done() -> None:
    """Until every task but the caller's has ended (connects opened, handed or cancelled)."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_request_is_written_before_the_loop_makes_its_transport(loop_name: str) -> None:
    """A request that opens its connection has its bytes on the upstream's socket before
    the loop runs `connection_made` (the write no longer waits for the loop's transport);
    the response is read through that transport and the connection is pooled."""
    seen: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []
        connect = loop.create_connection

        def before_made() -> None:
            listener.settimeout(10)
            server, _ = listener.accept()
            accepted.append(server)
            # Not written yet: select waits its second out and nothing is seen.
            ready = select.select([server], [], [], 1)[0]
            seen.append(server.recv(65536, socket.MSG_PEEK) if ready else b"")

        async def watched_connect(factory: Any, *args: Any, **kwargs: Any) -> Any:
            made: list[asyncio.Protocol] = []

            def watched() -> asyncio.Protocol:
                made.append(factory())
                return Watched(made[0], before_made=before_made)

            transport, _ = await connect(watched, *args, **kwargs)
            return transport, made[0]

        loop.create_connection = watched_connect  # type: ignore[method-assign,assignment]  # watch the loop's calls
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            sent = asyncio.ensure_future(pool.unbroken_send_post(url, HEAD, b"{}", {}))
            while not seen:
                await asyncio.sleep(0)
                assert not sent.done(), sent
            assert seen[0].startswith(b"POST /chat/completions HTTP/1.1\r\n"), "written later"
            assert seen[0].endswith(b"\r\n\r\n{}")
            accepted[0].recv(65536)
            accepted[0].sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            response = await asyncio.wait_for(sent, 10)
            assert response.status_code == 200
            assert await response.aread() == b"ok"
            await response.aclose()
            assert pool._open == 1
            assert len(pool._idle[("http", "127.0.0.1", port)]) == 1
        finally:
            await pool.aclose()
            for server in accepted:
                server.close()
            listener.close()

    on_loop(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_body_larger_than_the_socket_takes_at_once_arrives_whole(loop_name: str) -> None:
    """What the socket does not take from the request's first write is written through the
    loop's transport once it exists: the upstream reads the whole body, in order."""
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB: past any loopback socket buffer

    async def main() -> None:
        got = bytearray()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            got.extend(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            head = b"Host: 127.0.0.1\r\nContent-Length: %d\r\n" % len(body)
            response = await asyncio.wait_for(pool.unbroken_send_post(url, head, body, {}), 10)
            assert await response.aread() == b"ok"
            await response.aclose()
            assert bytes(got) == body
        finally:
            await pool.aclose()
            server.close()

    on_loop(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_refused_connect_is_an_httpx_connect_error_and_leaves_no_socket(
    loop_name: str,
) -> None:
    """A connect refused (nothing listens): httpx.ConnectError naming the upstream, no
    connection counted, no socket left open, and the next request connects afresh."""

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as closed:
            port = closed.getsockname()[1]  # nothing listens there once closed
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            before = _fds()
            with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
                await pool.unbroken_send_post(url, HEAD, b"{}", {})
            assert pool._open == 0
            await _others_done()
            await _no_fd_left(before)
            with pytest.raises(httpx.ConnectError):
                await pool.unbroken_send_post(url, HEAD, b"{}", {})
            assert pool._open == 0
        finally:
            await pool.aclose()

    on_loop(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_connect_past_its_timeout_is_a_connect_timeout_and_leaves_no_socket(
    loop_name: str,
) -> None:
    """A connect that does not complete within its timeout (the listener's queue is full:
    the kernel drops its handshake): httpx.ConnectTimeout, nothing counted, the socket
    closed."""

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fill = []
        for _ in range(3):  # past the queue of a backlog of 0: later handshakes are dropped
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            fill.append(sock)
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            before = _fds()
            with pytest.raises(httpx.ConnectTimeout):
                await pool.unbroken_send_post(url, HEAD, b"{}", {"connect": 0.2, "read": 10.0})
            assert pool._open == 0
            await _others_done()
            await _no_fd_left(before)
        finally:
            await pool.aclose()
            for sock in fill:
                sock.close()
            listener.close()

    on_loop(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_request_cancelled_while_its_socket_is_handed_to_the_loop_leaves_no_socket(
    loop_name: str,
) -> None:
    """A request cancelled (its client gone) after its bytes were written and before the
    loop's transport took the socket: the cancellation reaches the caller, the upstream
    sees the request then the connection's end, nothing is counted, no socket is left."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        connect = loop.create_connection
        sent: list[asyncio.Task[Any]] = []

        async def cancelling_connect(*args: Any, **kwargs: Any) -> Any:
            assert "sock" in kwargs  # the socket handed over, the request written
            sent[0].cancel()
            return await connect(*args, **kwargs)

        loop.create_connection = cancelling_connect  # type: ignore[method-assign]  # cancel at the hand-over
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            before = _fds()
            sent.append(loop.create_task(pool.unbroken_send_post(url, HEAD, b"{}", {})))
            with pytest.raises(asyncio.CancelledError):
                await sent[0]
            assert pool._open == 0
            await _others_done()
            listener.settimeout(10)
            server, _ = listener.accept()
            with server:
                server.settimeout(10)
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := server.recv(65536):
                        got += chunk
                assert got.startswith(b"POST /chat/completions HTTP/1.1\r\n")
            await _no_fd_left(before)
        finally:
            await pool.aclose()
            listener.close()

    on_loop(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_name_is_resolved_and_each_address_tried(loop_name: str) -> None:
    """An upstream named (not an address): the name is resolved and its addresses tried in
    turn ("localhost" may give ::1 first, where nothing listens here), then the answers of
    the mock stream through the connection made."""

    async def main() -> None:
        with MockServer(MockConfig(seed=3)) as mock:
            port = httpx.URL(mock.url).port
            pool = LeanTransport()
            try:
                url = httpx.URL(f"http://localhost:{port}/v1/chat/completions")
                body = b'{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"t"}]}'
                head = (
                    b"Host: localhost\r\nAuthorization: Bearer sk\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
                )
                for _ in range(2):
                    response = await asyncio.wait_for(
                        pool.unbroken_send_post(url, head, body, {}), 10
                    )
                    assert response.status_code == 200
                    assert (await response.aread()).endswith(b"data: [DONE]\n\n")
                    await response.aclose()
                assert pool._open == 1  # the second reused the first's connection
            finally:
                await pool.aclose()

    on_loop(loop_name, main)
