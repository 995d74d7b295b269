"""mock.pacer: plain timed streams sent from one shared timer, straight to the transport.

The server side is a stand-in for uvicorn's httptools cycle (chunked framing of `send`,
its flow control: `send` waits while the transport is over its high-water mark) over a
transport that records every write with the loop time; the mock's own code runs as is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import pytest

from unbroken.mock.config import Latency
from unbroken.mock.exchange import (
    CHUNKED_WRITES_EXTENSION,
    TRANSPORT_EXTENSION,
    Closed,
    Exchange,
)
from unbroken.mock.faults import FaultPlan
from unbroken.mock.pacer import Pacer
from unbroken.mock.respond import Job, send_stream
from unbroken.mock.stats import MockStats
from unbroken.mock.text import Answer

HIGH = 4096


class Transport:
    """Records writes; `reader_stalled` keeps what is written buffered (nothing drains)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.writes: list[tuple[float, bytes]] = []
        self.closing = False
        self.reader_stalled = False
        self.buffered = 0
        self.writes_after_close = 0
        self.wrote = asyncio.Event()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def write(self, data: bytes) -> None:
        if self.closing:
            self.writes_after_close += 1
        self.writes.append((self.loop.time(), data))
        self.wrote.set()
        if self.reader_stalled:
            self.buffered += len(data)

    async def written(self, n: int) -> None:
        """Wait until `n` writes were made."""
        while len(self.writes) < n:
            self.wrote.clear()
            await self.wrote.wait()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (HIGH // 4, HIGH)

    def wire(self) -> bytes:
        return b"".join(data for _, data in self.writes)


class Server:
    """uvicorn's httptools cycle as far as the mock uses it: chunked framing, a wait in
    `send` while the transport is over its high-water mark, `http.disconnect` once gone."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.gone = asyncio.Event()
        self.drained = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        transport = self.transport
        while transport.get_write_buffer_size() > HIGH and not transport.closing:
            await self.drained.wait()
            self.drained.clear()
        if transport.closing:
            return
        if message["type"] == "http.response.start":
            transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            return
        body = message.get("body", b"")
        content = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
        if not message.get("more_body", False):
            content.append(b"0\r\n\r\n")
        transport.write(b"".join(content))

    def leave(self) -> None:
        self.transport.closing = True
        self.gone.set()


def job(n_tokens: int, token_ms: float, pacer: Pacer | None, **plan: Any) -> Job:
    return Job(
        completion_id="c1",
        created=1,
        model="deepseek-chat",
        thinking=False,
        include_usage=True,
        answer=Answer((), tuple(f"w{i} " for i in range(n_tokens))),
        finish_reason="stop",
        prompt_tokens=5,
        cache_hit_tokens=0,
        latency=Latency(token_ms=token_ms),
        plan=FaultPlan(**plan),
        pacer=pacer,
    )


def exchange(transport: Transport, server: Server) -> Exchange:
    scope = {
        "type": "http",
        "extensions": {TRANSPORT_EXTENSION: transport, CHUNKED_WRITES_EXTENSION: True},
    }
    return Exchange(scope, server.receive, server.send)


async def stream(
    the_job: Job, *, during: Any = None
) -> tuple[Transport, Server, MockStats, float, str | BaseException]:
    """Run send_stream on the stand-in server; `during(transport, server, task)` runs
    beside it. Returns the transport, server, stats, arrival time and outcome."""
    loop = asyncio.get_running_loop()
    transport = Transport(loop)
    server = Server(transport)
    ex = exchange(transport, server)
    stats = MockStats()
    arrived = loop.time()
    task = asyncio.ensure_future(send_stream(ex, the_job, arrived, stats))
    if during is not None:
        await during(transport, server, task)
    outcome: str | BaseException
    try:
        outcome = await task
    except (Closed, asyncio.CancelledError) as exc:
        outcome = exc
    finally:
        await ex.aclose()
    return transport, server, stats, arrived, outcome


def events_of(data: bytes) -> int:
    return data.count(b"data: ")


def body_writes(transport: Transport) -> list[tuple[float, bytes]]:
    """The body writes (the head and the last-chunk write left out)."""
    return [(at, data) for at, data in transport.writes[1:] if b"data: " in data]


def frames(wire: bytes) -> tuple[bytes, list[bytes]]:
    """The head and the chunks' payloads of a chunked response, checked to be framed
    exactly as uvicorn frames them, each chunk whole events, ended by the last chunk."""
    head, _, rest = wire.partition(b"\r\n\r\n")
    payloads: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return head, payloads
        payload = rest[:size]
        assert size_line == b"%x" % len(payload)
        assert rest[size : size + 2] == b"\r\n"
        assert payload.startswith(b"data: ")
        assert payload.endswith(b"\n\n")
        payloads.append(payload)
        rest = rest[size + 2 :]


def test_a_plain_timed_stream_goes_through_the_pacer_with_the_awaited_paths_bytes() -> None:
    """The pacer writes what the awaited path writes: the same head, body and framing (a
    chunk per write, whole events each; which events share a write depends on how late
    the loop woke), the same counters; and it is idle afterwards."""

    async def main() -> None:
        pacer = Pacer()
        paced_job = job(12, 2.0, pacer)
        paced, _, paced_stats, _, outcome = await stream(paced_job)
        assert outcome == "ok"
        awaited_job = job(12, 2.0, None)
        awaited, _, awaited_stats, _, _ = await stream(awaited_job)
        paced_head, paced_chunks = frames(paced.wire())
        awaited_head, awaited_chunks = frames(awaited.wire())
        assert paced_head == awaited_head
        assert b"".join(paced_chunks) == b"".join(awaited_chunks)
        assert len(paced_chunks) == len(body_writes(paced))  # one chunk per write
        assert paced.wire().endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert paced_stats.streams_paced == 1
        assert awaited_stats.streams_paced == 0
        assert paced_stats.chunks_sent == awaited_stats.chunks_sent == 15
        assert paced_job.n_chunks == awaited_job.n_chunks == 15
        assert paced_job.completed
        assert pacer.is_idle

    asyncio.run(main())


def test_every_event_leaves_at_or_after_its_due_time_one_write_each() -> None:
    """Event 0 and token 1 at once, token k at (k-1) x token_ms, the final chunk and
    [DONE] with the last token; an idle loop writes each event alone."""

    async def main() -> None:
        transport, _, _, arrived, _ = await stream(job(8, 10.0, Pacer()))
        writes = body_writes(transport)
        # The role chunk and token 1 together (due at once), then one write per token, the
        # last with the final chunk and [DONE].
        assert [events_of(data) for _, data in writes] == [2, 1, 1, 1, 1, 1, 1, 3]
        for index, (at, _) in enumerate(writes):
            assert at >= arrived + index * 0.010

    asyncio.run(main())


def test_a_late_loop_sends_what_fell_due_in_one_write_then_keeps_the_schedule() -> None:
    async def main() -> None:
        async def block(transport: Transport, server: Server, task: Any) -> None:
            await transport.written(4)
            # The loop busy elsewhere for 60 ms (12 tokens' time): blocking it is the point.
            time.sleep(0.06)  # noqa: ASYNC251

        transport, _, _, arrived, outcome = await stream(job(40, 5.0, Pacer()), during=block)
        assert outcome == "ok"
        writes = body_writes(transport)
        counts = [events_of(data) for _, data in writes]
        assert max(counts[:-1]) >= 10  # the late wake catches up at once
        assert sum(counts) == 43
        sent = 0
        for at, data in writes:
            sent += events_of(data)
            last = min(sent - 1, 40)  # the index of the last token in this write
            assert at >= arrived + (last - 1) * 0.005 - 0.001 - 1e-9

    asyncio.run(main())


def test_a_client_that_leaves_ends_the_stream_and_the_pacer_lets_it_go() -> None:
    async def main() -> None:
        pacer = Pacer()

        async def leave(transport: Transport, server: Server, task: Any) -> None:
            await transport.written(5)
            server.leave()

        the_job = job(200, 5.0, pacer)
        transport, _, stats, _, outcome = await stream(the_job, during=leave)
        assert isinstance(outcome, Closed)
        assert outcome.outcome == "cancelled"
        assert not the_job.completed
        assert 3 <= the_job.n_chunks < 20
        assert stats.chunks_sent == the_job.n_chunks
        await asyncio.sleep(0.02)  # past the slot it waited in
        assert transport.writes_after_close == 0
        assert pacer.is_idle

    asyncio.run(main())


def test_a_connection_closing_under_the_stream_gets_no_more_writes() -> None:
    """The transport closes (the server shutting down, a reset) before any disconnect
    message reaches the handler: the pacer stops at its next slot."""

    async def main() -> None:
        pacer = Pacer()

        async def close(transport: Transport, server: Server, task: Any) -> None:
            await transport.written(4)
            transport.close()

        the_job = job(200, 5.0, pacer)
        transport, _, _, _, outcome = await stream(the_job, during=close)
        assert isinstance(outcome, Closed)
        assert transport.writes_after_close == 0
        assert the_job.n_chunks < 20
        assert pacer.is_idle

    asyncio.run(main())


def test_a_handler_cancelled_while_paced_writes_nothing_more() -> None:
    async def main() -> None:
        pacer = Pacer()

        async def cancel(transport: Transport, server: Server, task: Any) -> None:
            await transport.written(4)
            task.cancel()

        transport, _, _, _, outcome = await stream(job(200, 5.0, pacer), during=cancel)
        assert isinstance(outcome, asyncio.CancelledError)
        written = len(transport.writes)
        await asyncio.sleep(0.03)
        assert len(transport.writes) == written
        assert pacer.is_idle

    asyncio.run(main())


def test_a_reader_that_stops_reading_does_not_grow_the_buffer_without_bound() -> None:
    """Past the transport's high-water mark the stream waits for the drain (the awaited
    path's `send`); once the reader takes the bytes it goes on, every chunk delivered."""

    async def main() -> None:
        pacer = Pacer()
        peak = 0

        async def stall(transport: Transport, server: Server, task: Any) -> None:
            nonlocal peak
            await transport.written(3)
            transport.reader_stalled = True
            for _ in range(60):  # 300 ms: ~60 tokens' time with nothing read
                await asyncio.sleep(0.005)
                peak = max(peak, transport.buffered)
            transport.reader_stalled = False
            transport.buffered = 0
            server.drained.set()

        the_job = job(150, 5.0, pacer)
        transport, _, stats, _, outcome = await stream(the_job, during=stall)
        assert outcome == "ok"
        largest = max(len(data) for _, data in transport.writes)
        assert HIGH < peak <= HIGH + largest
        assert stats.chunks_sent == 153
        assert stats.streams_paced == 1
        assert pacer.is_idle

    asyncio.run(main())


@pytest.mark.parametrize(
    "plan",
    [{"kinds": ["none"]}, {"storm": 2, "kinds": ["keepalive_storm"]}],
    ids=["fault", "storm"],
)
def test_a_stream_with_any_fault_stays_on_the_awaited_path(plan: dict[str, Any]) -> None:
    async def main() -> None:
        _, _, stats, _, outcome = await stream(job(5, 2.0, Pacer(), **plan))
        assert outcome == "ok"
        assert stats.streams_paced == 0

    asyncio.run(main())


def test_write_shaping_keeps_the_awaited_path() -> None:
    """A BOM, a cut or a split pattern is applied by `Exchange.write`: no transport write."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport = Transport(loop)
        ex = exchange(transport, Server(transport))
        assert not writable(ex)  # not started
        ex.has_started = True
        assert writable(ex)
        for name, value in (("bom", True), ("split", "byte"), ("cut_bytes", 10)):
            setattr(ex, name, value)
            assert not writable(ex)
            setattr(ex, name, {"bom": False, "split": None, "cut_bytes": None}[name])
        ex.has_ended = True
        assert not writable(ex)
        plain = Exchange({"type": "http", "extensions": {TRANSPORT_EXTENSION: transport}}, *_io())
        plain.has_started = True
        assert not writable(plain)  # a server that does not frame as uvicorn

    asyncio.run(main())


def writable(ex: Exchange) -> bool:
    return ex.chunked_transport is not None


def _io() -> tuple[Any, Any]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    return receive, send


def test_a_pacer_serves_one_loop_at_a_time() -> None:
    """Streams of a second loop take the awaited path while the first loop's are paced;
    once the pacer is idle another loop may take it over (an app served again)."""
    pacer = Pacer()

    async def first() -> None:
        assert pacer.serves(asyncio.get_running_loop())
        other = asyncio.new_event_loop()
        try:
            loop = asyncio.get_running_loop()
            transport = Transport(loop)
            server = Server(transport)
            ex = exchange(transport, server)
            task = asyncio.ensure_future(
                send_stream(ex, job(50, 5.0, pacer), loop.time(), MockStats())
            )
            await transport.written(2)
            assert not pacer.is_idle
            assert not pacer.serves(other)
            server.leave()
            with pytest.raises(Closed):
                await task
            await ex.aclose()
        finally:
            other.close()

    asyncio.run(first())

    async def second() -> None:
        _, _, stats, _, outcome = await stream(job(3, 2.0, pacer))
        assert outcome == "ok"
        assert stats.streams_paced == 1

    asyncio.run(second())
