"""Real processes for the stream-log tests and `bench/streams.py`: redis-server, gateway
subprocesses on one Redis, nginx round-robin in front of them (buffering off), a TCP fault
proxy that cuts connections at chosen byte offsets, and a reconnecting SSE client.

Everything listens on 127.0.0.1 free ports; binaries come from Debian (`require` decides
whether a missing one skips or fails).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx

from tests.nginx import render_nginx_conf
from tests.support import free_port

__all__ = [
    "FaultProxy",
    "Reader",
    "gateway_process",
    "nginx",
    "read_answer",
    "redis_server",
]

SERVE = (
    "import sys, typer; from unbroken.cli.gateway_cmds import serve; "
    "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
)


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.02)  # waiting for another process to listen


@contextmanager
def redis_server(binary: str) -> Iterator[str]:
    """A throwaway redis-server; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, proc, "redis-server")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def gateway_process(
    upstream: str, store: str, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`unbroken serve` in a subprocess on a free port, on `store`; yields (process, URL).
    `env` adds UNBROKEN_GATEWAY_* settings (names without the prefix, lowercase)."""
    port = free_port()
    # No inherited gateway settings; the chunk path's mode (tests/conftest.py) is kept, so
    # these gateways run the sources as every other process the suite starts.
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("UNBROKEN_") or k == "UNBROKEN_PURE_PYTHON"
    }
    environ.update(
        DEEPSEEK_API_KEY="sk-up",
        PYTHONPATH=os.pathsep.join(sys.path),
        UNBROKEN_GATEWAY_STORE=store,
        UNBROKEN_GATEWAY_FORWARD_HEADERS="x-mock-*",
    )
    environ.update({f"UNBROKEN_GATEWAY_{k.upper()}": v for k, v in env.items()})
    proc = subprocess.Popen(
        # One process per instance (no --workers supervisor), so SIGKILL takes the instance
        # and its writers down at once instead of letting forked workers drain.
        [
            sys.executable,
            "-c",
            SERVE,
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--workers",
            "1",
        ],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=None if os.environ.get("UNBROKEN_TEST_GATEWAY_LOGS") else subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "the gateway")
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


@contextmanager
def nginx(binary: str, backends: list[str]) -> Iterator[str]:
    """nginx round-robin over `backends` (host:port), buffering off, configured by the
    shipped deploy/nginx.conf (the file compose.yaml runs); yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        conf = Path(workdir) / "nginx.conf"
        conf.write_text(render_nginx_conf(workdir, f"127.0.0.1:{port}", backends))
        proc = subprocess.Popen(
            [binary, "-p", workdir, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, proc, "nginx")
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


class FaultProxy:
    """A TCP proxy on a free port, in its own thread and event loop. Connection number i
    (from 0), whose first read from the client is `head`, has its server-to-client
    direction cut after `cut(i, head)` bytes (both sockets reset), or never for None.

    Args:
        target: (host, port) to forward to.
        cut: byte offset of the cut for each connection, or None.
    """

    def __init__(self, target: tuple[str, int], cut: Callable[[int, bytes], int | None]) -> None:
        self.target = target
        self._cut = cut
        self._n = 0
        self._open: set[asyncio.StreamWriter] = set()
        self.n_cut = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.read(65536)
        index = self._n
        self._n += 1
        limit = self._cut(index, head)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        up_writer.write(head)
        self._open.add(writer)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None
        ) -> None:
            sent = 0
            try:
                while data := await src.read(65536):
                    if limit is not None and sent + len(data) >= limit:
                        dst.write(data[: limit - sent])
                        await dst.drain()
                        self.n_cut += 1
                        for w in (writer, up_writer):
                            w.transport.abort()
                        return
                    sent += len(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, None), pump(up_reader, writer, limit))
        finally:
            self._open.discard(writer)

    def cut_all(self) -> None:
        """Reset every open client connection now (a network loss for everyone)."""

        def cut() -> None:
            for writer in list(self._open):
                writer.transport.abort()
                self.n_cut += 1

        self._loop.call_soon_threadsafe(cut)


