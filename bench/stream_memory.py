"""What one concurrent stream costs the gateway in memory, beside the floor relay.

One mock DeepSeek process answers slowly (--token-ms between tokens, answers longer than the
run). Against each target, a load thread opens --streams streams over --ramp seconds, reads
them continuously and holds them open mid-answer until every one has received --chunks
chunks; then the target's RSS growth over its baseline (after a warm-up batch) is divided by
the streams held. The targets, each its own process:
  floor      bench/gateway.py's floor relay (uvloop + asyncio.Protocol, bytes passed through)
  unbroken   `unbroken serve` (memory store, one worker), as bench/gateway.py runs it
  traced     the same gateway with tracemalloc on from its start: the Python-allocated bytes
             per live stream, grouped by allocation line and by the first line inside unbroken
             on the allocation's stack, and the gc-tracked objects per stream by type
             (tracemalloc inflates RSS, so the RSS figure comes from the untraced run)
The untraced gateway is also asked to malloc_trim(0) while the streams are held, to show how
much of its RSS growth is memory freed to malloc but not returned to the system.

Run: python bench/stream_memory.py [--streams 1000] [--chunks 100] [--token-ms 250]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
import types
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import MethodType
from typing import Any

import httpx
from _mockproc import mock_process
from gateway import Target, floor_server, rss_bytes, unbroken_server

# Env of the gateway process: where it writes what SIGUSR1 asks for.
DUMP_ENV = "STREAM_MEMORY_DIR"


def request_body(prompt_bytes: int) -> bytes:
    """The request every stream sends: bench/gateway.py's, or a user message of
    `prompt_bytes` bytes (to see what a larger conversation costs per stream)."""
    content = "benchmark 1" if prompt_bytes <= 0 else ("lorem ipsum " * prompt_bytes)[:prompt_bytes]
    return json.dumps(
        {
            "model": "deepseek-chat",
            "stream": True,
            "messages": [{"role": "user", "content": content}],
        }
    ).encode()


# -- inside the gateway process ------------------------------------------------------------


def _dump(signum: int, frame: object) -> None:
    """SIGUSR1: write a tracemalloc snapshot (when tracing) and the gc-tracked objects by
    type to $STREAM_MEMORY_DIR/<n>.*, then <n>.done."""
    out = Path(os.environ[DUMP_ENV])
    n = len(list(out.glob("*.done")))
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(out / f"{n}.snap"))
    objects = gc.get_objects()
    types: dict[str, list[int]] = {}
    owners: dict[str, list[int]] = {}
    labels = _owner_labels(objects)
    for obj in objects:
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if kind.__name__ in ("coroutine", "async_generator", "generator"):
            name += f" {obj.__qualname__}"
        elif kind is MethodType:
            name += f" {getattr(obj.__func__, '__qualname__', '?')}"
        elif isinstance(obj, asyncio.Task):
            name += f" of {getattr(obj.get_coro(), '__qualname__', '?')}"
        size = sys.getsizeof(obj)
        for table, key in ((types, name), (owners, labels.get(id(obj)))):
            if key is not None:
                entry = table.setdefault(key, [0, 0])
                entry[0] += 1
                entry[1] += size
    del objects, labels
    (out / f"{n}.types.json").write_text(json.dumps(types), encoding="utf-8")
    (out / f"{n}.owners.json").write_text(json.dumps(owners), encoding="utf-8")
    (out / f"{n}.done").write_text("", encoding="utf-8")


def _owner_labels(objects: list[Any]) -> dict[int, str]:
    """id -> "Owner.attribute (type)" for the containers held in an instance's attributes
    (its __dict__ or __slots__), and "Owner.__dict__" for the instance dicts."""
    labels: dict[int, str] = {}
    containers = (dict, list, set, deque, bytearray)
    for obj in objects:
        kind = type(obj)
        if isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        owner = kind.__qualname__
        attrs: dict[str, Any] = {}
        try:
            attrs = dict(object.__getattribute__(obj, "__dict__"))
            labels[id(object.__getattribute__(obj, "__dict__"))] = f"{owner}.__dict__"
        except (AttributeError, TypeError):
            pass
        for cls in kind.__mro__:
            for slot in cls.__dict__.get("__slots__", ()):
                with contextlib.suppress(AttributeError, TypeError):
                    attrs[slot] = object.__getattribute__(obj, slot)
        for attr, value in attrs.items():
            if isinstance(value, containers):
                labels.setdefault(id(value), f"{owner}.{attr} ({type(value).__name__})")
    return labels


def _trim(signum: int, frame: object) -> None:
    """SIGUSR2: give glibc's free memory back to the system (malloc_trim(0))."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    (Path(os.environ[DUMP_ENV]) / "trimmed").write_text("", encoding="utf-8")


