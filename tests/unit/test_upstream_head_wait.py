"""The wait for an upstream response's head (gateway/upstream.py `_HeadWait`): the task
waiting for it goes on within the read that brought the head, after the whole read is
parsed (its events buffered for the task), not in a later turn of the loop; woken any
other way (a lost connection, a cancellation) it goes on from the loop, as with a future;
with a read timeout the wait is a plain future, as before."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.support import Wire
from unbroken.gateway.upstream import LeanTransport, _Connection

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'data: {"n":1}\n\n'
REQUEST = b"POST /chat/completions HTTP/1.1\r\nHost: upstream\r\n\r\n"


def frame(event: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(event), event)


def connection(loop: asyncio.AbstractEventLoop) -> tuple[_Connection, Wire]:
    conn = _Connection(loop, ("http", "upstream", 80), 1 << 20)
    wire = Wire()
    conn.connection_made(wire)  # type: ignore[arg-type]  # a stand-in stream transport
    conn.begin()
    return conn, wire


async def waiting(
    pool: LeanTransport, conn: _Connection, seen: list[Any], read_s: float | None = None
) -> asyncio.Task[None]:
    """A task that sends a request on `conn` and notes the response (status, body so far)
    when its head is in; returned once it waits for the head."""

    async def ask() -> None:
        response = await pool._exchange(conn, REQUEST, {"read": read_s})
        seen.append((response.status_code, conn.take() if conn.body else b""))

    task = asyncio.get_running_loop().create_task(ask())
    await asyncio.sleep(0)  # the task writes its request and waits
    return task


async def in_a_read(conn: _Connection, data: bytes, seen: list[Any]) -> list[Any]:
    """Feed `data` to `conn` from a loop callback, as the loop does; what `seen` held when
    that callback returned."""
    loop = asyncio.get_running_loop()
    then: asyncio.Future[list[Any]] = loop.create_future()

    def read() -> None:
        conn.data_received(data)
        then.set_result(list(seen))

    loop.call_soon(read)
    return await then


def test_the_head_wakes_its_task_within_the_read_with_the_read_parsed(run: Any) -> None:
    async def main() -> None:
        pool = LeanTransport(max_connections=1)
        conn, wire = connection(asyncio.get_running_loop())
        seen: list[Any] = []
        task = await waiting(pool, conn, seen)
        assert wire.writes == [REQUEST]
        # The head and the first event in one read: the task has them when the read ends.
        assert await in_a_read(conn, HEAD + frame(EVENT), seen) == [(200, EVENT)]
        await task

    run(main)


def test_a_head_split_over_reads_wakes_the_task_in_the_read_that_ends_it(run: Any) -> None:
    async def main() -> None:
        pool = LeanTransport(max_connections=1)
        conn, _ = connection(asyncio.get_running_loop())
        seen: list[Any] = []
        task = await waiting(pool, conn, seen)
        assert await in_a_read(conn, HEAD[:20], seen) == []
        assert await in_a_read(conn, HEAD[20:], seen) == [(200, b"")]
        await task

    run(main)


def test_a_lost_connection_wakes_the_task_from_the_loop(run: Any) -> None:
    async def main() -> None:
        pool = LeanTransport(max_connections=1)
        conn, _ = connection(asyncio.get_running_loop())
        task = await waiting(pool, conn, [])
        conn.connection_lost(None)
        with pytest.raises(httpx.ReadError):
            await task
        assert conn.waiter is None

    run(main)


def test_a_cancelled_wait_for_the_head_cancels_the_task(run: Any) -> None:
    async def main() -> None:
        pool = LeanTransport(max_connections=1)
        conn, _ = connection(asyncio.get_running_loop())
        seen: list[Any] = []
        task = await waiting(pool, conn, seen)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.waiter is None
        conn.data_received(HEAD)  # too late: nothing waits
        assert seen == []

    run(main)


def test_with_a_read_timeout_the_head_wakes_the_task_from_the_loop(run: Any) -> None:
    async def main() -> None:
        pool = LeanTransport(max_connections=1)
        conn, _ = connection(asyncio.get_running_loop())
        seen: list[Any] = []
        task = await waiting(pool, conn, seen, read_s=30.0)
        assert await in_a_read(conn, HEAD, seen) == []
        await task
        assert seen == [(200, b"")]

    run(main)
