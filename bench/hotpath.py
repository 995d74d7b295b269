"""The gateway's Python work per relayed chunk, in process, against the floor's.

Records one 200-chunk DeepSeek stream from the mock (the answer bench/gateway.py relays),
then pushes its bytes, one SSE event per read as a loaded gateway reads them (c=256),
through the real objects of the gateway's hot path: the upstream connection's protocol
(`_Connection.data_received`, which cuts whole chunked frames itself; httptools takes the
rest) -> the SDK's `_FastLane` -> `Attempt.relay_one` -> the producer's `take_one`
(gateway/relay.py `ProducerCore`, through its `_Taker`) -> the memory stream log's
`append_one` -> the relay's `LiveSink` (`DirectBody`'s framing) -> a transport stand-in
that only counts bytes. The stand-in upstream is dialled as an https route (no TLS is
spoken): its connects go through the patched `loop.create_connection`, so the script runs
on the compiled build as on the sources. Side by side, the floor relay of bench/gateway.py
(`_UpstreamSide.data_received`: uvloop + Protocol, bytes passed through) writes the same
reads into the same stand-in. Prints the median us per chunk of each and the ratio.

A measuring aid for this path only: the syscalls, the event loop's own work and the
per-request costs (routing, limits, the response head, usage) are not in it, so its ratio
is not bench/gateway.py's. It also prints the client writes per chunk (the floor writes once
per read). Run: `python bench/hotpath.py [--streams N] [--profile FILE] [--interleave N]
[--per-read K] [--per-frame K] [--send]`. `--interleave 256` relays 256 answers at once,
one read each in turn, as a gateway at c=256 reads them: each chunk then finds its answer's
objects cold in the CPU caches. `--per-read 2` reads two frames at once, as a saturated
gateway often does; `--per-frame 2` sends two events in one chunked frame, as a loaded
upstream often does; `--read-bytes N` cuts the frames' bytes into reads of N bytes, ending
anywhere (inside a frame, its size line, its CRLF), as a saturated socket's reads do.

`--send` writes each client write to a TCP socket over the loopback interface (its peer
drained between answers, untimed), as `transport.write` sends at once on a writable socket:
the figures then hold the write syscall (the floor's too) and its effect on the Python work
that follows it. Why: timed in a running gateway, the upstream read's callback chain takes
~3x this script's figure; most of that is the client's write syscall, made inside the
chain, and the rest the Python work meeting colder CPU caches after it (docs/gateway.md).

`--bytecodes` instead traces one answer's reads and prints the bytecodes run per chunk by
function (CPython's opcode events): a count that does not move with the host's load, and
what a chunk's cost follows when the caches are cold.

`--memory N` instead holds N answers open after `HELD_CHUNKS` chunks each, traced by
tracemalloc, and prints the Python memory they hold per answer (all of it, and the lines of
the decoder, the accumulator and the stream log that allocated it); the floor relay holds
nothing per answer between reads, so that figure is the whole difference.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import gc
import socket
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _bytecodes import opcode_tracer  # noqa: E402 - after the path insert above
from _mockproc import mock_process  # noqa: E402
from gateway import CHUNKS, _UpstreamSide  # noqa: E402

from unbroken.gateway.app import Gateway  # noqa: E402
from unbroken.gateway.direct import DirectBody  # noqa: E402
from unbroken.gateway.keys import Caller  # noqa: E402
from unbroken.gateway.relay import LiveSink, StreamRelay  # noqa: E402
from unbroken.gateway.request import ChatRequest  # noqa: E402
from unbroken.gateway.server import GC_THRESHOLDS  # noqa: E402
from unbroken.gateway.upstream import _Connection  # noqa: E402
from unbroken.settings import GatewaySettings, LimitSettings, Settings  # noqa: E402

# No pacing: the recording is replayed read by read, so the mock's timing does not matter.
RECORD_CONFIG = (
    f"MockConfig(seed=1, answer_tokens=({CHUNKS - 2}, {CHUNKS - 2}), "
    f"reasoning_tokens=({CHUNKS // 2}, {CHUNKS // 2}))"
)
# Where `--memory` holds its answers: 100 to 119 chunks, evenly (bench/stream_memory.py holds
# them from 100 chunks on, median 110), so the stream log's blocks are seen at every fill.
HELD_CHUNKS = 100
HELD_SPREAD = 20
# The files whose allocations `--memory` lists line by line.
MEMORY_FILES = (
    "core/stream.py",
    "core/sse.py",
    "core/accumulator.py",
    "core/wire.py",
    "stores/packed.py",
    "stores/streamlog.py",
    "core/attempt.py",
)
BODY = (
    b'{"model":"%s","stream":true,"stream_options":{"include_usage":true},'
    b'"messages":[{"role":"user","content":"benchmark 1"}]}'
)


class CountingTransport:
    """A transport that counts what is written and, given a connected TCP socket, sends it
    there (`--send`); else does nothing more."""

    def __init__(self, on_write: Any = None, sock: socket.socket | None = None) -> None:
        self.n_bytes = 0
        self.n_writes = 0
        self.on_write = on_write  # told of each write (the upstream requests)
        self.send = None if sock is None else sock.send

    def write(self, data: bytes) -> None:
        self.n_bytes += len(data)
        self.n_writes += 1
        if self.send is not None:
            # The send syscall uvloop's `transport.write` makes at once on a writable socket.
            self.send(data)
        if self.on_write is not None:
            self.on_write()

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def record(url: str, model: str) -> tuple[bytes, list[bytes]]:
    """The response head and the body's chunked frames (one event each) of one answer."""
    body = BODY % model.encode()
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer sk\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    raw = b""
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        while not raw.endswith(b"0\r\n\r\n"):
            data = sock.recv(1 << 16)
            if not data:
                break
            raw += data
    end = raw.index(b"\r\n\r\n") + 4
    response_head, chunked = raw[:end], raw[end:]
    body = b""
    while chunked:
        size_end = chunked.index(b"\r\n")
        size = int(chunked[:size_end], 16)
        body += chunked[size_end + 2 : size_end + 2 + size]
        chunked = chunked[size_end + 2 + size + 2 :]
    # One event per frame, as the mock paced at 5 ms per token sends them.
    frames = [b"%x\r\n%b\n\n\r\n" % (len(e) + 2, e) for e in body.split(b"\n\n") if e]
    frames.append(b"0\r\n\r\n")
    return response_head, frames


