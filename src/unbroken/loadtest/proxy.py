"""A TCP fault proxy for `unbroken bench`: it sits between the tool and the endpoint and
cuts connections at a chosen point of the response, the way a load balancer, a NAT or a
mobile network does. asyncio only; it records when it cut (monotonic clock of this process),
so the runner can measure cut-to-next-byte exactly.

Every connection to the proxy is cut by the same rule; the runner sends only the requests it
wants cut through the proxy, each on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

from unbroken.loadtest.faults import CutRule

__all__ = ["FaultProxy"]

# Read size of the relay: one socket read, as a reverse proxy would do.
READ_BYTES = 65536


class FaultProxy:
    """Relay TCP from a loopback port to `target` and cut each connection by `rule`.

    Use as an async context manager; `port` is the listening port; `cuts` maps the local
    (client-side) port of each cut connection to the monotonic time of the cut.
    """

    def __init__(self, target_host: str, target_port: int, rule: CutRule) -> None:
        self._target = (target_host, target_port)
        self._rule = rule
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.cuts: dict[int, float] = {}
        self.port = 0

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - a handler always runs in a task
        self._tasks.add(task)
        peer_port = writer.get_extra_info("peername")[1]
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _abort(writer)
            self._tasks.discard(task)
            return
        upward = asyncio.create_task(_pipe(reader, up_writer))
        downward = asyncio.create_task(self._relay_down(up_reader, writer, peer_port))
        try:
            # Either side closing ends the connection (HTTP clients do not half-close).
            await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for side in (upward, downward):
                side.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await side
            _abort(up_writer)
            _abort(writer)
            self._tasks.discard(task)

    async def _relay_down(
        self, up: asyncio.StreamReader, down: asyncio.StreamWriter, peer_port: int
    ) -> None:
        rule = self._rule
        sent = 0
        deadline: float | None = None
        while True:
            if deadline is None:
                timeout = None
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            try:
                data = await asyncio.wait_for(up.read(READ_BYTES), timeout)
            except TimeoutError:
                break
            if not data:
                down.close()
                return
            if deadline is None and rule.after_ms is not None:
                deadline = time.monotonic() + rule.after_ms / 1000.0
            if rule.after_bytes is not None and sent + len(data) >= rule.after_bytes:
                down.write(data[: rule.after_bytes - sent])
                await down.drain()
                break
            sent += len(data)
            down.write(data)
            await down.drain()
        self.cuts[peer_port] = time.monotonic()
        _abort(down)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(READ_BYTES):
        writer.write(data)
        await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER on with a zero timeout makes close() send a TCP RST, as a cut does.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
