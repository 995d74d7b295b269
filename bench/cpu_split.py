"""Splits the gateway's CPU into a part per answer and a part per chunk, user and system
time apart, side by side with the floor relay of bench/gateway.py.

bench/gateway.py prints one figure, CPU per relayed chunk, which mixes what an answer costs
once (accept, request parse, the SDK's request, the upstream write, the read-back of the
text, the final event, the metrics) with what each chunk costs. This script runs the same
load (--concurrency streams, 5 ms between tokens, one mock process) twice per server: with
answers of --short and of --long tokens, and solves for the two parts per server from the
user and system CPU seconds the server process used (/proc/PID/stat, as bench/gateway.py
reads them): per chunk = (long - short) / (chunks long - chunks short), per answer = the
rest. Each length is run --repeat times, unbroken and the floor alternated, and the medians
are printed with their ranges. Why: a change that cuts work per answer moves the first
figure and hardly the gateway bench's (an answer is ~1/200 of a chunk's figure there), and
the user/system split says whether a gap is Python (user) or system calls.

Run: python bench/cpu_split.py [--concurrency 32] [--short 18] [--long 198] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gateway  # noqa: E402 - after the path insert above
from _mockproc import mock_process  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Streams per run: this many rounds of --concurrency (more for short answers, so that both
# lengths run about as long).
ROUNDS = {"short": 20, "long": 4}


def _times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process `pid` (children not included)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _run(target: gateway.Target, concurrency: int, rounds: int) -> tuple[float, float, int, int]:
    """One load run: user and system seconds of the server, answers, chunks."""
    user0, sys0 = _times(target.pid)
    out = subprocess.run(
        gateway._load_args(target, concurrency, rounds),
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    user1, sys1 = _times(target.pid)
    results = json.loads(out.stdout)["results"]
    return user1 - user0, sys1 - sys0, len(results), sum(r[1] for r in results)


def _mock_config(tokens: int) -> str:
    return (
        f"MockConfig(seed=1, answer_tokens=({tokens}, {tokens}), "
        f"latency=Latency(token_ms={gateway.TOKEN_MS}))"
    )


def measure(tokens: int, concurrency: int, rounds: int, repeat: int) -> dict[str, list[float]]:
    """Per server: us of user and system CPU per answer, and chunks per answer, each run."""
    runs: dict[str, list[float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        mock_url = stack.enter_context(mock_process(_mock_config(tokens)))
        targets = [
            stack.enter_context(gateway.unbroken_server(mock_url, Path(tmp))),
            stack.enter_context(gateway.floor_server(int(mock_url.rsplit(":", 1)[1]))),
        ]
        for target in targets:  # warm-up: imports, connections, caches
            _run(target, min(concurrency, 8), 1)
        for _ in range(repeat):
            for target in targets:  # alternated
                user, system, answers, chunks = _run(target, concurrency, rounds)
                for key, value in (
                    ("user", user * 1e6 / answers),
                    ("sys", system * 1e6 / answers),
                    ("chunks", chunks / answers),
                ):
                    runs.setdefault(f"{target.name} {key}", []).append(value)
    return runs


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    parser.add_argument("--short", type=int, default=18, help="tokens of the short answers")
    parser.add_argument("--long", type=int, default=198, help="tokens of the long answers")
    parser.add_argument("--repeat", type=int, default=3, help="runs per length and server")
    args = parser.parse_args()
    short = measure(args.short, args.concurrency, ROUNDS["short"], args.repeat)
    long = measure(args.long, args.concurrency, ROUNDS["long"], args.repeat)
    print(
        f"concurrency {args.concurrency}, answers of {args.short} and {args.long} tokens, "
        f"{args.repeat} runs each (medians, ranges); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'server':<9} {'kind':<5} {'per answer us':>24} {'per chunk us':>24}")
    for name in ("unbroken", "floor"):
        n_short = statistics.median(short[f"{name} chunks"])
        n_long = statistics.median(long[f"{name} chunks"])
        for kind in ("user", "sys"):
            # Run i of the short answers with run i of the long ones gives one solution:
            # medians and ranges over them.
            chunk, answer = [], []
            for a, b in zip(short[f"{name} {kind}"], long[f"{name} {kind}"], strict=True):
                per_chunk = (b - a) / (n_long - n_short)
                chunk.append(per_chunk)
                answer.append(a - per_chunk * n_short)
            print(f"{name:<9} {kind:<5} {_spread(answer):>24} {_spread(chunk):>24}")


if __name__ == "__main__":
    main()