class Loopback:
    """TCP connections over the loopback interface, as the gateway's clients' (`--send`):
    the sending ends for the transports, the receiving ends drained between answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.peers: list[socket.socket] = []
        self.ours: list[socket.socket] = []

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.listener.getsockname())
        peer, _ = self.listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn's
        peer.setblocking(False)
        self.ours.append(sock)
        self.peers.append(peer)
        return sock

    def drain(self) -> None:
        """Read what the peers hold (an answer's ~60 KB fits in their buffers)."""
        for peer in self.peers:
            with contextlib.suppress(BlockingIOError):
                while peer.recv(1 << 20):
                    pass

    def close(self) -> None:
        self.drain()
        for sock in (*self.ours, *self.peers):
            sock.close()
        self.ours.clear()
        self.peers.clear()


def counting_cycle(transport: CountingTransport) -> Any:
    """What `DirectBody` reads of uvicorn's request cycle, for a response being streamed."""
    return SimpleNamespace(
        response_started=True,
        chunked_encoding=True,
        response_complete=False,
        disconnected=False,
        flow=SimpleNamespace(write_paused=False),
        transport=transport,
        scope={"method": "POST"},
    )


class Answer:
    """An answer being relayed: its producer, upstream connection and live reader."""

    def __init__(
        self,
        producer: Any,
        conn: _Connection,
        sink: LiveSink,
        handed: Any,
        down: CountingTransport,
    ) -> None:
        self.producer = producer
        self.down = down  # the client's transport
        self.conn = conn
        self.sink = sink
        self.handed = handed
        self.n_fed = 0  # the body's frames fed so far (`--memory`)


class Bench:
    def __init__(
        self,
        head: bytes,
        frames: list[bytes],
        model: str = "deepseek-chat",
        per_read: int = 1,
        per_frame: int = 1,
        send: bool = False,
        cold_kib: int = 0,
        read_bytes: int = 0,
    ) -> None:
        self.model = model
        self.head = head
        self.frames = frames
        # The frames of content chunks: the role chunk to the last token (the usage chunk,
        # [DONE] and the body's end go through the generator path, once per answer).
        self.timed = [f for f in frames if b'"content":' in f and b'"usage":{' not in f]
        self.rest = frames[len(self.timed) :]
        assert frames[: len(self.timed)] == self.timed, "content frames come first"
        self.per_read = per_read
        self.per_frame = per_frame
        # The client writes go to TCP sockets (`--send`): the syscall is in the figures.
        self.loopback = Loopback() if send else None
        # Written over between feeds (`--cold`), to evict the answers' data from the caches.
        self.cold = bytearray(cold_kib * 1024) if cold_kib else None
        # The timed events `per_frame` to a chunked frame (a loaded upstream sends several
        # in one), and the frames as the reads that bring them, `per_read` at a time.
        events = [f[f.index(b"\r\n") + 2 : -2] for f in self.timed]
        framed = [
            b"%x\r\n%b\r\n" % (len(e), e)
            for e in (b"".join(events[i : i + per_frame]) for i in range(0, len(events), per_frame))
        ]
        self.reads = [b"".join(framed[i : i + per_read]) for i in range(0, len(framed), per_read)]
        if read_bytes:
            wire = b"".join(self.reads)
            self.reads = [wire[i : i + read_bytes] for i in range(0, len(wire), read_bytes)]
        # Client writes per timed chunk, over the measured answers (gateway, floor).
        self.writes: list[float] = []
        self.floor_writes: list[float] = []
        # The upstream connections in the order they were sent a request.
        self.sent: list[_Connection] = []
        # Thread CPU us per answer outside the timed reads: its start (the producer's start
        # to the response head read and a reader handed off) and its end (the last frames'
        # reads to the producer's end: read-back, final event, log seal, bookkeeping).
        self.starts: list[float] = []
        self.ends: list[float] = []

    async def setup(self) -> Gateway:
        loop = asyncio.get_running_loop()

        async def create_connection(factory: Any, *args: Any, **kwargs: Any) -> Any:
            conn = factory()
            transport = CountingTransport(lambda: self.sent.append(conn))
            conn.connection_made(transport)
            return transport, conn

        loop.create_connection = create_connection  # type: ignore[method-assign,assignment]  # the stand-in upstream
        settings = Settings(
            api_key="sk-up",
            # https: its connects go through `loop.create_connection` (patched above; a
            # plain-http upstream's dial a socket of their own, which a compiled
            # gateway/upstream.py calls directly, unpatchable); no TLS is spoken.
            base_url="https://127.0.0.1:9",
            gateway=GatewaySettings(access_log=False),
        )
        return Gateway(settings)

    async def open_answer(self, gw: Gateway) -> Answer:
        """One answer started through the gateway's objects, its upstream response head
        read, a live reader handed off to the producer: ready for the body's reads."""
        caller = Caller(id="bench", name="bench", limits=LimitSettings())
        request = ChatRequest(
            model=self.model,
            messages=[{"role": "user", "content": "benchmark 1"}],
            stream=True,
            fallbacks=[],
            extra={},
            estimated_tokens=10,
        )
        n_sent = len(self.sent)
        producer = await gw.streams.start(
            caller,
            request,
            {},
            resumable=False,
            on_complete=None,
            on_end=None,
            renew_slot=None,
        )
        producer.attach()
        await _until(lambda: len(self.sent) > n_sent)  # the upstream request was sent
        conn = self.sent[-1]
        conn.data_received(self.head)
        await _until(lambda: conn._tap is not None)  # the SDK stream taps the connection
        down = CountingTransport(sock=self._client_socket())
        relay = StreamRelay(None, gw.scrub, keepalive_s=15.0, send_timeout_s=10.0)  # type: ignore[arg-type]  # the sink reads no exchange
        sink = LiveSink(relay, DirectBody(counting_cycle(down)))
        handed = asyncio.ensure_future(producer.hand_off(sink, producer.n_events))
        await asyncio.sleep(0)
        return Answer(producer, conn, sink, handed, down)

    def _feed_all(self, feeds: list[Any]) -> int:
        """Feed each read to each of `feeds` in turn; the ns they took (thread CPU time;
        with `--cold`, of the feeds alone, the caches written over before each)."""
        cold = self.cold
        if cold is None:
            started = time.thread_time_ns()
            for data in self.reads:
                for feed in feeds:
                    feed(data)
            return time.thread_time_ns() - started
        # Thread CPU time, not wall time: a busy host preempts the process between reads.
        clock = time.thread_time_ns
        ones = b"\x01" * len(cold[::64])
        elapsed = 0
        for data in self.reads:
            for feed in feeds:
                cold[::64] = ones  # a write to each cache line: the caches hold other data
                started = clock()
                feed(data)
                elapsed += clock() - started
        # Less the clock's own cost (a system call), timed the same way.
        for _ in range(len(self.reads) * len(feeds)):
            started = clock()
            elapsed -= clock() - started
        return elapsed

    def _client_socket(self) -> socket.socket | None:
        return None if self.loopback is None else self.loopback.connect()

    def _close_sockets(self) -> None:
        """Close the client sockets (`--send`), once their answers are written: not timed."""
        if self.loopback is not None:
            self.loopback.close()

    async def close_answer(self, answer: Answer, frames: list[bytes]) -> None:
        """Feed the answer's remaining `frames` and wait until it completed."""
        producer = answer.producer
        for frame in frames:
            answer.conn.data_received(frame)
        assert producer.task is not None
        await producer.task
        await answer.handed
        assert producer.completion is not None, producer.reason
        producer.detach(time.time())

    async def gateway_once(self, gw: Gateway) -> float:
        """One answer through the gateway's objects; us of Python work per timed chunk."""
        clock = time.thread_time_ns
        started = clock()
        answer = await self.open_answer(gw)
        self.starts.append((clock() - started) / 1000)
        timed = self.timed
        elapsed = self._feed_all([answer.conn.data_received])
        self.writes.append(answer.down.n_writes / len(timed))
        last = answer.sink.last
        assert last == len(timed), f"the sink took {last} of {len(timed)} chunks"
        started = clock()
        await self.close_answer(answer, self.rest)
        self.ends.append((clock() - started) / 1000)
        self._close_sockets()
        return elapsed / 1000 / len(timed)

    async def interleaved_once(self, gw: Gateway, n: int) -> float:
        """`n` answers at once, fed one read each in turn (as a loaded gateway's reads
        come: each chunk meets its answer's objects cold in the CPU caches); us of Python
        work per timed chunk."""
        answers = [await self.open_answer(gw) for _ in range(n)]
        feeds = [answer.conn.data_received for answer in answers]
        timed = self.timed
        elapsed = self._feed_all(feeds)
        self.writes.append(answers[0].down.n_writes / len(timed))
        for answer in answers:
            last = answer.sink.last
            assert last == len(timed), f"the sink took {last} of {len(timed)} chunks"
            await self.close_answer(answer, self.rest)
        self._close_sockets()
        return elapsed / 1000 / len(timed) / n

    async def bytecodes(self, gw: Gateway) -> None:
        """Print the bytecodes run per timed chunk, by function (one answer, traced)."""
        counts: collections.Counter[str] = collections.Counter()

        tracer = opcode_tracer(counts)

        answer = await self.open_answer(gw)
        feed = answer.conn.data_received
        skip = len(self.reads) // 10  # the answer's first reads (role, template) untraced
        for data in self.reads[:skip]:
            feed(data)
        traced = self.reads[skip:]
        sys.settrace(tracer)
        try:
            for data in traced:
                feed(data)
        finally:
            sys.settrace(None)
        await self.close_answer(answer, self.rest)
        self._close_sockets()
        n = len(traced)
        print(
            f"bytecodes per chunk: {sum(counts.values()) / n:.0f} "
            f"(reads {skip + 1}-{len(self.reads)} of one answer; the transport stand-in's "
            "own included)"
        )
        for where, count in counts.most_common(16):
            print(f"  {count / n:6.1f}  {where}")

    async def held(self, gw: Gateway, n: int) -> None:
        """Hold `n` answers open at `HELD_CHUNKS` chunks; print what they hold per answer."""
        gc.collect()
        tracemalloc.start(8)
        before = tracemalloc.take_snapshot()
        answers = []
        for i in range(n):
            answer = await self.open_answer(gw)
            answer.n_fed = HELD_CHUNKS + i % HELD_SPREAD
            for frame in self.timed[: answer.n_fed]:
                answer.conn.data_received(frame)
            answers.append(answer)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        total = sum(d.size_diff for d in after.compare_to(before, "filename"))
        print(
            f"{n} answers held at {HELD_CHUNKS}-{HELD_CHUNKS + HELD_SPREAD - 1} chunks "
            f"(Python allocations, tracemalloc)"
        )
        print(f"all         {total / n / 1024:7.2f} KiB/answer")
        ours = [
            d
            for d in after.compare_to(before, "lineno")
            if any(d.traceback[0].filename.endswith(f) for f in MEMORY_FILES)
        ]
        mine = sum(d.size_diff for d in ours)
        print(f"log+decoder+accumulator {mine / n / 1024:5.2f} KiB/answer, by allocation line:")
        for d in sorted(ours, key=lambda d: -d.size_diff)[:12]:
            line = d.traceback[0]
            where = "/".join(line.filename.split("/")[-2:])
            print(
                f"  {d.size_diff / n:7.0f} B {d.count_diff / n:5.1f} blocks  {where}:{line.lineno}"
            )
        print("floor       0.00 KiB/answer (bytes passed through: nothing held between reads)")
        for answer in answers:
            await self.close_answer(answer, self.timed[answer.n_fed :] + self.rest)
        self._close_sockets()

    def floor_once(self, n: int = 1) -> float:
        """The same reads through the floor relay's upstream protocol (`n` relays fed in
        turn, as `interleaved_once` feeds its answers)."""
        feeds = []
        for _ in range(n):
            down = CountingTransport(sock=self._client_socket())
            side = _UpstreamSide(SimpleNamespace(transport=down, answer_done=lambda: None))  # type: ignore[arg-type]  # the floor's downstream side, as far as it is used
            feeds.append(side.data_received)
        elapsed = self._feed_all(feeds)
        self.floor_writes.append(down.n_writes / len(self.timed))
        for frame in self.rest:
            for feed in feeds:
                feed(frame)
        self._close_sockets()
        return elapsed / 1000 / len(self.timed) / n


async def run(
    bench: Bench,
    streams: int,
    profile: str | None,
    memory: int,
    interleave: int,
    bytecodes: bool = False,
) -> None:
    gw = await bench.setup()
    for _ in range(5):  # warm up (imports, first-call caches)
        await bench.gateway_once(gw)
        bench.floor_once()
    if memory:
        await bench.held(gw, memory)
        await gw.client.aclose()
        return
    if bytecodes:
        await bench.bytecodes(gw)
        await gw.client.aclose()
        return
    # The memory log seals the last block of the answers that ended at the hub's tick, in a
    # row (`MemoryStreamLog.seal_ended`): timed here (thread CPU), as part of an answer's end.
    log: Any = gw.streams.log
    seal_ended = getattr(log, "seal_ended", None)
    sealing = [0, 0]  # ns, answers
    if seal_ended is not None:
        seal_ended()  # the warm-up's

        def timed_seal() -> int:
            started = time.thread_time_ns()
            n: int = seal_ended()
            sealing[0] += time.thread_time_ns() - started
            sealing[1] += n
            return n

        # A compiled log (mypyc) has no instance attributes to patch: its seal goes untimed.
        with contextlib.suppress(AttributeError):
            log.seal_ended = timed_seal
    gc.collect()
    gc.freeze()  # as `unbroken serve` does after start-up, with its thresholds
    gc.set_threshold(*GC_THRESHOLDS)
    ours: list[float] = []
    floor: list[float] = []
    profiler = cProfile.Profile() if profile else None
    rounds = streams if interleave <= 1 else max(3, streams // interleave)
    for _ in range(rounds):
        if profiler is not None:
            profiler.enable()
        if interleave > 1:
            ours.append(await bench.interleaved_once(gw, interleave))
        else:
            ours.append(await bench.gateway_once(gw))
        if profiler is not None:
            profiler.disable()
        floor.append(bench.floor_once(max(1, interleave)))
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
    await gw.client.aclose()
    unbroken_us = statistics.median(ours)
    floor_us = statistics.median(floor)
    at_once = f", {interleave} at once fed in turn" if interleave > 1 else ""
    print(
        f"{len(bench.timed)} chunks/answer, {rounds * max(1, interleave)} answers{at_once}, "
        f"{bench.per_frame} event(s) per frame, {bench.per_read} frame(s) per read "
        + (
            "(Python work and the client write syscalls: no event loop)"
            if bench.loopback is not None
            else "(Python work only: no syscalls, no event loop)"
        )
        + (
            ""
            if bench.cold is None
            else f", caches cold ({len(bench.cold) >> 10} KiB written over before each read)"
        )
    )
    print(f"unbroken  {unbroken_us:7.2f} us/chunk (median; p90 {_p90(ours):.2f})")
    print(f"floor     {floor_us:7.2f} us/chunk (median; p90 {_p90(floor):.2f})")
    print(f"ratio     {unbroken_us / floor_us:7.1f}x the floor")
    print(
        f"client writes per chunk: unbroken {statistics.median(bench.writes):.2f}, "
        f"floor {statistics.median(bench.floor_writes):.2f}"
    )
    if interleave <= 1:
        starts, ends = bench.starts[5:], bench.ends[5:]  # past the warm-up's
        print(
            "per answer (thread CPU, outside the timed reads): "
            f"start {statistics.median(starts):.1f} us (p90 {_p90(starts):.1f}), "
            f"end {statistics.median(ends):.1f} us (p90 {_p90(ends):.1f})"
        )
    if seal_ended is not None:
        log.seal_ended()  # what the ticker left
        if sealing[1]:
            print(
                f"log seal at the tick: {sealing[0] / 1000 / sealing[1]:.1f} us per answer "
                f"({sealing[1]} answers)"
            )


async def _until(condition: Any) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)  # let the gateway's tasks run one step
    raise RuntimeError("the gateway did not get there")


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200, help="answers measured")
    parser.add_argument("--profile", default=None, help="write a cProfile of the gateway side")
    parser.add_argument(
        "--model",
        default="deepseek-chat",
        help="the answer relayed: deepseek-reasoner's has 100 reasoning chunks first",
    )
    parser.add_argument(
        "--memory", type=int, default=0, help="hold this many answers open; print memory"
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="relay this many answers at once, one read each in turn (cold caches, as at c=N)",
    )
    parser.add_argument("--per-read", type=int, default=1, help="chunked frames per upstream read")
    parser.add_argument(
        "--per-frame", type=int, default=1, help="events per chunked frame (a loaded upstream's)"
    )
    parser.add_argument(
        "--read-bytes",
        type=int,
        default=0,
        help="cut the frames into reads of this many bytes (ending inside frames)",
    )
    parser.add_argument(
        "--bytecodes",
        action="store_true",
        help="print the bytecodes run per chunk, by function, instead of timing",
    )
    parser.add_argument(
        "--send",
        action="store_true",
        help="write to TCP loopback sockets: the client write syscalls are in the figures",
    )
    parser.add_argument(
        "--cold",
        type=int,
        default=0,
        metavar="KIB",
        help="write over this many KiB before each read (caches cold, as in a busy gateway)",
    )
    args = parser.parse_args()
    with mock_process(RECORD_CONFIG) as url:
        head, frames = record(url, args.model)
    bench = Bench(
        head,
        frames,
        args.model,
        args.per_read,
        args.per_frame,
        args.send,
        args.cold,
        args.read_bytes,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is part of the [gateway] extra
        asyncio.run(
            run(bench, args.streams, args.profile, args.memory, args.interleave, args.bytecodes)
        )
    else:
        uvloop.run(
            run(bench, args.streams, args.profile, args.memory, args.interleave, args.bytecodes)
        )


if __name__ == "__main__":
    main()
