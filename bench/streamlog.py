"""What the gateway's Redis stream log costs Redis, per chunk: the store's append (one Lua
script per chunk, with its bookkeeping) beside a bare XADD of the same payload.

    python bench/streamlog.py [--streams 2000] [--chunks 40] [--tasks 64] [--repeat 3]

A redis-server on a free loopback port (no persistence). `--streams` answers are created,
then `--tasks` asyncio tasks append their chunks (~300 bytes, one gateway SSE event) one
call per chunk, as the gateway does. Printed per side: appends per second, redis-server CPU
microseconds per append (utime + stime from /proc) and Redis memory per entry (INFO
used_memory), medians over `--repeat` runs, and the ratio ours / bare XADD.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from unbroken.stores.redis_streamlog import RedisStreamLog

CLK_TCK = os.sysconf("SC_CLK_TCK")
# One streamed chunk as the gateway logs it (~300 bytes of JSON).
PAYLOAD = (
    b'{"id":"0a3c2f1e-6b1d-4c57-9a59-2f4c1e9d7b21","object":"chat.completion.chunk",'
    b'"created":1796397449,"model":"deepseek-chat","system_fingerprint":"fp_8802369eaa_prod0623",'
    b'"choices":[{"index":0,"delta":{"content":" answer"},"logprobs":null,'
    b'"finish_reason":null}]}'
)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(n_tasks: int, jobs: list[Callable[[], Awaitable[object]]]) -> float:
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_tasks)))
    return time.perf_counter() - started


async def one_run(url: str, pid: int, side: str, args: argparse.Namespace) -> tuple[float, ...]:
    client = aioredis.from_url(url, max_connections=args.tasks + 4)
    await client.flushall()
    used0 = int((await client.info("memory"))["used_memory"])
    ids = [f"s{i:06d}" for i in range(args.streams)]
    jobs: list[Callable[[], Awaitable[object]]]
    if side == "ours":
        log = RedisStreamLog(client)
        now = time.time()
        for sid in ids:
            await log.create(
                sid, caller="bench", request=b"{}", resumable=False, owner="i1", now=now,
                lease_s=30.0,
            )  # fmt: skip
        jobs = [
            functools.partial(log.append, sid, 1, [PAYLOAD], time.time(), end=False)
            for _ in range(args.chunks)
            for sid in ids
        ]
        used0 = int((await client.info("memory"))["used_memory"])
    else:
        jobs = [
            functools.partial(client.xadd, f"bare:{sid}", {"d": PAYLOAD})
            for _ in range(args.chunks)
            for sid in ids
        ]
    cpu0 = cpu_seconds(pid)
    wall = await drive(args.tasks, jobs)
    cpu = cpu_seconds(pid) - cpu0
    used = int((await client.info("memory"))["used_memory"]) - used0
    await client.aclose()
    n = len(jobs)
    return n / wall, cpu / n * 1e6, used / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # waiting for redis-server to listen
            results: dict[str, list[tuple[float, ...]]] = {"bare XADD": [], "ours": []}
            for _ in range(args.repeat):
                for side in ("bare XADD", "ours"):
                    results[side].append(asyncio.run(one_run(url, server.pid, side, args)))
        finally:
            server.terminate()
            server.wait(10)
    n = args.streams * args.chunks
    print(f"{n} appends of {len(PAYLOAD)} B over {args.streams} streams, {args.tasks} tasks")
    med = {
        side: [statistics.median(r[i] for r in runs) for i in range(3)]
        for side, runs in results.items()
    }
    for side, (rate, cpu_us, mem) in med.items():
        print(
            f"  {side:9}: {rate:9.0f} appends/s  {cpu_us:6.1f} us redis CPU/append  "
            f"{mem:6.0f} B/entry"
        )
    ours, bare = med["ours"], med["bare XADD"]
    print(
        f"  ours / bare: {ours[0] / bare[0]:.2f}x the rate, {ours[1] / bare[1]:.2f}x the "
        f"Redis CPU, {ours[2] / bare[2]:.2f}x the memory"
    )


if __name__ == "__main__":
    main()
