"""System calls and user/system CPU per relayed chunk: the gateway against the floor relay.

bench/gateway.py gives the CPU per chunk of each server; this script splits it. It runs the
same servers on the same mock (`unbroken serve` and the floor relay of bench/gateway.py:
uvloop + asyncio.Protocol, bytes passed through), loads each in turn with bench/gateway.py's
load process (--concurrency streams of 200 chunks, 5 ms apart), and counts, on the server
process only, with `perf stat` on the kernel's syscall tracepoints: the system calls made
per relayed chunk (all, and read, write, epoll_pwait, epoll_ctl, getpid, the socket option
calls, io_uring_enter), and from /proc the user and system CPU per chunk. Per target it
prints the median over --runs runs; then the gateway's figures less the floor's.

Why: at 32 streams of 5 ms tokens each loop wake-up relays about one chunk, so costs paid
per wake-up or per system call (a pause and resume of reading, a timer re-armed, a second
write) would weigh as much as the Python work of the chunk; this tells which it is.

Needs `perf` (linux-perf) and access to tracepoints (root, or kernel.perf_event_paranoid
<= -1); without them only the CPU split is printed.
Run: `python bench/syscalls.py [--concurrency 32] [--runs 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gateway  # noqa: E402 - after the path insert above
from _mockproc import mock_process  # noqa: E402

# The system calls counted one by one (the rest are in "all").
CALLS = (
    "read",
    "write",
    "writev",
    "sendto",
    "recvfrom",
    "epoll_pwait",
    "epoll_ctl",
    "getpid",
    "getsockopt",
    "setsockopt",
    "io_uring_enter",
    "futex",
)
ALL = "raw_syscalls:sys_enter"


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """utime, stime of the process (clock ticks)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _perf_usable() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(
        ["perf", "stat", "-x", ",", "-e", ALL, "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0 and "not supported" not in probe.stderr


def one_run(target: gateway.Target, concurrency: int, perf: bool) -> dict[str, float]:
    """One load run against `target`: its figures per relayed chunk."""
    counts: dict[str, float] = {}
    with tempfile.NamedTemporaryFile(suffix=".perf") as out:
        counter = None
        if perf:
            events = ",".join([ALL, *(f"syscalls:sys_enter_{name}" for name in CALLS)])
            command = ["perf", "stat", "-x", ",", "-o", out.name, "-e", events]
            counter = subprocess.Popen(
                [*command, "-p", str(target.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)  # perf attached before the load starts
        user0, sys0 = _cpu_ticks(target.pid)
        load = subprocess.run(
            gateway._load_args(target, concurrency, 1),
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        user1, sys1 = _cpu_ticks(target.pid)
        if counter is not None:
            counter.send_signal(signal.SIGINT)  # perf prints its counts on SIGINT
            counter.wait(30)
            for line in Path(out.name).read_text(encoding="utf-8").splitlines():
                parts = line.split(",")
                if len(parts) > 2 and parts[0].replace(".", "", 1).isdigit():
                    name = parts[2].removeprefix("syscalls:sys_enter_")
                    counts["all" if name == ALL else name] = float(parts[0])
    results = json.loads(load.stdout)["results"]
    chunks = sum(r[1] for r in results)
    tick_us = 1e6 / gateway.CLK_TCK
    figures = {name: n / chunks for name, n in counts.items()}
    figures["user_us"] = (user1 - user0) * tick_us / chunks
    figures["sys_us"] = (sys1 - sys0) * tick_us / chunks
    figures["chunks"] = chunks
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    parser.add_argument("--runs", type=int, default=3, help="load runs per target")
    args = parser.parse_args()
    perf = _perf_usable()
    if not perf:
        print("perf or its syscall tracepoints are not usable here: CPU split only")
    medians: dict[str, dict[str, float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        mock_url = stack.enter_context(mock_process(gateway.MOCK_CONFIG))
        mock_port = int(mock_url.rsplit(":", 1)[1])
        targets = [
            stack.enter_context(gateway.unbroken_server(mock_url, Path(tmp))),
            stack.enter_context(gateway.floor_server(mock_port)),
        ]
        for target in targets:
            # Warm-up: connections, imports, caches.
            subprocess.run(
                gateway._load_args(target, min(args.concurrency, 8), 1),
                check=True,
                capture_output=True,
                timeout=600,
            )
        # The targets alternate, run by run: a change in the host's load meets both.
        runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        for _ in range(args.runs):
            for target in targets:
                runs[target.name].append(one_run(target, args.concurrency, perf))
        for name, each in runs.items():
            keys = sorted({key for run in each for key in run})
            medians[name] = {
                key: statistics.median(run.get(key, 0.0) for run in each) for key in keys
            }
    print(
        f"concurrency {args.concurrency}, {gateway.CHUNKS} chunks a stream "
        f"{gateway.TOKEN_MS:g} ms apart; medians of {args.runs} runs per target, per "
        f"relayed chunk; load average {os.getloadavg()[0]:.2f}"
    )
    ours, floor = medians["unbroken"], medians["floor"]
    rows = [
        key
        for key in ("all", *CALLS)
        if ours.get(key, 0.0) >= 0.001 or floor.get(key, 0.0) >= 0.001
    ]
    print(f"{'':<16} {'unbroken':>9} {'floor':>9} {'difference':>11}")
    for key in (*rows, "user_us", "sys_us"):
        label = {"all": "syscalls", "user_us": "user CPU us", "sys_us": "system CPU us"}.get(
            key, key
        )
        a, b = ours.get(key, 0.0), floor.get(key, 0.0)
        print(f"{label:<16} {a:>9.3f} {b:>9.3f} {a - b:>+11.3f}")


if __name__ == "__main__":
    main()
