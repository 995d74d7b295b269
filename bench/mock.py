"""Speed of the mock DeepSeek: throughput with zero delays, and 2,000 concurrent timed streams.

The mock runs in its own process (`python -m unbroken.mock`: one event loop, so one core);
the load generator is a lean raw-asyncio HTTP/1.1 client in this process (uvloop when
installed) that only counts `data: ` events, so it is not what is measured. Loopback only;
every phase is bounded in time.

  throughput  --streams sequential streams of --tokens chunks each, no delays: chunks/s of
              wall time, and chunks per second of the *server process's* CPU time
              (utime + stime from /proc) - the bar is >= 50,000 chunks/s on one core.
  concurrent  --concurrent streams of --timed-tokens tokens at --token-ms, opened over
              --ramp-s; measured in the window where all of them are open at once: chunks
              delivered per second against the ideal, the worst gap between two reads of
              each stream, how late each stream ends against its ideal schedule, the
              server's CPU share, and its CPU per chunk over the whole run (the figure the
              gateway bench's `direct` row costs). The bar is 2,000 streams at 20 ms per token.

Run: python bench/mock.py [--tokens N] [--streams S] [--concurrent C] [--token-ms MS]
       [--skip-throughput] [--no-pace]
The gateway bench's load on the mock: --skip-throughput --concurrent 256 --timed-tokens 200
--token-ms 5. A/B between trees: PYTHONPATH=<tree>/src (the server runs that tree's mock);
within one tree, --no-pace runs the mock with MockConfig.paced off (every stream its own task).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pct(values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


@dataclass
class Result:
    started: float = 0.0
    connected: float = 0.0
    first_data: float = 0.0
    ended: float = 0.0
    status: int = 0
    n_events: int = 0
    n_bytes: int = 0
    has_done: bool = False
    tail: bytes = b""
    error: str = ""
    read_times: list[float] = field(default_factory=list)


class StreamClient(asyncio.Protocol):
    """Sends one request with `Connection: close` and counts `data: ` events until EOF."""

    def __init__(
        self, request: bytes, result: Result, done: asyncio.Future[None], timed: bool
    ) -> None:
        self.request = request
        self.result = result
        self.done = done
        self.timed = timed
        self.head = b""
        self.in_body = False
        self.carry = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.result.connected = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]  # a stream transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        result = self.result
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            result.status = int(self.head[9:12])
            data = self.head[end + 4 :]
            self.in_body = True
        if not data:
            return
        window = self.carry + data
        n = window.count(b"data: ") - self.carry.count(b"data: ")
        if n:
            if not result.first_data:
                result.first_data = now
            if self.timed:
                result.read_times.append(now)
            result.n_events += n
        self.carry = window[-5:]
        result.n_bytes += len(data)
        result.tail = (result.tail + data)[-64:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.result.ended = time.perf_counter()
        self.result.has_done = b"data: [DONE]" in self.result.tail
        if exc is not None:
            self.result.error = repr(exc)
        if not self.done.done():
            self.done.set_result(None)


def build_request(host: str, port: int, tokens: int, token_ms: float) -> bytes:
    body = json.dumps(
        {
            "model": "deepseek-chat",
            "stream": True,
            "messages": [{"role": "user", "content": "benchmark 基准 🚀"}],
        }
    ).encode()
    head = (
        f"POST /chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Authorization: Bearer sk-bench\r\nContent-Type: application/json\r\n"
        f"X-Mock-Tokens: {tokens}\r\nX-Mock-Token-Ms: {token_ms}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def one_stream(host: str, port: int, request: bytes, *, timed: bool = False) -> Result:
    loop = asyncio.get_running_loop()
    result = Result(started=time.perf_counter())
    done: asyncio.Future[None] = loop.create_future()
    try:
        await loop.create_connection(lambda: StreamClient(request, result, done, timed), host, port)
        await done
    except OSError as exc:
        result.error = repr(exc)
    return result


async def throughput(host: str, port: int, pid: int, tokens: int, streams: int) -> None:
    request = build_request(host, port, tokens, 0)
    await one_stream(host, port, build_request(host, port, 1000, 0))  # warm up
    cpu0 = cpu_seconds(pid)
    wall0 = time.perf_counter()
    results = [await one_stream(host, port, request) for _ in range(streams)]
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds(pid) - cpu0
    n_chunks = sum(r.n_events for r in results) - streams  # minus the [DONE] of each stream
    n_bytes = sum(r.n_bytes for r in results)
    ok = all(r.status == 200 and r.has_done and r.n_events == tokens + 3 for r in results)
    print(
        f"throughput: {streams} x {tokens:,} chunks, {n_bytes / 2**20:.0f} MiB, all complete: {ok}"
    )
    print(f"  wall       {n_chunks / wall:>12,.0f} chunks/s  ({wall:.2f} s, client included)")
    print(
        f"  server CPU {n_chunks / max(cpu, 1e-9):>12,.0f} chunks per CPU-second  "
        f"({cpu:.2f} s CPU, {cpu / n_chunks * 1e6:.2f} us/chunk; bar: 50,000)"
    )


async def sample_cpu(pid: int, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.perf_counter(), cpu_seconds(pid)))
        await asyncio.sleep(0.05)
    samples.append((time.perf_counter(), cpu_seconds(pid)))


def cpu_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    times = [t for t, _ in samples]
    i = max(bisect_left(times, start), 0)
    j = min(bisect_right(times, end) - 1, len(samples) - 1)
    if j <= i:
        return float("nan")
    return (samples[j][1] - samples[i][1]) / (samples[j][0] - samples[i][0])


async def concurrent(
    host: str,
    port: int,
    pid: int,
    n_streams: int,
    tokens: int,
    token_ms: float,
    ramp_s: float,
) -> None:
    request = build_request(host, port, tokens, token_ms)
    # Warm-up (connections, code paths), as the gateway bench does before each run.
    await asyncio.gather(*(one_stream(host, port, request) for _ in range(min(8, n_streams))))
    server0 = cpu_seconds(pid)
    token_s = token_ms / 1000.0
    ideal = (tokens - 1) * token_s
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_cpu(pid, samples, stop))
    own0 = cpu_seconds(os.getpid())
    wall0 = time.perf_counter()
    tasks = []
    batch = max(1, n_streams // 100)
    for i in range(0, n_streams, batch):
        for _ in range(min(batch, n_streams - i)):
            tasks.append(asyncio.ensure_future(one_stream(host, port, request, timed=True)))
        await asyncio.sleep(ramp_s / 100)
    limit_s = ramp_s + ideal + 60
    finished, pending = await asyncio.wait(tasks, timeout=limit_s)
    wall = time.perf_counter() - wall0
    own = cpu_seconds(os.getpid()) - own0
    server = cpu_seconds(pid) - server0
    stop.set()
    await sampler
    for task in pending:
        task.cancel()
    results = [t.result() for t in finished]
    complete = [r for r in results if r.status == 200 and r.has_done and r.n_events == tokens + 3]
    print(
        f"concurrent: {n_streams:,} streams x {tokens} tokens at {token_ms:g} ms/token, "
        f"opened over {ramp_s:g} s (ideal stream {ideal:.2f} s after its first token)"
    )
    print(
        f"  complete   {len(complete):,}/{n_streams:,} with every chunk "
        f"(unfinished {len(pending)}, wall {wall:.2f} s)"
    )
    errors = [r.error for r in results if r.error]
    if errors:
        print(f"  errors     {len(errors)} e.g. {errors[0]}")
    if not complete:
        return
    window_start = max(r.first_data for r in complete)
    window_end = min(r.ended for r in complete)
    ttfb = sorted(r.first_data - r.started for r in complete)
    late = sorted(r.ended - (r.first_data + ideal) for r in complete)
    n_chunks = sum(r.n_events for r in results)
    print(
        f"  first byte p50 {pct(ttfb, 0.5) * 1000:.2f} ms  p90 {pct(ttfb, 0.9) * 1000:.2f} ms"
        f"  p99 {pct(ttfb, 0.99) * 1000:.2f} ms  (request sent -> first chunk)"
    )
    print(
        f"  server CPU {server / max(n_chunks, 1) * 1e6:.2f} us per chunk over the run "
        f"({server:.2f} s CPU for {n_chunks:,} chunks)"
    )
    print(
        f"  late end   p50 {pct(late, 0.5) * 1000:.0f} ms  p99 {pct(late, 0.99) * 1000:.0f} ms"
        f"  max {late[-1] * 1000:.0f} ms  (stream end against its ideal schedule)"
    )
    span = window_end - window_start
    if span <= 0.2:
        print("  all-open window too short: raise --timed-tokens or lower --ramp-s")
        return
    gaps = []
    n_in_window = 0
    for r in complete:
        times = r.read_times
        i = bisect_left(times, window_start)
        j = bisect_right(times, window_end)
        inside = times[i:j]
        n_in_window += len(inside)
        gaps.append(max((b - a for a, b in itertools.pairwise(inside)), default=0.0))
    gaps.sort()
    chunk_rate = n_streams / token_s
    cpu_share = cpu_between(samples, window_start, window_end)
    print(
        f"  all open   {span:.2f} s window with {len(complete):,} streams live: "
        f"{n_in_window / span:,.0f} reads/s for {chunk_rate:,.0f} chunks/s due"
    )
    print(
        f"  worst gap  p50 {pct(gaps, 0.5) * 1000:.0f} ms  p99 {pct(gaps, 0.99) * 1000:.0f} ms"
        f"  max {gaps[-1] * 1000:.0f} ms  (per stream, between two reads in the window;"
        f" cadence {token_ms:g} ms)"
    )
    print(
        f"  server CPU {cpu_share:.0%} of one core in the window; "
        f"load generator {own / wall:.0%} over the run"
    )


def start_server(loop: str, no_pace: bool) -> tuple[subprocess.Popen[bytes], str, int]:
    extra = ["--no-pace"] if no_pace else []
    process = subprocess.Popen(
        [sys.executable, "-m", "unbroken.mock", "--port", "0", "--loop", loop, *extra],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    url = line.rsplit(" ", 1)[-1]
    return process, "127.0.0.1", int(url.rsplit(":", 1)[1])


async def main(args: argparse.Namespace) -> None:
    # The load generator keeps ~1M timestamps; a full collection would pause it mid-run.
    gc.freeze()
    gc.disable()
    process, host, port = start_server(args.loop, args.no_pace)
    try:
        await asyncio.sleep(0.3)  # let uvicorn finish starting (the socket already listens)
        print(
            f"mock server pid {process.pid} on {host}:{port} (loop: {args.loop}); "
            f"python {sys.version.split()[0]}"
        )
        if not args.skip_throughput:
            await asyncio.wait_for(
                throughput(host, port, process.pid, args.tokens, args.streams), timeout=120
            )
        await concurrent(
            host,
            port,
            process.pid,
            args.concurrent,
            args.timed_tokens,
            args.token_ms,
            args.ramp_s,
        )
    finally:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--timed-tokens", type=int, default=250)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--ramp-s", type=float, default=1.0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--skip-throughput", action="store_true", help="concurrent mode only")
    parser.add_argument(
        "--no-pace", action="store_true", help="the mock without its pacer (MockConfig.paced)"
    )
    arguments = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # uvloop comes with the [mock] extra
        asyncio.run(main(arguments))
    else:
        uvloop.run(main(arguments))
