"""Times the relay's per-chunk path inside a running gateway, under bench/gateway.py's load.

bench/hotpath.py measures the Python work of a relayed chunk in one process (~4 us at 32
streams) while bench/gateway.py finds ~13 us more CPU per chunk than the floor relay; this
script looks inside `unbroken serve` at that load to say where the difference is. It runs
the gateway with its upstream connections' data callback (`_Connection.data_received`: the
httptools parse, the SDK's decode, the log append and the client write of each chunk) and
the client writes of the live path (`DirectBody.write_event`'s `transport.write`, the send
syscall uvloop makes at once) timed with `perf_counter_ns`, and the garbage collector's
collections timed through `gc.callbacks`. It prints, per upstream read of a live answer:
the callback's wall time, the part spent in the client write, and the rest (Python work;
the timing adds ~0.5 us), as medians and quartiles; then the collections made during the
load and their pauses, and the run's CPU per chunk as bench/gateway.py counts it.

Wall times on a shared machine include preemption: compare medians, not means.
Run: `python bench/chain_timing.py [--runs N] [--concurrency C]`.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# Where the served gateway writes its timings (JSON) when it exits.
OUT_ENV = "UNBROKEN_CHAIN_TIMING_OUT"


_clock = time.perf_counter_ns
_reads = array("Q")  # the data callback's wall time per read of a live answer
_writes = array("Q")  # of which client writes
_pending = [0]  # client write time within the current read
_collections: list[tuple[float, int, int]] = []  # (time, generation, ns)


class TimedTransport:
    """A client's transport, its writes timed."""

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        at = _clock()
        self.transport.write(data)
        _pending[0] += _clock() - at

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _timed(data_received: Any, live: Any) -> Any:
    """`data_received` timed for the reads `live(protocol)` says are of a live answer."""

    def timed(self: Any, data: bytes) -> None:
        counted = live(self)
        _pending[0] = 0
        at = _clock()
        data_received(self, data)
        took = _clock() - at
        if counted:
            _reads.append(took)
            _writes.append(_pending[0])

    return timed


def _record() -> None:
    """Time the collections, and write everything down at exit (SIGTERM included)."""
    started = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = _clock()
        else:
            _collections.append((time.time(), info["generation"], _clock() - started[0]))

    gc.callbacks.append(on_gc)

    def dump() -> None:
        with open(os.environ[OUT_ENV], "w", encoding="utf-8") as out:
            json.dump({"reads": list(_reads), "writes": list(_writes), "gc": _collections}, out)

    atexit.register(dump)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # atexit runs on exit


def serve(argv: list[str]) -> None:
    """`unbroken serve` with the per-chunk path timed (the server process's entry)."""
    from unbroken.gateway import direct, upstream

    write_event = direct.DirectBody.write_event

    def timed_write_event(self: Any, seq: int, data: bytes) -> bool:
        if type(self._transport) is not TimedTransport:
            self._transport = TimedTransport(self._transport)
        return bool(write_event(self, seq, data))

    upstream._Connection.data_received = _timed(  # type: ignore[method-assign]
        upstream._Connection.data_received, lambda conn: conn._tap is not None
    )
    direct.DirectBody.write_event = timed_write_event  # type: ignore[method-assign]
    _record()

    import typer

    from unbroken.cli.gateway_cmds import serve as serve_cmd

    app = typer.Typer()
    app.command()(serve_cmd)
    app(argv)


def serve_floor(port: int, mock_port: int) -> None:
    """bench/gateway.py's floor relay with the same timing (the floor process's entry)."""
    import gateway as bench
    import uvloop

    connection_made = bench._FloorSide.connection_made

    def timed_connection_made(self: Any, transport: Any) -> None:
        connection_made(self, cast("asyncio.BaseTransport", TimedTransport(transport)))

    bench._UpstreamSide.data_received = _timed(  # type: ignore[method-assign]
        bench._UpstreamSide.data_received, lambda side: True
    )
    bench._FloorSide.connection_made = timed_connection_made  # type: ignore[method-assign]
    _record()
    uvloop.run(bench._floor(port, mock_port))


@contextmanager
def floor_server(mock_port: int, workdir: Path) -> Iterator[Any]:
    """The timed floor in its own process."""
    import gateway as bench
    from _mockproc import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--floor-serve", str(port), str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        bench._wait_ready(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": "Bearer sk"},
            proc,
            20,
        )
        yield bench.Target("floor", proc.pid, port, "/v1/chat/completions")
    finally:
        proc.terminate()
        proc.wait(10)


def _q(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else 0.0


def _run(name: str, serving: Any, concurrency: int, runs: int, out: Path) -> None:
    """Load `runs` times the server `serving` starts (a context manager); print its figures."""
    import gateway as bench

    rows = []
    with serving as target:
        load_from = time.time()  # bench/gateway.py's `measure` warms up first, untimed here
        for _ in range(runs):
            rows.append(bench.measure(target, concurrency, bench.ROUNDS.get(concurrency, 1)))
    data = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    reads, writes = data["reads"], data["writes"]
    rest = [r - w for r, w in zip(reads, writes, strict=True)]
    print(
        f"{name}: CPU per chunk "
        + ", ".join(f"{r['us_per_chunk']:.1f}" for r in rows)
        + f" us (bench/gateway.py's figure); {len(reads)} upstream reads timed"
    )
    for label, values in (
        ("data callback", reads),
        ("  client write", writes),
        ("  the rest", rest),
    ):
        print(
            f"  {label:<15} median {_q(values, 0.5):6.2f} us  "
            f"(p10 {_q(values, 0.1):.2f}, p25 {_q(values, 0.25):.2f}, p75 {_q(values, 0.75):.2f})"
        )
    during = [(gen, ns) for at, gen, ns in data["gc"] if at >= load_from]
    print(
        f"  garbage collections during the load: {len(during)} "
        f"(generations {[gen for gen, _ in during]}), {sum(ns for _, ns in during) / 1e6:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="load runs (bench/gateway.py's)")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    import gateway as bench
    from _mockproc import mock_process

    print(
        f"concurrency {args.concurrency}, {args.runs} run(s) each, "
        f"load average {bench._load_average()}"
    )
    with tempfile.TemporaryDirectory() as tmp, mock_process(bench.MOCK_CONFIG) as mock_url:
        out = Path(tmp) / "timing.json"
        os.environ[OUT_ENV] = str(out)
        launcher = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        mock_port = int(mock_url.rsplit(":", 1)[1])
        _run(
            "unbroken",
            bench.unbroken_server(mock_url, Path(tmp), launcher=launcher),
            args.concurrency,
            args.runs,
            out,
        )
        _run("floor", floor_server(mock_port, Path(tmp)), args.concurrency, args.runs, out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
    elif sys.argv[1:2] == ["--floor-serve"]:
        serve_floor(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
