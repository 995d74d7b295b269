"""Two versions of the gateway side by side: each tree's `unbroken serve` under the same load
at the same time, on one mock, round after round.

On a shared, noisy machine two runs taken one after the other differ by more than a small
change does (the floor relay's own CPU per chunk moved between 16 and 30 us from run to run
here). Run at the same time, both gateways meet the same noise, so the per-round ratio of
their figures is steady where each figure alone is not. Each round starts a load process per
gateway (bench/gateway.py's client: --concurrency streams of 200 chunks 5 ms apart), the two
in alternating order, and measures each gateway process's CPU per relayed chunk (utime +
stime from /proc) and its clients' time to first token.

It prints, per round, both figures of both trees and the ratio new / old, then the medians,
ranges, the median ratio and in how many rounds the new tree cost less. A tree is a checkout
whose `src` holds the package; its compiled build (`python tools/compile_native.py` in that
tree) is used when it is fresh, as by `unbroken serve` anywhere.

Run: python bench/ab.py --old /path/to/old/checkout [--new .] [--rounds 8] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
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


def _src(tree: str) -> str:
    src = Path(tree).resolve() / "src"
    if not (src / "unbroken" / "__init__.py").is_file():
        raise SystemExit(f"{tree}: no src/unbroken in it (pass a checkout of unbroken)")
    return str(src)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the checkout to compare against")
    parser.add_argument("--new", default=str(BENCH.parent), help="this checkout by default")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    trees = {"old": _src(args.old), "new": _src(args.new)}
    streams = gateway.ROUNDS.get(args.concurrency, 1)
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    ttft: dict[str, list[float]] = {"old": [], "new": []}
    with ExitStack() as stack:
        mock_url = stack.enter_context(mock_process(gateway.MOCK_CONFIG))
        targets = {}
        for name, src in trees.items():
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            env = {"PYTHONPATH": src}
            targets[name] = stack.enter_context(
                gateway.unbroken_server(mock_url, workdir, extra_env=env)
            )
        for target in targets.values():  # warm-up: connections, caches, first imports
            subprocess.run(gateway._load_args(target, 8, 1), check=True, capture_output=True)
        print(
            f"{args.rounds} rounds of {args.concurrency} streams x {streams} per gateway, "
            f"both at once on one mock; {gateway._load_average()}"
        )
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            before = {n: gateway.cpu_seconds(targets[n].pid) for n in order}
            loads = {
                n: subprocess.Popen(
                    gateway._load_args(targets[n], args.concurrency, streams),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for n in order
            }
            outs = {n: json.loads(p.communicate(timeout=600)[0]) for n, p in loads.items()}
            for n in order:
                results = outs[n]["results"]
                chunks = sum(result[1] for result in results)
                if not chunks:
                    raise SystemExit(f"round {r}: the {n} gateway relayed no chunk")
                spent = gateway.cpu_seconds(targets[n].pid) - before[n]
                cpu[n].append(spent / chunks * 1e6)
                firsts = [result[0] for result in results if result[0] is not None]
                ttft[n].append(statistics.median(firsts) * 1e3 if firsts else float("nan"))
            print(
                f"round {r + 1}: us/chunk old {cpu['old'][-1]:.1f} new {cpu['new'][-1]:.1f} "
                f"(new/old {cpu['new'][-1] / cpu['old'][-1]:.3f}); ttft p50 old "
                f"{ttft['old'][-1]:.2f} ms new {ttft['new'][-1]:.2f} ms",
                flush=True,
            )
    ratios = [new / old for old, new in zip(cpu["old"], cpu["new"], strict=True)]
    lower = sum(ratio < 1 for ratio in ratios)
    print(f"us/chunk: old {_spread(cpu['old'])}, new {_spread(cpu['new'])}")
    print(f"ttft p50 ms: old {_spread(ttft['old'])}, new {_spread(ttft['new'])}")
    print(
        f"new/old us/chunk per round: median {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f}); new lower in {lower} of {len(ratios)} rounds"
    )


if __name__ == "__main__":
    main()
