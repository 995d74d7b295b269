"""The gateway's own cost per answer: short streamed answers, side by side with the floor relay.

bench/gateway.py relays answers of 200 chunks, so what an answer costs once (accept, the
request's parse, keys and limits, the SDK's request, the upstream write, the response head,
the end of the stream log, usage, metrics) is ~1/200 of its CPU-per-chunk figure. Here the
mock answers with --tokens tokens (3) and no delay between them, so the per-answer work is
nearly all of it. At each concurrency of --levels (1 and 8) a load in this process (uvloop,
one new connection per answer, as bench/gateway.py's load) sends --answers answers one after
another per worker, to the mock itself (`direct`), through `unbroken serve` and through the
floor relay of bench/gateway.py (uvloop + Protocol, bytes passed through), and prints per
target: the server process's CPU per answer (utime + stime from /proc), the time to the first
token p50 and its overhead over `direct`, and the ratios unbroken / floor. Each level runs
--repeat times (3), the targets alternated within each repeat; figures are medians with
their ranges in brackets.

`--bytecodes` instead runs --answers answers one after another through a gateway whose
main thread is traced (CPython opcode events, switched on and off by signals) and prints
the bytecodes run per answer, by function and by file, then by stretch of the answer (from
accept to the upstream request's write, from there to the upstream's head, from the head to
the first write to the client, the rest) with the functions of the first and third, and the
objects the cyclic
collector found per answer (gc.DEBUG_SAVEALL): counts that do not move with the host's
load. The first answers are run untraced (imports, spare connections, caches).

Run: python bench/answer_cost.py [--levels 1,8] [--answers 1000] [--repeat 3] [--tokens 3]
     python bench/answer_cost.py --bytecodes [--answers 200] [--top 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gateway  # noqa: E402 - after the path insert above
from _mockproc import mock_process  # noqa: E402
from _proxy import FIRST_WRITE_PROXY  # noqa: E402

WARM_ANSWERS = 50

# The gateway process under --bytecodes: `unbroken serve` with a tracer that SIGUSR1 arms
# and SIGUSR2 disarms, writing its counts to $ANSWER_COST_OUT (the serve command's
# arguments follow, as bench/gateway.py's launcher).
TRACED_SERVE = (
    FIRST_WRITE_PROXY
    + """
import asyncio, collections, gc, json, os, signal, sys
import unbroken.gateway.accept as accept, unbroken.gateway.guard as guard
import unbroken.gateway.upstream as upstream
counts = collections.Counter()
calls = collections.Counter()
# The answer's stretches (see PHASES in bench/answer_cost.py): a call of one of these
# functions starts one; the first write to a client's connection starts the last.
phase = [3]
marks = {accept.Acceptor._accept.__code__: 0, upstream.LeanTransport._exchange.__code__: 1,
         upstream._Connection.on_headers_complete.__code__: 2}
phased = collections.Counter()
probe = set()
def tracer(frame, event, arg):
    code = frame.f_code
    if code in probe:
        return None
    at = marks.get(code)
    if at is not None and at == (phase[0] + 1) % 4:  # in turn (a coroutine resumes with a call)
        phase[0] = at
    key = code.co_filename + ":" + code.co_qualname
    if code.co_filename == "<string>":  # dataclasses' generated methods: name the class
        key += "[" + type(frame.f_locals.get("self")).__qualname__ + "]"
    calls[key] += 1
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    return Local(key)
class Local:  # not a closure: a closure that returns itself is a cycle per call
    __slots__ = ("key",)
    def __init__(self, key):
        self.key = key
    def __call__(self, frame, event, arg):
        if event == "opcode":
            counts[self.key] += 1
            phased[phase[0], self.key] += 1
        return self
def first_write():  # the end of the head's stretch
    if phase[0] == 2:
        phase[0] = 3
made = guard.GuardedProtocol.connection_made
def connection_made(self, transport):
    made(self, Proxy(transport, first_write))
guard.GuardedProtocol.connection_made = connection_made
probe.update(PROXY_CODES)
probe.update((first_write.__code__, connection_made.__code__))
def on(*_):
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    counts.clear()
    calls.clear()
    phased.clear()
    sys.settrace(tracer)
