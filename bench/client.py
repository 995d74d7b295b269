"""Client throughput against the mock DeepSeek, side by side with the official openai SDK.

Workloads (the mock runs in its own process, zero delays, so client CPU is measured alone):
  single     one stream of --single-chunks chunks (default 100,000), sync clients
  concurrent --streams concurrent streams (default 100) of --chunks chunks (default 2,000),
             async clients on one event loop

Printed per client: chunks/s (wall), CPU us per chunk (this process only), time to first
token p50/p99, and the ratios unbroken/openai. Each workload runs --repeat times; medians.
Run: python bench/client.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from _mockproc import mock_process

import unbroken

MESSAGES: list[Any] = [{"role": "user", "content": "benchmark"}]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Result:
    def __init__(self, chunks: int, wall: float, cpu: float, ttfts: list[float]) -> None:
        self.chunks = chunks
        self.wall = wall
        self.cpu = cpu
        self.ttfts = ttfts

    @property
    def rate(self) -> float:
        return self.chunks / self.wall

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.chunks


def timed(fn: Callable[[], tuple[int, list[float]]]) -> Result:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    chunks, ttfts = fn()
    return Result(chunks, time.perf_counter() - wall0, time.process_time() - cpu0, ttfts)


# -- single stream, sync -------------------------------------------------------------------


def single_unbroken(url: str, n: int) -> tuple[int, list[float]]:
    with unbroken.Client(api_key="sk", base_url=url) as client:
        start = time.perf_counter()
        count, ttft = 0, 0.0
        for _ in client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Mock-Tokens": str(n)},
        ):
            if not count:
                ttft = time.perf_counter() - start
            count += 1
    return count, [ttft]


def single_openai(url: str, n: int) -> tuple[int, list[float]]:
    import openai

    client = openai.OpenAI(api_key="sk", base_url=url, max_retries=0)
    start = time.perf_counter()
    count, ttft = 0, 0.0
    for _ in client.chat.completions.create(
        model="deepseek-chat",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Mock-Tokens": str(n)},
    ):
        if not count:
            ttft = time.perf_counter() - start
        count += 1
    client.close()
    return count, [ttft]


# -- concurrent streams, async -------------------------------------------------------------


async def _many(make_stream: Callable[[], Any], streams: int) -> tuple[int, list[float]]:
    ttfts: list[float] = []

    async def one() -> int:
        start = time.perf_counter()
        count = 0
        async for _ in await make_stream():
            if not count:
                ttfts.append(time.perf_counter() - start)
            count += 1
        return count

    counts = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(counts), ttfts


def concurrent_unbroken(url: str, streams: int, n: int) -> tuple[int, list[float]]:
    async def main() -> tuple[int, list[float]]:
        async with unbroken.AsyncClient(api_key="sk", base_url=url) as client:
            return await _many(
                lambda: client.chat.completions.create(
                    model="deepseek-chat",
                    messages=MESSAGES,
                    stream=True,
                    extra_headers={"X-Mock-Tokens": str(n)},
                ),
                streams,
            )

    return asyncio.run(main())


def concurrent_openai(url: str, streams: int, n: int) -> tuple[int, list[float]]:
    import openai

    async def main() -> tuple[int, list[float]]:
        client = openai.AsyncOpenAI(api_key="sk", base_url=url, max_retries=0)
        try:
            return await _many(
                lambda: client.chat.completions.create(
                    model="deepseek-chat",
                    messages=MESSAGES,
                    stream=True,
                    extra_headers={"X-Mock-Tokens": str(n)},
                ),
                streams,
            )
        finally:
            await client.close()

    return asyncio.run(main())


def ttft_pairs(url: str, n: int = 30) -> dict[str, list[float]]:
    """Time to first chunk of short streams, the two SDKs alternating (same mock load)."""
    import openai

    ours = unbroken.Client(api_key="sk", base_url=url)
    theirs = openai.OpenAI(api_key="sk", base_url=url, max_retries=0)
    out: dict[str, list[float]] = {"unbroken": [], "openai": []}
    headers = {"X-Mock-Tokens": "200"}
    untyped_messages: Any = MESSAGES  # the SDK wants its TypedDicts; plain dicts work
    for _ in range(n):
        start = time.perf_counter()
        with ours.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, stream=True, extra_headers=headers
        ) as mine:
            next(iter(mine))
            out["unbroken"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with theirs.chat.completions.create(
            model="deepseek-chat",
            messages=untyped_messages,
            stream=True,
            extra_headers=headers,
        ) as official:
            next(iter(official))
            out["openai"].append(time.perf_counter() - start)
    ours.close()
    theirs.close()
    return out


def report(title: str, rows: dict[str, list[Result]]) -> dict[str, Result]:
    print(title)
    medians: dict[str, Result] = {}
    for name, results in rows.items():
        med = sorted(results, key=lambda r: r.rate)[len(results) // 2]
        medians[name] = med
        ttfts = [t for r in results for t in r.ttfts]
        print(
            f"  {name:<10} {med.rate:>10,.0f} chunks/s  {med.cpu_us:6.1f} us CPU/chunk  "
            f"TTFT p50 {1000 * pct(ttfts, 0.5):7.1f} ms  p99 {1000 * pct(ttfts, 0.99):7.1f} ms"
        )
    ours, theirs = medians["unbroken"], medians["openai"]
    print(
        f"  unbroken/openai: {ours.rate / theirs.rate:.1f}x chunks/s (bar >= 5x), "
        f"{theirs.cpu_us / ours.cpu_us:.1f}x less CPU per chunk"
    )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single-chunks", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with mock_process() as url:
        single: dict[str, list[Result]] = {"unbroken": [], "openai": []}
        many: dict[str, list[Result]] = {"unbroken": [], "openai": []}
        for _ in range(args.repeat):
            single["unbroken"].append(timed(lambda: single_unbroken(url, args.single_chunks)))
            single["openai"].append(timed(lambda: single_openai(url, args.single_chunks)))
            many["unbroken"].append(
                timed(lambda: concurrent_unbroken(url, args.streams, args.chunks))
            )
            many["openai"].append(timed(lambda: concurrent_openai(url, args.streams, args.chunks)))
        report(f"one stream of {args.single_chunks:,} chunks (sync clients):", single)
        report(
            f"{args.streams} concurrent streams of {args.chunks:,} chunks (async clients):", many
        )
        pairs = ttft_pairs(url)
        p50 = {name: 1000 * pct(values[3:], 0.5) for name, values in pairs.items()}
        print(
            f"time to first chunk, 30 alternating short streams (sync): unbroken "
            f"{p50['unbroken']:.2f} ms, openai {p50['openai']:.2f} ms (p50)"
        )


if __name__ == "__main__":
    main()
