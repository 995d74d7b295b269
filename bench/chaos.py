"""Chaos: many streams against the mock with a seeded mix of faults, through unbroken (sync
and async), the official openai SDK, and the official SDK through `unbroken.HTTPTransport`,
side by side in one run; and the correlated break.

Mix scenario: each stream i gets a fault drawn from the mix (seeded; `done_early` included),
applied to its first attempt, or to its first two attempts for a share of them ("hit
twice"), through the mock's X-Mock-Fault header with a per-stream fault key. Printed per
client: completed %, byte-identical to the fault-free answer %, silent truncations (an
answer that ended as a success but is not the whole answer), duplicated and missing
characters (difflib against the fault-free answer), extra latency (each stream against
itself in a fault-free run with the same client and concurrency; p50 and p99 of those
differences), extra tokens billed: the mock's own logged completion_tokens of the
faulted run minus those of the fault-free run, and the client's CPU per chunk in the
fault-free run (this process's CPU time over the chunks the client yielded; the mock runs in
its own process). The SDK through the transport must be 100% whole and byte-identical across
the whole mix; its cost per chunk is printed beside the plain SDK's.

Correlated scenario (`--correlated`): N streams at once (default 500), each reset by the
mock after the same number of chunks (`reset after=10 times=1`), so every in-flight
stream breaks together, as when an upstream instance restarts. Run through `AsyncClient`
with default settings and through `unbroken serve` with the official `openai` SDK as the
client. Printed: whole answers, byte-identical, the peak upstream request rate while
recovering (continuations per second, from the mock's log, in 100 ms windows), and the
p99 extra latency against a fault-free run.

Every run also checks the mock's `prefix_mismatches` counter: a continuation whose prefix
is not what the mock itself sent would be a resume that changed the answer.

Run: python bench/chaos.py [--streams 1000] [--seed 7] [--concurrency 16] [--repeat 3]
     python bench/chaos.py --correlated [--streams 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from _mockproc import free_port, mock_process

import unbroken
from unbroken import RetryPolicy, Timeouts
from unbroken.mock import MockConfig, answer_text

# The mock's whole fault mix (probabilities of the first attempt's fault; the rest is
# clean). `done_early` is a `[DONE]` before any finish_reason: never a silent success.
MIX: list[tuple[float, str]] = [
    (0.15, "503"),
    (0.08, "429 retry_after=0.2"),
    (0.15, "reset after={n}"),
    (0.08, "close after={n}"),
    (0.05, "stall after={n}"),
    (0.05, "malformed after={n}"),
    (0.05, "error after={n}"),
    (0.08, "done_early after={n}"),
    (0.04, "insufficient after={n}"),
    (0.03, "no_done"),
    (0.03, "reset_before_headers"),
]
HIT_TWICE = 0.2  # share of faulted streams whose first two attempts fail
# Tokens paced at 2 ms (a fast model) so the run is not CPU-bound: extra latency then
# measures fault handling, not queueing behind other streams.
CONFIG_EXPR = (
    "MockConfig(seed=3, answer_tokens=(24, 96), latency=Latency(token_ms=2.0), log_size=100000)"
)
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
    chunks: int = 0


def mock_log(url: str) -> list[dict[str, Any]]:
    """The mock's request log since its last reset (its own record, not the clients')."""
    response = httpx.get(f"{url}/_mock/log", params={"limit": 100_000}, timeout=30)
    response.raise_for_status()
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def mock_reset(url: str) -> None:
    httpx.post(f"{url}/_mock/reset", timeout=30).raise_for_status()


def prefix_mismatches(url: str) -> int:
    stats = httpx.get(f"{url}/_mock/stats", timeout=30).json()
    return int(stats.get("prefix_mismatches", 0))


def logged_completion_tokens(entries: list[dict[str, Any]]) -> int:
    return sum(int(e.get("completion_tokens") or 0) for e in entries if "chat" in e["path"])


def peak_rate(entries: list[dict[str, Any]], *, window_s: float = 0.1) -> float:
    """The most continuation requests (`/beta/...`) that arrived in any `window_s`,
    per second."""
    times = sorted(float(e["time"]) for e in entries if e["path"].startswith("/beta/"))
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window_s


@dataclass
class Row:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    cpu_s: float = 0.0  # this process's CPU time for the whole pass

    @property
    def cpu_per_chunk_s(self) -> float:
        """CPU per chunk the client yielded (0 when the runner does not count chunks)."""
        chunks = sum(o.chunks for o in self.outcomes)
        return self.cpu_s / chunks if chunks else 0.0


def run_pool(name: str, cases: list[Case], concurrency: int, one: Callable[[Case], Outcome]) -> Row:
    """`one` over `cases` in `concurrency` threads, with the CPU time it took."""
    cpu = time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, cases))
    return Row(name, outcomes, time.process_time() - cpu)


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
                out.chunks += 1
                parts.extend(ch.delta.content or "" for ch in chunk.choices if ch.delta)
            final = stream.final()
            out.text = "".join(parts)
            out.completed = final.choices[0].finish_reason == "stop"
            out.billed_tokens = final.usage.total_tokens if final.usage else 0
        except unbroken.UnbrokenError as exc:
            out.error = type(exc).__name__
        out.seconds = time.perf_counter() - start
        return out

    row = run_pool("unbroken sync", cases, concurrency, one)
    client.close()
    return row


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
                            out.chunks += 1
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

    cpu = time.process_time()
    outcomes = asyncio.run(main())
    return Row("unbroken async", outcomes, time.process_time() - cpu)


def sdk_client(url: str, *, transport: bool) -> Any:
    """The official SDK with its defaults, except a read timeout so stalls end (its default
    of 600 s would hang the run; max_retries=2 is the SDK's own default). With the
    transport, unbroken's timers and retry policy (the same as the unbroken rows') heal."""
    import openai

    if not transport:
        return openai.OpenAI(api_key="sk", base_url=url, timeout=5.0)
    http = httpx.Client(transport=unbroken.HTTPTransport(timeouts=TIMEOUTS, retry=RETRY, seed=3))
    return openai.OpenAI(api_key="sk", base_url=url, timeout=5.0, http_client=http)  # type: ignore[arg-type]  # typed for httpx2, takes httpx


def run_sdk(url: str, cases: list[Case], concurrency: int, *, transport: bool) -> Row:
    """The official SDK over `cases`, plain or through `unbroken.HTTPTransport`."""
    client = sdk_client(url, transport=transport)
    flavour = "transport" if transport else "openai"

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
            finish, usage = None, 0
            for chunk in stream:
                out.chunks += 1
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

    row = run_pool("openai+transport" if transport else "openai SDK", cases, concurrency, one)
    client.close()
    return row


def run_openai(url: str, cases: list[Case], concurrency: int) -> Row:
    """The plain official SDK."""
    return run_sdk(url, cases, concurrency, transport=False)


def run_openai_transport(url: str, cases: list[Case], concurrency: int) -> Row:
    """The official SDK through `unbroken.HTTPTransport`."""
    return run_sdk(url, cases, concurrency, transport=True)


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


def summarize(row: Row, clean: Row, cases: list[Case]) -> dict[str, Any]:
    n = len(cases)
    pairs = list(zip(row.outcomes, cases, strict=True))
    dup = miss = 0
    for o, c in pairs:
        d, m = diff_counts(c.expected, o.text)
        dup += d
        miss += m
    # Per stream: its latency minus the same stream's in the fault-free run (same client
    # and concurrency), then the percentiles of those differences.
    extra = [o.seconds - c.seconds for o, c in zip(row.outcomes, clean.outcomes, strict=True)]
    errors: dict[str, int] = {}
    for o in row.outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "n": n,
        "completed": sum(o.completed and not o.error for o, _ in pairs),
        "identical": sum(o.text == c.expected and not o.error for o, c in pairs),
        # Ended as a success (no error) without being the whole answer.
        "silent": sum(not o.error and o.text != c.expected for o, c in pairs),
        "dup": dup,
        "miss": miss,
        "p50_ms": 1000 * pct(extra, 0.5),
        "p99_ms": 1000 * pct(extra, 0.99),
        "errors": errors,
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def report(row: Row, clean: Row, cases: list[Case]) -> bool:
    """Print one faulted run against its fault-free run (client-side figures only); True
    when every answer completed byte-identical with nothing duplicated or missing."""
    m = summarize(row, clean, cases)
    n = m["n"]
    billed = sum(o.billed_tokens for o in row.outcomes)
    more = billed - sum(o.billed_tokens for o in clean.outcomes)
    print(
        f"  {row.name:<15} completed {100 * m['completed'] / n:6.2f}%  "
        f"identical {100 * m['identical'] / n:6.2f}%  silent truncations {m['silent']}  "
        f"duplicated {m['dup']:>6} chars  missing {m['miss']:>7} chars  extra latency p50 "
        f"{m['p50_ms']:+7.1f} ms p99 {m['p99_ms']:+8.1f} ms  extra tokens billed {more:+d}"
    )
    if m["errors"]:
        print(f"  {'':<15} errors: {dict(sorted(m['errors'].items()))}")
    return bool(m["completed"] == n and m["identical"] == n and m["dup"] == m["miss"] == 0)


def report_runs(name: str, runs: list[dict[str, Any]]) -> None:
    """Print the medians over the repeats (and the error kinds of the last run)."""
    n = runs[0]["n"]
    med = {k: median_of(runs, k) for k in runs[0] if isinstance(runs[0][k], int | float)}
    base = max(1.0, med["base_tokens"])
    print(
        f"  {name:<22} completed {100 * med['completed'] / n:6.2f}%  "
        f"identical {100 * med['identical'] / n:6.2f}%  silent truncations "
        f"{med['silent']:.0f}  duplicated {med['dup']:.0f} chars  missing {med['miss']:.0f} "
        f"chars  extra latency p50 {med['p50_ms']:+.1f} ms p99 {med['p99_ms']:+.1f} ms  "
        f"extra tokens billed (mock log) {med['extra_tokens']:+.0f} "
        f"({100 * med['extra_tokens'] / base:+.1f}%)  peak recovery rate "
        f"{med['peak_rate']:.0f} req/s  prefix mismatches {med['prefix_mismatches']:.0f}  "
        f"({med['seconds']:.1f} s; median of {len(runs)})"
    )
    if med["cpu_per_chunk_us"]:
        print(
            f"  {'':<22} client CPU per chunk {med['cpu_per_chunk_us']:.1f} us "
            "(fault-free run; the mock runs in its own process)"
        )
    if runs[-1]["errors"]:
        print(f"  {'':<22} errors: {dict(sorted(runs[-1]['errors'].items()))}")


def measure(
    url: str,
    runner: Callable[[str, list[Case], int], Row],
    cases: list[Case],
    concurrency: int,
    target: str | None = None,
) -> dict[str, Any]:
    """One fault-free run and one faulted run; billing and rates from the mock's log."""
    clean_cases = [Case(c.index, c.messages, "", c.expected) for c in cases]
    where = target or url
    mock_reset(url)
    clean = runner(where, clean_cases, concurrency)
    base_tokens = logged_completion_tokens(mock_log(url))
    mock_reset(url)
    start = time.perf_counter()
    row = runner(where, cases, concurrency)
    seconds = time.perf_counter() - start
    entries = mock_log(url)
    metrics = summarize(row, clean, cases)
    metrics.update(
        base_tokens=base_tokens,
        extra_tokens=logged_completion_tokens(entries) - base_tokens,
        peak_rate=peak_rate(entries),
        prefix_mismatches=prefix_mismatches(url),
        seconds=seconds,
        cpu_per_chunk_us=1e6 * clean.cpu_per_chunk_s,
    )
    return metrics