def off(*_):
    sys.settrace(None)
    gc.collect()
    garbage = collections.Counter(type(o).__qualname__ for o in gc.garbage)
    gc.set_debug(0)
    gc.garbage.clear()
    out = os.environ["ANSWER_COST_OUT"]
    with open(out + ".tmp", "w") as f:
        json.dump({"counts": counts, "calls": calls, "garbage": garbage,
                   "phased": [[p, k, n] for (p, k), n in phased.items()]}, f)
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
import typer
from unbroken.cli.gateway_cmds import serve
app = typer.Typer(); app.command()(serve); app(sys.argv[1:])
"""
)


# The stretches of an answer, in order, as the traced gateway splits its bytecodes: each
# starts at its mark (TRACED_SERVE) and runs until the next one's; whether --bytecodes lists
# its functions. The first and third are on the way to the first token. (The mock answers
# here with no delay between tokens: the head's read brings the whole answer, and the third
# stretch relays all of it, as the first client write holds the answer's events.)
PHASES = [
    ("entry: accept -> upstream write", True),
    ("upstream write -> upstream head", False),
    ("head -> first client write", True),
    ("the rest: chunks, end, close", False),
]


def _mock_config(tokens: int) -> str:
    return f"MockConfig(seed=1, answer_tokens=({tokens}, {tokens}), latency=Latency(token_ms=0))"


async def _answers(target: gateway.Target, concurrency: int, answers: int) -> list[Any]:
    """`answers` streamed answers from `target`, `concurrency` at a time, back to back."""
    results: list[Any] = []
    indices = iter(range(answers))

    async def worker() -> None:
        for index in indices:  # shared: each worker takes the next answer as it frees
            await gateway._one(target.port, target.path, target.auth, index, results)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with the [gateway] extra
        return asyncio.new_event_loop


def run_once(
    runner: asyncio.Runner, target: gateway.Target, concurrency: int, answers: int, tokens: int
) -> dict[str, float]:
    """One run against one target: CPU per answer of its process, TTFT p50, whole answers."""
    cpu0 = gateway.cpu_seconds(target.pid) if target.pid else 0.0
    results = runner.run(_answers(target, concurrency, answers))
    cpu = (gateway.cpu_seconds(target.pid) - cpu0) if target.pid else float("nan")
    ttfts = [r[0] for r in results if r[0] is not None]
    # The mock's answer: the role chunk, `tokens` tokens, the usage chunk.
    whole = sum(1 for r in results if r[2] and r[3] == 200 and r[1] >= tokens + 1)
    return {
        "whole": whole,
        "answers": len(results),
        "cpu_us": cpu / len(results) * 1e6,
        "ttft_ms": gateway.pct(ttfts, 0.5) * 1000,
    }


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def report(level: int, runs: dict[str, list[dict[str, float]]], answers: int) -> None:
    print(
        f"\nconcurrency {level}: {answers} answers per run; load average {gateway._load_average()}"
    )
    print(
        f"{'target':<9} {'whole':>11} {'cpu us/answer':>22} {'ttft p50 ms':>20} "
        f"{'overhead p50':>13}"
    )
    base = statistics.median(r["ttft_ms"] for r in runs["direct"])
    medians: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        whole = f"{int(sum(r['whole'] for r in rs))}/{int(sum(r['answers'] for r in rs))}"
        cpu = _spread([r["cpu_us"] for r in rs], ".0f") if name != "direct" else "(mock)"
        ttfts = [r["ttft_ms"] for r in rs]
        over = statistics.median(ttfts) - base
        print(f"{name:<9} {whole:>11} {cpu:>22} {_spread(ttfts, '.3f'):>20} {over:>11.3f}ms")
        medians[name] = {
            "cpu": statistics.median(r["cpu_us"] for r in rs),
            "over": over,
        }
    ours, floor = medians.get("unbroken"), medians.get("floor")
    if ours and floor:
        # /proc counts CPU in clock ticks (10 ms): a tiny run may see none for the floor.
        ratio = f"{ours['cpu'] / floor['cpu']:.2f}x" if floor["cpu"] > 0 else "n/a (no tick)"
        print(f"  CPU per answer: unbroken / floor = {ratio}")
        print(
            f"  TTFT overhead p50: unbroken {ours['over']:.3f} ms, floor {floor['over']:.3f} ms, "
            f"difference {ours['over'] - floor['over']:.3f} ms"
        )


def compare(levels: list[int], answers: int, repeat: int, tokens: int) -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        mock_url = stack.enter_context(mock_process(_mock_config(tokens)))
        mock_port = int(mock_url.rsplit(":", 1)[1])
        targets = [
            gateway.Target("direct", 0, mock_port, "/v1/chat/completions"),
            stack.enter_context(gateway.unbroken_server(mock_url, Path(tmp))),
            stack.enter_context(gateway.floor_server(mock_port)),
        ]
        runner = stack.enter_context(asyncio.Runner(loop_factory=_loop_factory()))
        print(
            f"mock at {mock_url} ({tokens} tokens per answer, no delay); "
            f"pids: {', '.join(f'{t.name} {t.pid}' for t in targets if t.pid)}; "
            f"{os.cpu_count()} CPUs"
        )
        for target in targets:  # warm-up: imports, connections, caches
            run_once(runner, target, 4, WARM_ANSWERS, tokens)
        for level in levels:
            runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for i in range(repeat):
                # Alternated order: a drift of the host's load falls on every target alike.
                for target in targets if i % 2 == 0 else targets[::-1]:
                    runs[target.name].append(run_once(runner, target, level, answers, tokens))
            report(level, runs, answers)


def _short(filename: str) -> str:
    return filename.rpartition("/unbroken/")[2] or filename.rpartition("/lib/python")[2]


def bytecodes(answers: int, tokens: int, top: int) -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "counts.json"
        mock_url = stack.enter_context(mock_process(_mock_config(tokens)))
        target = stack.enter_context(
            gateway.unbroken_server(
                mock_url,
                Path(tmp),
                # The sources: a tracer sees no bytecode of the compiled chunk path.
                extra_env={"ANSWER_COST_OUT": str(out), "UNBROKEN_PURE_PYTHON": "1"},
                launcher=[sys.executable, "-c", TRACED_SERVE],
            )
        )
        runner = stack.enter_context(asyncio.Runner(loop_factory=_loop_factory()))
        run_once(runner, target, 1, WARM_ANSWERS, tokens)
        os.kill(target.pid, signal.SIGUSR1)
        time.sleep(0.2)  # the gateway's loop runs the handler as it wakes
        done = run_once(runner, target, 1, answers, tokens)
        os.kill(target.pid, signal.SIGUSR2)
        data: dict[str, Any] = gateway.read_json_when_written(
            out, 60, "the traced gateway's counts"
        )
    counts: dict[str, int] = data["counts"]
    n = answers
    total = sum(counts.values())
    print(
        f"bytecodes per answer: {total / n:.0f} ({n} answers of {tokens} tokens one after "
        f"another, {int(done['whole'])} whole; the gateway's main thread)"
    )
    calls: dict[str, int] = data["calls"]
    print(f"  {'bytecodes':>9} {'calls':>6}  (per answer; a coroutine's resumes count as calls)")
    for where, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
        filename, _, name = where.partition(":")
        print(f"  {count / n:9.1f} {calls.get(where, 0) / n:6.1f}  {_short(filename)}:{name}")
    files: dict[str, int] = {}
    for where, count in counts.items():
        files[_short(where.rpartition(":")[0])] = (
            files.get(_short(where.rpartition(":")[0]), 0) + count
        )
    print("by file:")
    for filename, count in sorted(files.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {count / n:7.1f}  {filename}")
    stretches: list[dict[str, int]] = [{} for _ in PHASES]
    for at, where, count in data["phased"]:
        stretches[at][where] = count
    print("by stretch of the answer (bytecodes per answer):")
    for (name, _), counted in zip(PHASES, stretches, strict=True):
        print(f"  {sum(counted.values()) / n:7.1f}  {name}")
    for (name, shown), counted in zip(PHASES, stretches, strict=True):
        if not shown:
            continue
        print(f"{name}, by function:")
        for where, count in sorted(counted.items(), key=lambda kv: -kv[1])[:top]:
            filename, _, function = where.partition(":")
            print(f"  {count / n:9.1f}  {_short(filename)}:{function}")
    garbage: dict[str, int] = data["garbage"]
    print(f"objects found by the cyclic collector per answer: {sum(garbage.values()) / n:.1f}")
    for kind, count in sorted(garbage.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count / n:7.2f}  {kind}")


def _levels(text: str) -> Iterator[int]:
    for part in text.split(","):
        if part.strip():
            yield int(part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8", help="concurrency levels")
    parser.add_argument("--answers", type=int, default=1000, help="answers per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--tokens", type=int, default=3, help="tokens per answer")
    parser.add_argument(
        "--bytecodes", action="store_true", help="instead: bytecodes per answer, traced"
    )
    parser.add_argument("--top", type=int, default=30, help="rows of --bytecodes")
    args = parser.parse_args()
    try:
        levels = list(_levels(args.levels))
    except ValueError as e:
        parser.error(f"--levels: {e}")
    if not levels or min(levels) < 1 or args.answers < 1 or args.repeat < 1 or args.tokens < 1:
        parser.error("--levels, --answers, --repeat and --tokens need values >= 1")
    if args.bytecodes:
        bytecodes(args.answers, args.tokens, args.top)
    else:
        compare(levels, args.answers, args.repeat, args.tokens)


if __name__ == "__main__":
    main()
