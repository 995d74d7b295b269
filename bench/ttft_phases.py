"""Where the time to first token goes through the gateway, request by request.

Under bench/gateway.py's load (streams of 200 chunks 5 ms apart, --levels streams in flight,
one per connection), a gateway probed in its own process stamps four moments of each request:
its connection accepted, its request read, the upstream request written, the upstream's
response head taken, and the first bytes written to the client. The script prints, per
level, the mock's own time to first token (`direct`, measured first in the same run), the
client's time to first token through the gateway, and the spread (p50/p90/p99) of each stretch:

  accept -> read       the request's bytes read after its connection was accepted
  read -> upstream     the gateway's own work before the upstream request is written
  upstream -> head     the upstream's answer to that request, as the gateway sees it
  head -> client       the gateway's own work from the response head to the client's bytes

The first two and the last are the gateway's own; the third is the upstream's, and on a
shared machine it grows with whatever else takes the CPU, the gateway's work included.
The probe wraps methods of the Python classes, so its gateway runs the sources
(`UNBROKEN_PURE_PYTHON=1`): compiled classes cannot be wrapped.

Run: python bench/ttft_phases.py [--levels 32,256] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gateway  # noqa: E402 - after the path insert above
from _mockproc import mock_process  # noqa: E402
from _proxy import FIRST_WRITE_PROXY  # noqa: E402

# The probed gateway: `unbroken serve` with its protocol's connection_made and
# data_received and its upstream pool's `_exchange` wrapped to stamp each request (the
# request's task inherits the stamp through a context variable set in the read that makes
# it), and the client's transport behind a proxy that stamps its first write. SIGUSR1
# clears the stamps, SIGUSR2 writes them to $TTFT_PHASES_OUT.
PROBED_SERVE = (
    FIRST_WRITE_PROXY
    + r"""
import asyncio, contextvars, json, os, signal, sys, time
import unbroken.gateway.guard as guard, unbroken.gateway.upstream as upstream
now = time.perf_counter
stamps = []
current = contextvars.ContextVar("stamp", default=None)
made, read, exchange = (guard.GuardedProtocol.connection_made,
    guard.GuardedProtocol.data_received, upstream.LeanTransport._exchange)
def connection_made(self, transport):
    stamp = self._ttft_stamp = [now(), None, None, None, None]
    stamps.append(stamp)
    made(self, Proxy(transport, lambda: stamp.__setitem__(4, now())))
def data_received(self, data):
    stamp = self.__dict__.get("_ttft_stamp")
    if stamp is not None and stamp[1] is None:
        stamp[1] = now()
        current.set(stamp)
    read(self, data)
async def _exchange(self, *args, **kwargs):
    stamp = current.get()
    if stamp is not None and stamp[2] is None:
        stamp[2] = now()
    response = await exchange(self, *args, **kwargs)
    if stamp is not None and stamp[3] is None:
        stamp[3] = now()
    return response
guard.GuardedProtocol.connection_made = connection_made
guard.GuardedProtocol.data_received = data_received
upstream.LeanTransport._exchange = _exchange
def clear(*_):
    stamps.clear()
def dump(*_):
    out = os.environ["TTFT_PHASES_OUT"]
    with open(out + ".tmp", "w") as f:
        json.dump(stamps, f)
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, clear)
signal.signal(signal.SIGUSR2, dump)
import typer
from unbroken.cli.gateway_cmds import serve
app = typer.Typer(); app.command()(serve); app(sys.argv[1:])
"""
)

STRETCHES = [
    ("accept -> read", 0, 1),
    ("read -> upstream", 1, 2),
    ("upstream -> head", 2, 3),
    ("head -> client", 3, 4),
]


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    n = len(ordered)
    p50, p90, p99 = (ordered[min(n - 1, int(n * q))] * 1000 for q in (0.5, 0.9, 0.99))
    return f"{p50:8.2f} {p90:8.2f} {p99:8.2f}"


def _read_stamps(path: Path, limit_s: float, skip: int) -> list[list[float]]:
    """The stamps the gateway wrote to `path`, in the order their connections were
    accepted, less the first `skip`; a request not stamped whole is left out."""
    stamps: list[list[float | None]] = gateway.read_json_when_written(
        path, limit_s, "the probed gateway's stamps"
    )
    path.unlink()
    return [[t for t in s if t is not None] for s in stamps[skip:] if None not in s]


def run(levels: list[int], repeat: int) -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stamps.json"
        mock_url = stack.enter_context(mock_process(gateway.MOCK_CONFIG))
        port = int(mock_url.rsplit(":", 1)[1])
        direct = gateway.Target("direct", gateway._mock_pid(), port, "/v1/chat/completions")
        target = stack.enter_context(
            gateway.unbroken_server(
                mock_url,
                Path(tmp),
                extra_env={"TTFT_PHASES_OUT": str(out), "UNBROKEN_PURE_PYTHON": "1"},
                launcher=[sys.executable, "-c", PROBED_SERVE],
            )
        )
        for level in levels:
            direct_runs: list[dict[str, float]] = []
            runs: list[dict[str, float]] = []
            stamps: list[list[float]] = []
            for _ in range(repeat):
                direct_runs.append(gateway.measure(direct, level, 1))
                figures, stamped = _measure_probed(target, level, out)
                runs.append(figures)
                stamps.extend(stamped)
            _report(level, repeat, direct_runs, runs, stamps)


def _measure_probed(
    target: gateway.Target, level: int, out: Path
) -> tuple[dict[str, float], list[list[float]]]:
    """One load run of `gateway.measure` with the gateway's stamps cleared first; its
    warm-up's requests (the first ones accepted) are left out of the stamps returned."""
    os.kill(target.pid, signal.SIGUSR1)
    time.sleep(0.2)  # the gateway's loop runs the handler as it wakes
    figures = gateway.measure(target, level, 1)
    os.kill(target.pid, signal.SIGUSR2)
    # `gateway.measure` runs min(level, 8) requests to warm up before the load: the first
    # connections accepted.
    return figures, _read_stamps(out, 30, min(level, 8))


def _report(
    level: int,
    repeat: int,
    direct_runs: list[dict[str, float]],
    runs: list[dict[str, float]],
    stamps: list[list[float]],
) -> None:
    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(
        f"\nconcurrency {level}: {len(stamps)} requests stamped over {repeat} runs; load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (medians of the runs)"
    )
    print(
        f"  time to first token: direct p50 {median(direct_runs, 'ttft50'):.2f} ms, p99 "
        f"{median(direct_runs, 'ttft99'):.2f} ms; through unbroken p50 "
        f"{median(runs, 'ttft50'):.2f} ms, p99 {median(runs, 'ttft99'):.2f} ms"
    )
    if not stamps:
        print("  no request was stamped whole")
        return
    print(f"  {'stretch (ms)':<20} {'p50':>8} {'p90':>8} {'p99':>8}")
    for name, start, end in STRETCHES:
        print(f"  {name:<20} {_spread([s[end] - s[start] for s in stamps])}")
    own = [(s[2] - s[1]) + (s[4] - s[3]) for s in stamps]
    print(f"  {'gateway own':<20} {_spread(own)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="32,256", help="concurrency levels")
    parser.add_argument("--repeat", type=int, default=2, help="runs per level")
    args = parser.parse_args()
    run([int(x) for x in args.levels.split(",") if x], args.repeat)


if __name__ == "__main__":
    main()