def run_async_defaults(url: str, cases: list[Case], concurrency: int) -> Row:
    """AsyncClient with default settings, every stream at once."""

    async def main() -> list[Outcome]:
        async with unbroken.AsyncClient(api_key="sk", base_url=url) as client:

            async def one(case: Case) -> Outcome:
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
                except unbroken.UnbrokenError as exc:
                    out.error = type(exc).__name__
                out.seconds = time.perf_counter() - start
                return out

            return list(await asyncio.gather(*(one(c) for c in cases)))

    return Row("AsyncClient defaults", asyncio.run(main()))


def run_openai_via_gateway(url: str, cases: list[Case], concurrency: int) -> Row:
    """The official openai SDK (its defaults) against `unbroken serve`, every stream at once."""
    import openai

    async def main() -> list[Outcome]:
        client = openai.AsyncOpenAI(api_key="sk", base_url=f"{url}/v1")

        async def one(case: Case) -> Outcome:
            start = time.perf_counter()
            out = Outcome()
            try:
                stream: Any = await client.chat.completions.create(
                    model="deepseek-chat",
                    messages=case.messages,  # type: ignore[arg-type]
                    stream=True,
                    extra_headers=case.headers("gateway"),
                )
                parts: list[str] = []
                finish = None
                async for chunk in stream:
                    for ch in chunk.choices:
                        parts.append(ch.delta.content or "")
                        finish = ch.finish_reason or finish
                out.text = "".join(parts)
                out.completed = finish == "stop"
                if finish is None:
                    out.error = "silent truncation"
            except Exception as exc:  # the SDK raises its own and httpx's errors
                out.error = type(exc).__name__
            out.seconds = time.perf_counter() - start
            return out

        try:
            return list(await asyncio.gather(*(one(c) for c in cases)))
        finally:
            await client.close()

    return Row("openai SDK -> gateway", asyncio.run(main()))


