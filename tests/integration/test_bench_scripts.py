"""The measuring scripts under bench/ run, at a tiny size, to their printed figures.

Why: these scripts carry the gateway's speed and memory figures, and nothing else runs them;
one broke once without anyone noticing (a connect path it stood in for had moved). Each run
here is bounded (a few answers, loopback only) and checks that the script ends cleanly and
prints the rows its figures are read from; the figures themselves are noise at this size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

NUMBER = r"-?[\d.]+"

CASES = {
    "answer_cost": (
        ["answer_cost.py", "--levels", "1,2", "--answers", "10", "--repeat", "1"],
        [
            rf"unbroken\s+10/10\s+{NUMBER} \[",
            rf"floor\s+10/10\s+{NUMBER} \[",
            rf"CPU per answer: unbroken / floor = ({NUMBER}x|n/a)",
            rf"TTFT overhead p50: unbroken {NUMBER} ms, floor {NUMBER} ms",
        ],
    ),
    "answer_cost-bytecodes": (
        ["answer_cost.py", "--bytecodes", "--answers", "5", "--top", "5"],
        [
            r"bytecodes per answer: \d+ \(5 answers of 3 tokens one after another, 5 whole",
            rf"{NUMBER}\s+gateway/\w+\.py",
            rf"objects found by the cyclic collector per answer: {NUMBER}",
        ],
    ),
    "ab": (
        ["ab.py", "--old", ".", "--rounds", "1", "--concurrency", "2"],
        [
            rf"round 1: us/chunk old {NUMBER} new {NUMBER} \(new/old {NUMBER}\)",
            rf"new/old us/chunk per round: median {NUMBER} .*new lower in \d of 1 rounds",
        ],
    ),
    "ttft_phases": (
        ["ttft_phases.py", "--levels", "2", "--repeat", "1"],
        [
            r"concurrency 2: 2 requests stamped over 1 runs",
            rf"through unbroken p50 {NUMBER} ms",
            rf"read -> upstream\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
            rf"upstream -> head\s+{NUMBER}",
            rf"head -> client\s+{NUMBER}",
        ],
    ),
    "gateway": (
        ["gateway.py", "--levels", "2", "--repeat", "2", "--skip", "litellm,nginx,pyrelay"],
        [
            rf"unbroken\s+2/2\s+{NUMBER}ms",
            rf"floor\s+2/2\s+{NUMBER}ms",
            rf"CPU per chunk: unbroken / floor = ({NUMBER}x|n/a)",
            r"per round, unbroken / floor: median (\S+x|n/a) \(rounds: \S+, \S+\)",
        ],
    ),
    "hotpath": (
        ["hotpath.py", "--streams", "5"],
        [
            rf"unbroken\s+{NUMBER} us/chunk",
            rf"floor\s+{NUMBER} us/chunk",
            rf"ratio\s+{NUMBER}x the floor",
            rf"per answer \(thread CPU.*start {NUMBER} us",
        ],
    ),
    "hotpath-bytecodes": (
        ["hotpath.py", "--streams", "5", "--interleave", "4", "--bytecodes"],
        [r"bytecodes per chunk: \d+", rf"{NUMBER}\s+core/attempt\.py:relay_one"],
    ),
    "cpu_split": (
        ["cpu_split.py", "--repeat", "1", "--short", "4", "--long", "20", "--concurrency", "4"],
        [rf"unbroken\s+user\s+{NUMBER}", rf"floor\s+sys\s+{NUMBER}"],
    ),
    "stream_memory": (
        [
            "stream_memory.py",
            "--streams",
            "40",
            "--chunks",
            "3",
            "--ramp",
            "0.5",
            "--skip",
            "traced",
        ],
        [rf"unbroken\s+40\s.*{NUMBER}\s+\d+/\d+", rf"unbroken / floor = {NUMBER}x"],
    ),
    "sdk_request": (
        [
            "sdk_request.py",
            "--requests",
            "20",
            "--concurrency",
            "2",
            "--repeat",
            "1",
            "--inprocess",
        ],
        [rf"sdk\s+{NUMBER}", rf"SDK share above the bare transport: {NUMBER} us"],
    ),
    "sdk_request_counts": (
        ["sdk_request.py", "--counts"],
        [
            rf"bytecodes per answer: {NUMBER}",
            r"objects left to the garbage collector per answer: 0\.0",
        ],
    ),
    "syscalls": (
        ["syscalls.py", "--concurrency", "2", "--runs", "1"],
        [rf"user CPU us\s+{NUMBER}\s+{NUMBER}", rf"write\s+{NUMBER}\s+{NUMBER}"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bench_script_prints_its_figures(case: str) -> None:
    args, rows = CASES[case]
    done = subprocess.run(
        [sys.executable, str(BENCH / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        cwd=BENCH.parent,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for row in rows:
        assert re.search(row, output), f"no line matching {row!r} in:\n{output[-3000:]}"