@dataclass
class Reader:
    """One answer read through a reconnecting SSE client (what a browser's EventSource
    does, with POST first): events by id, reconnects, and when bytes came."""

    events: dict[int, bytes] = field(default_factory=dict)
    stream_id: str = ""
    reconnects: int = 0
    last_id: int = 0
    done: bool = False
    byte_times: list[float] = field(default_factory=list)

    def feed(self, data: bytes, buffer: bytearray) -> None:
        self.byte_times.append(time.monotonic())
        buffer += data
        while (end := buffer.find(b"\n\n")) >= 0:
            block = bytes(buffer[:end])
            del buffer[: end + 2]
            ident = payload = None
            for line in block.split(b"\n"):
                if line.startswith(b"id: "):
                    ident = int(line[4:])
                elif line.startswith(b"data: "):
                    payload = line[6:]
            if ident is None or payload is None:
                continue
            assert ident == self.last_id + 1, f"gap or repeat: {self.last_id} -> {ident}"
            self.events[ident] = payload
            self.last_id = ident
            if payload == b"[DONE]":
                self.done = True


async def read_answer(
    client: httpx.AsyncClient,
    body: dict[str, object],
    headers: dict[str, str],
    *,
    on_event: Callable[[Reader], None] | None = None,
    max_reconnects: int = 20,
) -> Reader:
    """POST `body`, then reconnect to /v1/streams/{id} with the last event id until [DONE]."""
    reader = Reader()
    request: tuple[str, str, dict[str, object] | None] = ("POST", "/v1/chat/completions", body)
    while not reader.done:
        method, path, payload = request
        buffer = bytearray()
        extra = dict(headers) if method == "POST" else {"Last-Event-ID": str(reader.last_id)}
        try:
            async with client.stream(method, path, json=payload, headers=extra) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{method} {path}: {response.status_code}")
                reader.stream_id = reader.stream_id or response.headers["x-unbroken-stream-id"]
                async for data in response.aiter_raw():
                    reader.feed(data, buffer)
                    if on_event is not None:
                        on_event(reader)
        except (httpx.TransportError, RuntimeError):
            if not reader.stream_id or reader.reconnects >= max_reconnects:
                raise
            await asyncio.sleep(0.05)  # a beat before reconnecting, as EventSource does
        if not reader.done:
            reader.reconnects += 1
            request = ("GET", f"/v1/streams/{reader.stream_id}", None)
    return reader


@dataclass
class LossRun:
    """The outcome of `run_with_loss`.

    Attributes:
        readers: one per stream.
        killed_at: when the loss was caused (monotonic).
        gaps_s: for each stream that lost its connection, the seconds from the loss to
            its next byte (which may be replayed from the log).
        stalls_s: for the same streams, the longest wait for a byte after the loss
            (for a dead writer: until the new one produces).
    """

    readers: list[Reader]
    killed_at: float
    gaps_s: list[float]
    stalls_s: list[float]


async def run_with_loss(
    base_url: str,
    body: dict[str, object],
    headers: dict[str, str],
    n_streams: int,
    lose: Callable[[], None],
    *,
    after_events: int = 5,
) -> LossRun:
    """Start `n_streams` answers through `base_url`; once each has `after_events` events,
    call `lose()` (kill an instance...); read every answer to its end, reconnecting."""
    started = asyncio.Event()
    counts = [0] * n_streams
    killed_at = 0.0

    def progress(i: int) -> Callable[[Reader], None]:
        def on_event(reader: Reader) -> None:
            counts[i] = reader.last_id
            if not started.is_set() and min(counts) >= after_events:
                started.set()

        return on_event

    limits = httpx.Limits(max_connections=n_streams * 2, max_keepalive_connections=n_streams)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        tasks = [
            asyncio.create_task(read_answer(client, body, headers, on_event=progress(i)))
            for i in range(n_streams)
        ]
        await asyncio.wait_for(started.wait(), 60)
        killed_at = time.monotonic()
        lose()
        readers = await asyncio.gather(*tasks)
    gaps, stalls = [], []
    for reader in readers:
        if reader.reconnects:
            after = [killed_at] + [t for t in reader.byte_times if t > killed_at]
            if len(after) > 1:
                gaps.append(after[1] - killed_at)
                stalls.append(max(b - a for a, b in pairwise(after)))
    return LossRun(list(readers), killed_at, gaps, stalls)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