def serve_main(argv: list[str]) -> None:
    """Entry of the gateway process: `unbroken serve argv...` with the signal hooks."""
    frames = int(os.environ.get("STREAM_MEMORY_FRAMES", "0"))
    if frames:
        tracemalloc.start(frames)
    signal.signal(signal.SIGUSR1, _dump)
    signal.signal(signal.SIGUSR2, _trim)
    import typer

    from unbroken.cli.gateway_cmds import serve

    app = typer.Typer()
    app.command()(serve)
    app(argv)


# -- the load: streams held open mid-answer --------------------------------------------------


class Holder:
    """Streams to one target, read continuously on an event loop in a thread."""

    def __init__(self, target: Target, body: bytes) -> None:
        self.target = target
        self.body = body
        self.counts: list[int] = []
        self.done = 0
        self.failed: dict[str, int] = {}
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    async def _stream(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        t = self.target
        head = (
            f"POST {t.path} HTTP/1.1\r\nHost: 127.0.0.1:{t.port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {t.auth}\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", t.port, limit=1 << 20)
        except OSError as exc:
            self.failed[type(exc).__name__] = self.failed.get(type(exc).__name__, 0) + 1
            return
        self._writers.append(writer)
        writer.write(head + self.body)
        tail = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            window = tail + data
            self.counts[index] += window.count(b"data: {") - tail.count(b"data: {")
            if b"data: [DONE]" in window:
                self.done += 1
            tail = window[-16:]
        writer.close()

    def open(self, n: int, ramp_s: float) -> None:
        """Open n streams, spread over ramp_s seconds."""
        base = len(self.counts)
        self.counts.extend([0] * n)

        def start() -> None:
            for i in range(n):
                self._tasks.append(self.loop.create_task(self._stream(base + i, i * ramp_s / n)))

        self.loop.call_soon_threadsafe(start)

    def wait(self, chunks: int, limit_s: float) -> float:
        """Until every stream has `chunks` chunks; the seconds it took."""
        started = time.monotonic()
        while min(self.counts) < chunks:
            if self.failed or self.done:
                raise RuntimeError(
                    f"{self.target.name}: {self.done} streams ended, failures {self.failed}"
                )
            if time.monotonic() - started > limit_s:
                short = sum(1 for c in self.counts if c < chunks)
                raise RuntimeError(
                    f"{self.target.name}: {short} streams below {chunks} chunks after {limit_s} s"
                )
            time.sleep(0.1)  # polling the load thread's counters
        return time.monotonic() - started

    def close(self) -> None:
        """Close every stream (the target sees the clients go) and stop the thread."""

        def stop() -> None:
            for task in self._tasks:
                task.cancel()
            for writer in self._writers:
                writer.close()

        self.loop.call_soon_threadsafe(stop)
        time.sleep(0.5)  # the closes go out on the load thread's loop
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _ask(pid: int, sig: signal.Signals, out: Path, name: str, limit_s: float = 600) -> None:
    os.kill(pid, sig)
    deadline = time.monotonic() + limit_s
    while not (out / name).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not answer {sig.name}")
        time.sleep(0.05)  # waiting for the gateway's signal handler


def _settle(pid: int, quiet_s: float = 1.0) -> None:
    """Wait until the target's RSS stops moving (connections closed, tasks done)."""
    last = rss_bytes(pid)
    for _ in range(20):
        time.sleep(quiet_s)
        now = rss_bytes(pid)
        if abs(now - last) < 64 * 1024:
            return
        last = now


def hold(target: Target, args: argparse.Namespace, out: Path | None) -> dict[str, Any]:
    """Warm the target up, take its baseline, hold args.streams streams mid-answer, measure."""
    body = request_body(args.prompt_bytes)
    warm = Holder(target, body)
    warm.open(32, 0.5)
    warm.wait(3, 120)
    warm.close()
    if out is not None:
        _quiet(target)
    _settle(target.pid)
    if out is not None:
        _ask(target.pid, signal.SIGUSR1, out, "0.done")
    before = rss_bytes(target.pid)
    streams = args.traced_streams if target.name == "traced" else args.streams
    holder = Holder(target, body)
    try:
        holder.open(streams, args.ramp)
        took = holder.wait(args.chunks, args.ramp + args.chunks * args.token_ms / 1000 * 4 + 120)
        held = rss_bytes(target.pid)
        result: dict[str, Any] = {
            "streams": streams,
            "rss_before": before,
            "rss_held": held,
            "per_stream": (held - before) / streams,
            "chunks": statistics_min_median(holder.counts),
            "took": took,
        }
        if out is not None:
            if target.name == "traced":
                _ask(target.pid, signal.SIGUSR1, out, "1.done")
            else:
                _ask(target.pid, signal.SIGUSR2, out, "trimmed")
                result["rss_trimmed"] = rss_bytes(target.pid)
    finally:
        holder.close()
    if out is not None:
        _quiet(target)
    _settle(target.pid)
    return result


def _quiet(target: Target, limit_s: float = 120) -> None:
    """Wait until the gateway has no answer in flight (its clients went; a busy gateway
    takes a while to see every one go)."""
    url = f"http://127.0.0.1:{target.port}/metrics"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(
                url, headers={"Authorization": f"Bearer {target.auth}"}, timeout=30
            ).text
        except httpx.HTTPError:
            continue  # a busy gateway: ask again
        if re.search(r"^unbroken_gateway_stream_writers 0\.0$", text, re.M):
            return
        time.sleep(0.5)  # polling the gateway's metrics
    raise RuntimeError(f"{target.name}: answers still in flight {limit_s} s after the close")


def statistics_min_median(counts: list[int]) -> tuple[int, int]:
    ordered = sorted(counts)
    return ordered[0], ordered[len(ordered) // 2]


# -- reading the dumps -------------------------------------------------------------------------


def _where(filename: str, lineno: int) -> str:
    for mark in ("/site-packages/", "/src/", "/lib/python3"):
        if mark in filename:
            filename = filename.split(mark, 1)[1]
            break
    return f"{filename}:{lineno}"


def _ROOT(filename: str) -> bool:
    """The frames every callback of the server has below it (not where anything is made)."""
    return filename.endswith(("/cli/gateway_cmds.py", "/gateway/server.py"))


def _by_own_line(snapshot: tracemalloc.Snapshot) -> dict[str, list[int]]:
    """Bytes and blocks by the innermost frame inside unbroken's sources on each stack (the
    allocation's own line when no frame is ours)."""
    out: dict[str, list[int]] = {}
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)[::-1]  # a Traceback lists the oldest frame first
        ours = next(
            (f for f in frames if "/unbroken/" in f.filename and not _ROOT(f.filename)),
            frames[0],
        )
        entry = out.setdefault(_where(ours.filename, ours.lineno), [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    return out


def breakdown(out: Path, streams: int, top: int) -> None:
    """Print what tracemalloc and gc saw per held stream."""
    before = tracemalloc.Snapshot.load(str(out / "0.snap"))
    after = tracemalloc.Snapshot.load(str(out / "1.snap"))
    traced = sum(s.size for s in after.statistics("filename")) - sum(
        s.size for s in before.statistics("filename")
    )
    print(f"\ntraced: {traced / streams / 1024:.2f} KiB per stream allocated by Python, in all")
    print(f"\nby allocation line (top {top}), per stream:")
    print(f"  {'bytes':>8} {'blocks':>7}  line")
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        print(
            f"  {stat.size_diff / streams:>8.0f} {stat.count_diff / streams:>7.1f}  "
            f"{_where(frame.filename, frame.lineno)}"
        )
    tables = (
        (
            "by the innermost line of unbroken on the stack",
            "blocks",
            "line",
            _by_own_line(before),
            _by_own_line(after),
        ),
        (
            "gc-tracked objects by type (sys.getsizeof, shallow)",
            "objects",
            "type",
            *_swapped(out, "types"),
        ),
        (
            "containers by the attribute holding them (shallow)",
            "objects",
            "owner.attribute",
            *_swapped(out, "owners"),
        ),
    )
    for title, unit, label, was, now in tables:
        grown = sorted(
            (
                (v[0] - was.get(k, [0, 0])[0], v[1] - was.get(k, [0, 0])[1], k)
                for k, v in now.items()
            ),
            reverse=True,
        )
        print(f"\n{title} (top {top}), per stream:")
        print(f"  {'bytes':>8} {unit:>7}  {label}")
        for size, count, key in grown[:top]:
            print(f"  {size / streams:>8.0f} {count / streams:>7.2f}  {key}")


def _swapped(out: Path, name: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The before/after dumps of `name` as [bytes, count] per key (the dumps hold
    [count, bytes])."""
    dumps = []
    for i in (0, 1):
        raw = json.loads((out / f"{i}.{name}.json").read_text(encoding="utf-8"))
        dumps.append({k: [v[1], v[0]] for k, v in raw.items()})
    return dumps[0], dumps[1]


# -- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway(mock_url: str, workdir: Path, out: Path, frames: int, streams: int) -> Iterator[Target]:
    env = {
        DUMP_ENV: str(out),
        "STREAM_MEMORY_FRAMES": str(frames),
        # Every stream comes from 127.0.0.1: the per-client cap must let them all in.
        "UNBROKEN_GATEWAY_MAX_CONNECTIONS": str(streams + 64),
        "UNBROKEN_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": str(streams + 64),
    }
    launcher = [sys.executable, __file__, "--serve"]
    with unbroken_server(
        mock_url, workdir, extra_env=env, launcher=launcher, probe="/v1/models", ready_s=120
    ) as target:
        yield target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams held at once")
    parser.add_argument("--chunks", type=int, default=100, help="chunks each has when measured")
    parser.add_argument("--token-ms", type=float, default=250.0, help="ms between tokens")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds to open the streams")
    parser.add_argument(
        "--traced-streams",
        type=int,
        default=300,
        help="streams held by the traced gateway (tracemalloc slows it several times)",
    )
    parser.add_argument("--frames", type=int, default=6, help="tracemalloc frames kept")
    parser.add_argument("--top", type=int, default=15, help="rows per breakdown")
    parser.add_argument(
        "--prompt-bytes", type=int, default=0, help="a user message of this size (default: tiny)"
    )
    parser.add_argument("--skip", default="", help="targets to skip: floor,unbroken,traced")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="a directory to keep the traced run's dumps in (tracemalloc snapshots 0.snap "
        "before and 1.snap while held), for a closer look",
    )
    args = parser.parse_args()
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    answer = int(args.chunks * 4 + args.ramp * 1000 / args.token_ms + 600)
    config = (
        f"MockConfig(seed=1, answer_tokens=({answer}, {answer}), "
        f"latency=Latency(token_ms={args.token_ms}))"
    )
    print(
        f"{args.streams} streams held open until each has {args.chunks} chunks "
        f"({args.token_ms:g} ms between tokens, answers of {answer} tokens, "
        f"{len(request_body(args.prompt_bytes))}-byte requests); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, mock_process(config) as mock_url:
        workdir = Path(tmp)
        mock_port = int(mock_url.rsplit(":", 1)[1])
        if "floor" not in skip:
            with floor_server(mock_port, probe="/v1/models") as target:
                rows["floor"] = hold(target, args, None)
            print(f"floor: {rows['floor']['per_stream'] / 1024:.2f} KiB/stream", flush=True)
        for name, frames in (("unbroken", 0), ("traced", args.frames)):
            if name in skip:
                continue
            out = workdir / name
            out.mkdir()
            with gateway(
                mock_url, workdir, out, frames, max(args.streams, args.traced_streams)
            ) as target:
                target.name = name
                rows[name] = hold(target, args, out)
                print(f"{name}: {rows[name]['per_stream'] / 1024:.2f} KiB/stream", flush=True)
                if name == "traced":
                    n = args.traced_streams
                    print(f"\n{name}: breakdown of the {n} held streams", flush=True)
                    breakdown(out, n, args.top)
                    if args.keep is not None:
                        shutil.copytree(out, args.keep, dirs_exist_ok=True)
    print(
        f"\n{'target':<9} {'streams':>7} {'RSS before':>10} {'held':>9} {'KiB/stream':>11}"
        "  chunks min/median"
    )
    for name, r in rows.items():
        print(
            f"{name:<9} {r['streams']:>7} {r['rss_before'] / 2**20:>7.1f}MiB "
            f"{r['rss_held'] / 2**20:>6.1f}MiB {r['per_stream'] / 1024:>11.2f}  "
            f"{r['chunks'][0]}/{r['chunks'][1]}"
            + ("  (tracemalloc's own memory included)" if name == "traced" else "")
        )
    ours = rows.get("unbroken")
    if ours is not None and "rss_trimmed" in ours:
        trimmed = (ours["rss_trimmed"] - ours["rss_before"]) / args.streams / 1024
        print(f"  unbroken after malloc_trim(0) while held: {trimmed:.2f} KiB/stream")
    if ours is not None and "floor" in rows:
        ratio = ours["per_stream"] / max(1.0, rows["floor"]["per_stream"])
        print(f"  memory per stream: unbroken / floor = {ratio:.1f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_main(sys.argv[2:])
    else:
        main()
