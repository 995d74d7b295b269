"""The gateway under abusive connections, beside the same app on uvicorn's stock httptools
protocol (what the gateway ran on before its guard), both in front of one mock process.

Loopback only, bounded in count and time. Per target it reports:
  * huge headers: the status a 1 MB header gets and the server's RSS growth after 10 of
    them (a 1 MB header each, sent in turn);
  * slowloris: N connections from 127.0.0.2 that send a partial head and then one header
    byte a second: how many are still open after the head timeout (+1 s) and the longest
    any lived before the server closed it; meanwhile, through the whole attack, a normal
    client on 127.0.0.1 measures its time to first byte (fresh connection, GET /healthz) -
    median and p99 - and the same before the attack.
Run: python bench/abuse.py [--slowloris 2000] [--head-timeout 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from _mockproc import free_port, mock_process

PAGE = os.sysconf("SC_PAGE_SIZE")
GUARDED = (
    "import sys; from unbroken.cli.gateway_cmds import serve; import typer;"
    "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
)
# The same gateway app on uvicorn's own protocol: no head limit, no head timeout.
STOCK = (
    "import sys, uvicorn; from unbroken.gateway.app import create_app;"
    "from unbroken.settings import Settings;"
    "s = Settings.load(); import dataclasses;"
    "s = dataclasses.replace(s, base_url=sys.argv[2]);"
    "uvicorn.run(create_app(s), host='127.0.0.1', port=int(sys.argv[1]), http='httptools',"
    " loop='asyncio', log_level='warning', timeout_keep_alive=30, backlog=4096)"
)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # waiting for another process to listen
    raise RuntimeError("the server did not listen within 30 s")


@contextmanager
def server(kind: str, mock_url: str, head_timeout_s: float) -> Iterator[tuple[int, int]]:
    """Start a target; yield (pid, port)."""
    port = free_port()
    env = {
        **os.environ,
        "DEEPSEEK_API_KEY": "sk-bench",
        "UNBROKEN_GATEWAY_HEAD_TIMEOUT_S": str(head_timeout_s),
        "UNBROKEN_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "10000",
        "UNBROKEN_GATEWAY_MAX_CONNECTIONS": "10000",
    }
    if kind == "guarded":
        args = [GUARDED, "--port", str(port), "--upstream", mock_url, "--log-level", "error"]
    else:
        args = [STOCK, str(port), mock_url]
    proc = subprocess.Popen([sys.executable, "-c", *args], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield proc.pid, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def huge_header(port: int, size: int = 1024 * 1024) -> int:
    """Send one request with a `size`-byte header; the status (0 when none came back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        try:
            for _ in range(size // 65536):
                sock.sendall(b"a" * 65536)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass
        try:
            head = sock.recv(4096)
        except OSError:
            return 0
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def ttfb_samples(port: int, n: int, gap_s: float = 0.02) -> list[float]:
    """Times to first byte of `n` fresh-connection GET /healthz, in milliseconds."""
    samples = []
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = time.perf_counter()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            sock.recv(1)
            samples.append((time.perf_counter() - start) * 1000)
        time.sleep(gap_s)  # pacing the probe, not waiting on the server
    return samples


async def _slowloris(port: int, n: int, hold_s: float) -> tuple[int, float, int]:
    """Open n trickling connections from 127.0.0.2 for at most hold_s; (opened, longest
    lifetime of one closed by the server in seconds, still open at the end)."""
    closed_at: list[float] = []

    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.2", 0)
            )
        except OSError:
            return False
        start = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        async def trickle() -> None:
            while True:
                await asyncio.sleep(1.0)
                writer.write(b"X")
                await writer.drain()

        task = asyncio.ensure_future(trickle())
        try:
            await asyncio.wait_for(reader.read(), hold_s)  # EOF: the server closed it
            closed_at.append(time.monotonic() - start)
        except (TimeoutError, OSError):
            pass
        finally:
            task.cancel()
            writer.close()
        return True

    opened = sum(await asyncio.gather(*(one() for _ in range(n))))
    still_open = opened - len(closed_at)
    return opened, max(closed_at, default=0.0), still_open


def slowloris_process(port: int, n: int, hold_s: float) -> subprocess.Popen[str]:
    code = (
        "import asyncio, sys; sys.path.insert(0, sys.argv[1]); from abuse import _slowloris;"
        "print(*asyncio.run(_slowloris(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.Popen(
        [sys.executable, "-c", code, here, str(port), str(n), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
    )


def run(kind: str, mock_url: str, n: int, head_timeout_s: float) -> dict[str, float]:
    result: dict[str, float] = {}
    with server(kind, mock_url, head_timeout_s) as (pid, port):
        before = ttfb_samples(port, 50)
        rss0 = rss_bytes(pid)
        statuses = [huge_header(port) for _ in range(10)]
        result["huge_status"] = statuses[0]
        result["rss_growth_mb"] = (rss_bytes(pid) - rss0) / 1e6
        hold_s = head_timeout_s + 1.0 + n / 1000
        attack = slowloris_process(port, n, hold_s)
        time.sleep(min(1.0, head_timeout_s / 2))  # let the connections open
        during: list[float] = []
        while attack.poll() is None:  # through the whole attack, the mass close included
            during += ttfb_samples(port, 10)
        out, _ = attack.communicate(timeout=60)
        opened, last_closed, still_open = out.split()
        result.update(
            ttfb_before_p50=statistics.median(before),
            ttfb_p50=statistics.median(during),
            ttfb_p99=sorted(during)[int(len(during) * 0.99) - 1],
            opened=int(opened),
            last_closed_s=float(last_closed),
            still_open=int(still_open),
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slowloris", type=int, default=2000)
    parser.add_argument("--head-timeout", type=float, default=3.0)
    args = parser.parse_args()
    results = {}
    with ExitStack() as stack:
        mock_url = stack.enter_context(mock_process())
        for kind in ("guarded", "stock"):
            results[kind] = run(kind, mock_url, args.slowloris, args.head_timeout)
    g, s = results["guarded"], results["stock"]
    print(f"head timeout {args.head_timeout:g} s, {args.slowloris} slowloris connections")
    print(f"{'':28}{'guarded':>12}{'stock':>12}")
    rows = [
        ("1 MB header: status", "huge_status", "{:.0f}"),
        ("RSS growth, 10 x 1 MB (MB)", "rss_growth_mb", "{:.1f}"),
        ("slowloris opened", "opened", "{:.0f}"),
        ("still open at timeout+1 s", "still_open", "{:.0f}"),
        ("longest lifetime (s)", "last_closed_s", "{:.2f}"),
        ("TTFB p50 idle (ms)", "ttfb_before_p50", "{:.2f}"),
        ("TTFB p50 under attack (ms)", "ttfb_p50", "{:.2f}"),
        ("TTFB p99 under attack (ms)", "ttfb_p99", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:28}{fmt.format(g[key]):>12}{fmt.format(s[key]):>12}")
    ratio = g["ttfb_p50"] / s["ttfb_p50"] if s["ttfb_p50"] else float("nan")
    print(f"TTFB p50 under attack, guarded/stock: {ratio:.2f}")


if __name__ == "__main__":
    main()
