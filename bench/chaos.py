"""Chaos: many streams against the mock with a seeded mix of faults, through unbroken (sync
and async) and the official openai SDK, side by side in one run.

Each stream i gets a fault drawn from the mix (seeded), applied to its first attempt, or to
its first two attempts for a share of them ("hit twice"), through the mock's X-Mock-Fault
header with a per-stream fault key. Printed per client: completed %, byte-identical to the
fault-free answer %, duplicated and missing characters (difflib against the fault-free
answer), extra latency (each stream against itself in a fault-free run with the same client
and concurrency; p50 and p99 of those differences), and extra tokens billed against that run.

Run: python bench/chaos.py [--streams 1000] [--seed 7] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from _mockproc import mock_process

import unbroken
from unbroken import RetryPolicy, Timeouts
from unbroken.mock import MockConfig, answer_text

# The mix named in issue #5 (probabilities of the first attempt's fault; the rest is clean).
MIX: list[tuple[float, str]] = [
    (0.20, "503"),
    (0.10, "429 retry_after=0.2"),
    (0.20, "reset after={n}"),
    (0.10, "close after={n}"),
    (0.05, "stall after={n}"),
    (0.05, "malformed after={n}"),
    (0.05, "error after={n}"),
]
HIT_TWICE = 0.2  # share of faulted streams whose first two attempts fail
# Tokens paced at 2 ms (a fast model) so the run is not CPU-bound: extra latency then
# measures fault handling, not queueing behind other streams.
CONFIG_EXPR = "MockConfig(seed=3, answer_tokens=(24, 96), latency=Latency(token_ms=2.0))"
CONFIG = MockConfig(seed=3, answer_tokens=(24, 96))
# Stalls are detected by the idle timer; 1 s keeps the run short (the default is 60 s).
TIMEOUTS = Timeouts(connect_s=5, headers_s=10, first_token_s=10, idle_s=1.0)
RETRY = RetryPolicy(attempts=8, max_resumes=5, wait_initial_s=0.05, wait_max_s=1.0)


@dataclass
class Case:
    index: int
    messages: list[dict[str, str]]
    fault: str
    expected: str

    def headers(self, flavour: str) -> dict[str, str]:
        if not self.fault:
            return {}
        return {"X-Mock-Fault": self.fault, "X-Mock-Fault-Key": f"{flavour}-{self.index}"}


@dataclass
class Outcome:
    text: str = ""
    completed: bool = False
    seconds: float = 0.0
    billed_tokens: int = 0
    error: str = ""


@dataclass
class Row:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)


def make_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Question {i}: tell me about streams."}]
        _, expected = answer_text("deepseek-chat", messages, config=CONFIG)
        draw, fault, acc = rng.random(), "", 0.0
        for probability, spec in MIX:
            acc += probability
            if draw < acc:
                fault = spec.format(n=rng.randint(2, 20))
                break
        if fault:
            fault += " times=2" if rng.random() < HIT_TWICE else " times=1"
            if fault.startswith("stall"):
                fault += " ms=30000"
        cases.append(Case(i, messages, fault, expected))
    return cases


def run_unbroken_sync(url: str, cases: list[Case], concurrency: int) -> Row:
    client = unbroken.Client(api_key="sk", base_url=url, timeouts=TIMEOUTS, retry=RETRY, seed=1)

    def one(case: Case) -> Outcome:
        start = time.perf_counter()
        out = Outcome()
        try:
            stream = client.chat.completions.create(
                model="deepseek-chat",
                messages=case.messages,
                stream=True,
                extra_headers=case.headers("sync"),
            )
            parts: list[str] = []
            for chunk in stream:
                parts.extend(ch.delta.content or "" for ch in chunk.choices if ch.delta)
            final = stream.final()
            out.text = "".join(parts)
            out.completed = final.choices[0].finish_reason == "stop"
            out.billed_tokens = final.usage.total_tokens if final.usage else 0
        except unbroken.UnbrokenError as exc:
            out.error = type(exc).__name__
        out.seconds = time.perf_counter() - start
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, cases))
    client.close()
    return Row("unbroken sync", outcomes)


def run_unbroken_async(url: str, cases: list[Case], concurrency: int) -> Row:
    async def main() -> list[Outcome]:
        gate = asyncio.Semaphore(concurrency)
        async with unbroken.AsyncClient(
            api_key="sk", base_url=url, timeouts=TIMEOUTS, retry=RETRY, seed=2
        ) as client:

            async def one(case: Case) -> Outcome:
                async with gate:
                    start = time.perf_counter()
                    out = Outcome()
                    try:
                        stream = await client.chat.completions.create(
                            model="deepseek-chat",
                            messages=case.messages,
                            stream=True,
                            extra_headers=case.headers("async"),
                        )
                        parts: list[str] = []
                        async for chunk in stream:
                            parts.extend(ch.delta.content or "" for ch in chunk.choices if ch.delta)
                        final = await stream.final()
                        out.text = "".join(parts)
                        out.completed = final.choices[0].finish_reason == "stop"
                        out.billed_tokens = final.usage.total_tokens if final.usage else 0
                    except unbroken.UnbrokenError as exc:
                        out.error = type(exc).__name__
                    out.seconds = time.perf_counter() - start
                    return out

            return list(await asyncio.gather(*(one(c) for c in cases)))

    return Row("unbroken async", asyncio.run(main()))


def run_openai(url: str, cases: list[Case], concurrency: int) -> Row:
    import openai

    # Its defaults, except a read timeout so stalls end (its default of 600 s would
    # hang the run); max_retries=2 is the SDK's own default.
    client = openai.OpenAI(api_key="sk", base_url=url, timeout=5.0)

    def one(case: Case) -> Outcome:
        start = time.perf_counter()
        out = Outcome()
        try:
            stream = client.chat.completions.create(  # type: ignore[call-overload]
                model="deepseek-chat",
                messages=case.messages,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=case.headers("openai"),
            )
            parts: list[str] = []
            finish, usage = None, 0
            for chunk in stream:
                for ch in chunk.choices:
                    parts.append(ch.delta.content or "")
                    finish = ch.finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
            out.text = "".join(parts)
            # The SDK reports success whenever iteration ends without an exception.
            out.completed = True
            out.billed_tokens = usage
            if finish is None:
                out.error = "silent truncation"
        except Exception as exc:  # the SDK raises its own and httpx's errors
            out.error = type(exc).__name__
        out.seconds = time.perf_counter() - start
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, cases))
    client.close()
    return Row("openai SDK", outcomes)


def diff_counts(expected: str, got: str) -> tuple[int, int]:
    """(duplicated, missing) characters of `got` against `expected`."""
    if expected == got:
        return 0, 0
    extra = missing = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
        None, expected, got, autojunk=False
    ).get_opcodes():
        if tag in ("insert", "replace"):
            extra += j2 - j1
        if tag in ("delete", "replace"):
            missing += i2 - i1
    return extra, missing


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def report(row: Row, clean: Row, cases: list[Case]) -> bool:
    n = len(cases)
    completed = sum(o.completed and not o.error for o in row.outcomes)
    identical = sum(
        o.text == c.expected and not o.error for o, c in zip(row.outcomes, cases, strict=True)
    )
    dup = miss = 0
    for o, c in zip(row.outcomes, cases, strict=True):
        d, m = diff_counts(c.expected, o.text)
        dup += d
        miss += m
    # Per stream: its latency minus the same stream's in the fault-free run (same client
    # and concurrency), then the percentiles of those differences.
    extra = [o.seconds - c.seconds for o, c in zip(row.outcomes, clean.outcomes, strict=True)]
    billed = sum(o.billed_tokens for o in row.outcomes)
    base_tokens = sum(o.billed_tokens for o in clean.outcomes)
    errors: dict[str, int] = {}
    for o in row.outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    more = billed - base_tokens
    print(
        f"  {row.name:<15} completed {100 * completed / n:6.2f}%  "
        f"identical {100 * identical / n:6.2f}%  duplicated {dup:>6} chars  "
        f"missing {miss:>7} chars  extra latency p50 {1000 * pct(extra, 0.5):+7.1f} ms "
        f"p99 {1000 * pct(extra, 0.99):+8.1f} ms  extra tokens billed {more:+d} "
        f"({100 * more / max(1, base_tokens):+.1f}%)"
    )
    if errors:
        print(f"  {'':<15} errors: {dict(sorted(errors.items()))}")
    return completed == n and identical == n and dup == 0 and miss == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-openai", action="store_true")
    args = parser.parse_args()
    cases = make_cases(args.streams, args.seed)
    faulted = sum(1 for c in cases if c.fault)
    twice = sum(1 for c in cases if "times=2" in c.fault)
    print(f"{args.streams} streams, {faulted} with a fault ({twice} hit twice), seed {args.seed}")
    clean_cases = [Case(c.index, c.messages, "", c.expected) for c in cases]
    with mock_process(CONFIG_EXPR) as url:
        runners: list[Callable[[str, list[Case], int], Row]] = [
            run_unbroken_sync,
            run_unbroken_async,
        ]
        if not args.skip_openai:
            runners.append(run_openai)
        ok = True
        for runner in runners:
            clean = runner(url, clean_cases, args.concurrency)
            start = time.perf_counter()
            row = runner(url, cases, args.concurrency)
            good = report(row, clean, cases)
            if row.name.startswith("unbroken"):
                ok = ok and good
            print(f"  {'':<15} ({time.perf_counter() - start:.1f} s)")
    print(
        "bar: unbroken 100% completed and byte-identical, 0 duplicated, 0 missing:",
        "PASS" if ok else "FAIL",
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