@contextmanager
def gateway_process(mock_url: str) -> Iterator[str]:
    """`unbroken serve` in its own process, upstream the mock, the mock's fault headers
    forwarded, default settings otherwise."""
    port = free_port()
    code = (
        "import sys, typer; from unbroken.cli.gateway_cmds import serve; "
        "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
    )
    env = {
        **os.environ,
        "DEEPSEEK_API_KEY": "sk-bench",
        "UNBROKEN_GATEWAY_FORWARD_HEADERS": "x-mock-*",
    }
    argv = [sys.executable, "-c", code, "--port", str(port), "--upstream", mock_url]
    proc = subprocess.Popen(
        [*argv, "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.1)  # waiting for another process to listen
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def correlated_cases(n: int) -> list[Case]:
    cases = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Question {i}: tell me about streams."}]
        _, expected = answer_text("deepseek-chat", messages, config=CONFIG)
        cases.append(Case(i, messages, "reset after=10 times=1", expected))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs per client (medians)")
    parser.add_argument(
        "--skip-openai", action="store_true", help="no openai SDK rows (plain and transport)"
    )
    parser.add_argument("--correlated", action="store_true", help="the correlated break")
    args = parser.parse_args()
    ok = True
    if args.correlated:
        n = args.streams or 500
        cases = correlated_cases(n)
        print(f"correlated break: {n} streams at once, each reset after 10 chunks")
        with mock_process(CONFIG_EXPR) as url, gateway_process(url) as gateway:
            plans: list[tuple[str, Callable[[str, list[Case], int], Row], str | None]] = [
                ("AsyncClient defaults", run_async_defaults, None),
                ("openai SDK -> gateway", run_openai_via_gateway, gateway),
            ]
            for name, runner, target in plans:
                runs = [measure(url, runner, cases, n, target) for _ in range(args.repeat)]
                report_runs(name, runs)
                ok = ok and all(r["identical"] == n and r["prefix_mismatches"] == 0 for r in runs)
        print(f"bar: {n}/{n} byte-identical through both, 0 prefix mismatches:", _verdict(ok))
        sys.exit(0 if ok else 1)
    n = args.streams or 1000
    cases = make_cases(n, args.seed)
    faulted = sum(1 for c in cases if c.fault)
    twice = sum(1 for c in cases if "times=2" in c.fault)
    print(f"{n} streams, {faulted} with a fault ({twice} hit twice), seed {args.seed}")
    costs: dict[str, float] = {}
    with mock_process(CONFIG_EXPR) as url:
        runners: list[Callable[[str, list[Case], int], Row]] = [
            run_unbroken_sync,
            run_unbroken_async,
        ]
        if not args.skip_openai:
            runners += [run_openai, run_openai_transport]
        for runner in runners:
            runs = [measure(url, runner, cases, args.concurrency) for _ in range(args.repeat)]
            name = runner(url, [], 1).name
            report_runs(name, runs)
            costs[name] = median_of(runs, "cpu_per_chunk_us")
            if name.startswith("unbroken"):
                # Never silent: every answer is byte-identical or a typed error.
                ok = ok and all(
                    r["silent"] == 0 and r["dup"] == 0 and r["prefix_mismatches"] == 0 for r in runs
                )
            if name == "openai+transport":
                # The official SDK made unbreakable: every answer whole and byte-identical.
                transport_ok = all(
                    r["completed"] == n
                    and r["identical"] == n
                    and r["dup"] == r["miss"] == 0
                    and r["prefix_mismatches"] == 0
                    for r in runs
                )
                ok = ok and transport_ok
                print(
                    "bar: the openai SDK through unbroken.HTTPTransport 100% whole and "
                    "byte-identical, 0 duplicated, 0 missing, 0 prefix mismatches:",
                    _verdict(transport_ok),
                )
    if "openai+transport" in costs:
        sdk, through = costs["openai SDK"], costs["openai+transport"]
        print(
            f"cost per chunk (client CPU, fault-free): openai SDK through HTTPTransport "
            f"{through:.1f} us, plain openai SDK {sdk:.1f} us, ratio "
            f"{through / max(sdk, 1e-9):.2f}x"
        )
    print(
        "bar: unbroken 0 silent truncations (each answer byte-identical or a typed error), "
        "0 duplicated, 0 prefix mismatches:",
        _verdict(ok),
    )
    sys.exit(0 if ok else 1)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


if __name__ == "__main__":
    main()
