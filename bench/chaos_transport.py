"""Chaos for the official openai SDK: the same seeded fault mix as bench/chaos.py, through the
plain SDK and through the SDK with `unbroken.HTTPTransport`, side by side in one run.

Printed per row: chaos.py's figures (completed %, byte-identical %, duplicated and missing
characters, extra latency against the same row's fault-free run, extra tokens billed), the
client's CPU per chunk in fault-free runs (median of --repeat runs; the mock runs in its own
process), and the mock's count of resumes whose prefix was not the answer's own text.

Run: python bench/chaos_transport.py [--streams 300] [--seed 7] [--concurrency 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from _mockproc import mock_process
from chaos import CONFIG_EXPR, RETRY, TIMEOUTS, Case, Outcome, Row, make_cases, report

import unbroken


def sdk_client(url: str, *, transport: bool) -> Any:
    """The official SDK with its defaults, except a read timeout so stalls end (as the
    plain row of chaos.py); with the transport, our timers and policy do the healing."""
    import openai

    if not transport:
        return openai.OpenAI(api_key="sk", base_url=url, timeout=5.0)
    http = httpx.Client(
        transport=unbroken.HTTPTransport(timeouts=TIMEOUTS, retry=RETRY, seed=3),
    )
    return openai.OpenAI(api_key="sk", base_url=url, timeout=5.0, http_client=http)  # type: ignore[arg-type]  # typed for httpx2, takes httpx


def run_sdk(
    url: str, cases: list[Case], concurrency: int, *, transport: bool
) -> tuple[Row, int, float]:
    """One pass over `cases`: the row, the chunks the SDK yielded, and this process's CPU
    seconds (client side only)."""
    client = sdk_client(url, transport=transport)
    flavour = "transport" if transport else "openai"
    chunks = [0] * len(cases)

    def one(case: Case) -> Outcome:
        start = time.perf_counter()
        out = Outcome()
        try:
            stream = client.chat.completions.create(
                model="deepseek-chat",
                messages=case.messages,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=case.headers(flavour),
            )
            parts: list[str] = []
            finish, usage, n = None, 0, 0
            for chunk in stream:
                n += 1
                for ch in chunk.choices:
                    parts.append(ch.delta.content or "")
                    finish = ch.finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
            chunks[case.index] = n
            out.text = "".join(parts)
            out.completed = True
            out.billed_tokens = usage
            if finish is None:
                out.error = "silent truncation"
        except Exception as exc:  # the SDK raises its own and httpx's errors
            out.error = type(exc).__name__
        out.seconds = time.perf_counter() - start
        return out

    cpu = time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, cases))
    cpu = time.process_time() - cpu
    client.close()
    name = "openai+transport" if transport else "openai SDK"
    return Row(name, outcomes), sum(chunks), cpu


def mismatches(url: str) -> int:
    """The mock's count of resumes whose prefix was not the answer's text (0 if it does
    not count them)."""
    stats = httpx.get(f"{url}/_mock/stats", headers={"Authorization": "Bearer sk"}).json()
    return int(stats.get("prefix_mismatches", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="fault-free runs per row")
    args = parser.parse_args()
    cases = make_cases(args.streams, args.seed)
    faulted = sum(1 for c in cases if c.fault)
    twice = sum(1 for c in cases if "times=2" in c.fault)
    print(f"{args.streams} streams, {faulted} with a fault ({twice} hit twice), seed {args.seed}")
    clean_cases = [Case(c.index, c.messages, "", c.expected) for c in cases]
    costs: dict[bool, float] = {}
    ok = True
    with mock_process(CONFIG_EXPR) as url:
        for transport in (False, True):
            per_chunk = []
            clean = None
            for _ in range(max(1, args.repeat)):
                clean, n_chunks, cpu = run_sdk(
                    url, clean_cases, args.concurrency, transport=transport
                )
                per_chunk.append(cpu / max(1, n_chunks))
            assert clean is not None
            costs[transport] = statistics.median(per_chunk)
            before = mismatches(url)
            start = time.perf_counter()
            row, _, _ = run_sdk(url, cases, args.concurrency, transport=transport)
            good = report(row, clean, cases)
            wrong = mismatches(url) - before
            print(
                f"  {'':<15} client CPU per chunk {1e6 * costs[transport]:.1f} us (median of "
                f"{len(per_chunk)} fault-free runs); wrong resume prefixes {wrong}; "
                f"({time.perf_counter() - start:.1f} s)"
            )
            if transport:
                ok = good and wrong == 0
    print(
        f"cost per chunk: SDK through HTTPTransport {1e6 * costs[True]:.1f} us, plain SDK "
        f"{1e6 * costs[False]:.1f} us, ratio {costs[True] / max(costs[False], 1e-12):.2f}x"
    )
    print(
        "bar: the SDK through HTTPTransport 100% completed and byte-identical, 0 duplicated, "
        "0 missing, 0 wrong prefixes:",
        "PASS" if ok else "FAIL",
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
