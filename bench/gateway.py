"""The gateway under load, side by side with LiteLLM's proxy and nginx, all on one mock.

Every server runs as its own process on loopback, in front of the same mock DeepSeek
process (200 chunks per stream: the role chunk, 198 tokens 5 ms apart, the usage chunk):
  direct    the mock itself (the baseline for time to first token)
  unbroken  `unbroken serve` (this repository's gateway)
  litellm   LiteLLM's proxy (litellm[proxy]==LITELLM_VERSION, installed into
            bench/.venv-litellm on first use)
  nginx     `proxy_buffering off`: a relay in C (apt-get installs it if missing)
  floor     the floor of a Python relay: uvloop + asyncio.Protocol on both sides, bytes
            passed through as read
  pyrelay   an asyncio streams relay on the default loop, bytes passed through: not the
            floor (streams and the default loop cost several times the floor's CPU)

At concurrency 1, 32, 256 and 1024 (--levels) a separate load process keeps that many streams
in flight (a closed loop; workers start staggered over one stream's duration, so starts are
spread as in steady state), and the script reports per target: time to first token p50/p99 and its
overhead over `direct`, chunks/s, CPU-seconds per 1,000 chunks of the server process (utime +
stime from /proc, children included), and the peak RSS growth per concurrent stream, with the
ratios of unbroken's CPU per chunk to the floor's, nginx's and LiteLLM's.
Each (concurrency, target) is run --repeat times (default 3) and every figure is the median
of those runs. The runs go round by round, every target once per round, so a change in the
shared machine's speed during a level touches every target alike; each round's CPU ratios
(unbroken to the floor, LiteLLM to unbroken) are printed too.

The two gateways are set up alike: both check a Bearer key on every request (unbroken a
gateway key from a config file, LiteLLM its master key), both log at WARNING with no
per-request access log, both run one worker process.

  --soak N     N concurrent slow streams (1 token/s) through the gateway, each checked
               whole against one answer alone; the gateway's RSS reported
  --workers C  `unbroken serve --workers 2` against `--workers 1` at C streams per process
               and the same load on the machine (one worker measured beside a second
               one-worker gateway), all on one Redis store (redis-server on a free port):
               chunks/s, CPU per chunk per process, each worker's cores and share of the
               traffic, Redis' CPU and commands per chunk, the estimate at saturation
  --saturate   `unbroken serve --workers 2` against `--workers 1` at saturation: each
               worker process in a cgroup of its own capped at --cpu-cap cores (0.2), so
               the workers, not the machine, are the limit (needs root and a cgroup v1 `cpu`
               or v2 `cpu.max` controller; else it says so and exits 1); the offered load
               rises by --sat-levels streams per worker, the two gateways alternating at each
               level: chunks/s and the ratio, each worker's cores and throttled share, the
               traffic split, Redis', the mock's and the load process' CPU, the machine's
               idle share (a level leaving it under --idle-margin, 10%, is run again, then
               ends the ramp)

Run: python bench/gateway.py [--levels 1,32,256,1024] [--repeat 3]
                               [--skip litellm,nginx,floor,pyrelay]
     python bench/gateway.py --soak 10000      python bench/gateway.py --workers 128
     python bench/gateway.py --saturate [--cpu-cap 0.2] [--sat-levels 16,24,32,48,64]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from _mockproc import free_port, mock_process

BENCH = Path(__file__).resolve().parent
LITELLM_VENV = BENCH / ".venv-litellm"
# The LiteLLM release measured (the docs cite it); a venv holding another one is rebuilt.
LITELLM_VERSION = "1.106.12"
# The Bearer key each gateway checks on every request.
GATEWAY_KEY = "sk-bench-gateway-key"
CHUNKS = 200
TOKEN_MS = 5.0
MOCK_CONFIG = (
    f"MockConfig(seed=1, answer_tokens=({CHUNKS - 2}, {CHUNKS - 2}), "
    f"latency=Latency(token_ms={TOKEN_MS}))"
)
# Streams per worker at each concurrency: enough samples, bounded time (LiteLLM relays
# about 1,400 chunks/s, so 256 x 200 chunks already take it ~40 s).
ROUNDS = {1: 8, 32: 2, 256: 1, 1024: 1}
# Open files a soak process keeps beyond its streams' sockets (listeners, logs, the store).
SOAK_SPARE_FDS = 512
CLK_TCK = os.sysconf("SC_CLK_TCK")
# One stream as the load process saw it: time to the first chunk, chunks, whether [DONE]
# came, the HTTP status.
Result = tuple[float | None, int, bool, int]
# Refused requests of this load process by status and error code.
REFUSALS: dict[str, int] = {}
PAGE = os.sysconf("SC_PAGE_SIZE")

# -- /proc -------------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, in seconds."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident memory of the process tree."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


class RssSampler:
    """Samples the RSS of a process tree every 50 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the load process ----------------------------------------------------------------------


class _Reader(asyncio.Protocol):
    """One stream as the load process reads it: counts chunk markers as bytes arrive.

    A Protocol rather than asyncio streams: the load process shares the machine's cores
    with the servers it measures, and a stream reader cost ~15 us per chunk at 256 streams
    (more than the floor relay itself), which queued every target behind it.
    """

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.started = 0.0  # set as the request is written
        self.finished = done
        self.first: float | None = None
        self.n = 0
        self.tail = b""
        self.done = False
        self.status = 0
        self.refused = b""  # the head and body of a refusal

    def data_received(self, data: bytes) -> None:
        if not self.status:
            self.status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else -1
        if self.status != 200 and len(self.refused) < 4096:
            self.refused += data
        window = self.tail + data
        if self.first is None and b"data: {" in window:
            self.first = time.perf_counter() - self.started
        # A chunk marker split across reads is counted once: only the joined window is
        # searched, minus what the previous read already counted.
        self.n += window.count(b"data: {") - self.tail.count(b"data: {")
        if b"data: [DONE]" in window:
            self.done = True
        if window.endswith(b"0\r\n\r\n") and self.done:
            self._finish(None)
        self.tail = window[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if not self.finished.done():
            if exc is None:
                self.finished.set_result(None)
            else:
                self.finished.set_exception(exc)


async def _one(
    port: int,
    path: str,
    auth: str,
    index: int,
    results: list[Result],
    reader_class: type[_Reader] = _Reader,
) -> None:
    body = json.dumps(
        {
            "model": "deepseek-chat",
            "stream": True,
            "messages": [{"role": "user", "content": f"benchmark {index % 7}"}],
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {auth}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    transport, reader = await loop.create_connection(
        lambda: reader_class(finished), "127.0.0.1", port
    )
    reader.started = time.perf_counter()
    transport.write(head + body)
    try:
        await finished
    finally:
        transport.close()
    if reader.status != 200:
        found = re.search(rb'"code": ?"([^"]+)"', reader.refused) or re.search(
            rb'"type": ?"([^"]+)"', reader.refused
        )
        reason = f"{reader.status} {found.group(1).decode() if found else reader.refused[:60]!r}"
        REFUSALS[reason] = REFUSALS.get(reason, 0) + 1
    results.append((reader.first, reader.n, reader.done, reader.status))


async def _load(port: int, path: str, auth: str, concurrency: int, rounds: int) -> dict[str, Any]:
    results: list[Result] = []
    stream_s = CHUNKS * TOKEN_MS / 1000.0

    async def worker(w: int) -> None:
        await asyncio.sleep(w * stream_s / concurrency)  # staggered, as in steady state
        for r in range(rounds):
            await _one(port, path, auth, w * rounds + r, results)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    return {"wall": wall, "results": results}


def load_main(argv: list[str]) -> None:
    """Entry of the load process: prints one JSON line. An optional sixth argument, a
    time.time() instant, delays the first stream until then (several load processes that
    must run at once start together, whatever their own start-up took)."""
    port, path, auth, concurrency, rounds = argv[:5]
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with the [gateway] extra
        pass
    if len(argv) > 5:
        time.sleep(max(0.0, float(argv[5]) - time.time()))  # the agreed start
    out = asyncio.run(_load(int(port), path, auth, int(concurrency), int(rounds)))
    print(json.dumps(out))


# -- servers -------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, pid: int, port: int, path: str, auth: str = "sk-bench"):
        self.name = name
        self.pid = pid
        self.port = port
        self.path = path
        self.auth = auth


def _wait_ready(
    url: str, headers: dict[str, str], proc: subprocess.Popen[bytes], limit_s: float
) -> None:
    deadline = time.monotonic() + limit_s
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "warm"}]}
    while True:
        try:
            if url.endswith("/models"):
                response = httpx.get(url, headers=headers, timeout=limit_s)
            else:
                response = httpx.post(url, json=body, headers=headers, timeout=limit_s)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: not ready after {limit_s} s")
        time.sleep(0.2)  # waiting for another process to start


@contextmanager
def unbroken_server(
    mock_url: str,
    workdir: Path,
    *,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    ready_s: float = 30.0,
    log: Path | None = None,
    probe: str = "/v1/chat/completions",
    launcher: list[str] | None = None,
) -> Iterator[Target]:
    """`unbroken serve` in its own process; `launcher` replaces `python -c <code>` (the
    serve command's arguments follow it), e.g. to run it under a profiler."""
    port = free_port()
    config = workdir / "unbroken.toml"
    digest = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
    config.write_text(
        # No per-request access log, as LiteLLM (LITELLM_LOG) and nginx (access_log off):
        # unbroken's line cost ~2% of its CPU at c=32, written to /dev/null here.
        f'[gateway]\naccess_log = false\n\n[[gateway.keys]]\nname = "bench"\nsha256 = "{digest}"\n',
        encoding="utf-8",
    )
    code = (
        "import sys, typer; from unbroken.cli.gateway_cmds import serve; "
        "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
    )
    env = {**os.environ, "DEEPSEEK_API_KEY": "sk-bench", **(extra_env or {})}
    proc = subprocess.Popen(
        [
            *(launcher or [sys.executable, "-c", code]),
            "--config",
            str(config),
            "--port",
            str(port),
            "--upstream",
            mock_url,
            "--log-level",
            "warning",
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if log is None else log.open("ab"),
    )
    try:
        _wait_ready(
            f"http://127.0.0.1:{port}{probe}",
            {"Authorization": f"Bearer {GATEWAY_KEY}"},
            proc,
            ready_s,
        )
        yield Target("unbroken", proc.pid, port, "/v1/chat/completions", GATEWAY_KEY)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            # A gateway that does not drain in time must not outlive the bench.
            print(f"warning: the gateway (pid {proc.pid}) did not exit within 30 s of SIGTERM")
            proc.kill()
            proc.wait()


def _litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def ensure_litellm() -> Path | None:
    """The litellm executable of LITELLM_VERSION in bench/.venv-litellm, installed on first
    use (and reinstalled when the venv holds another version)."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists() and _litellm_version() == LITELLM_VERSION:
        return exe
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into bench/.venv-litellm...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [
                str(LITELLM_VENV / "bin" / "pip"),
                "install",
                "-q",
                f"litellm[proxy]=={LITELLM_VERSION}",
            ],
            check=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"litellm: cannot install ({exc}); its column is skipped")
        return None
    return exe if exe.exists() else None


@contextmanager
def litellm_server(mock_url: str, workdir: Path) -> Iterator[Target | None]:
    exe = ensure_litellm()
    if exe is None:
        yield None
        return
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: deepseek-chat\n    litellm_params:\n"
        f"      model: openai/deepseek-chat\n      api_base: {mock_url}/v1\n"
        "      api_key: sk-bench\n",
        encoding="utf-8",
    )
    env = {
        **os.environ,
        # Offline: no download of the price map at import.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        # A key on every request, as unbroken's gateway key.
        "LITELLM_MASTER_KEY": GATEWAY_KEY,
        # WARNING, as unbroken's --log-level (uvicorn's per-request access log is INFO: off).
        "LITELLM_LOG": "WARNING",
    }
    proc = subprocess.Popen(
        [
            str(exe),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,
    )
    try:
        _wait_ready(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": f"Bearer {GATEWAY_KEY}"},
            proc,
            120,
        )
        yield Target("litellm", proc.pid, port, "/v1/chat/completions", GATEWAY_KEY)
    except RuntimeError as exc:
        print(f"litellm: {exc}; its column is skipped")
        yield None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def ensure_nginx() -> str | None:
    """The nginx binary, installed with apt-get when missing and possible."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("installing nginx with apt-get...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], env=env, check=False)
        return shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
    print("nginx: not installed and apt-get is not usable here; its column is skipped")
    return None


@contextmanager
def nginx_server(mock_port: int, workdir: Path) -> Iterator[Target | None]:
    exe = ensure_nginx()
    if exe is None:
        yield None
        return
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [exe, "-c", str(conf), "-p", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": "Bearer sk"},
            proc,
            20,
        )
        yield Target("nginx", proc.pid, port, "/v1/chat/completions")
    except RuntimeError as exc:
        print(f"nginx: {exc}; its column is skipped")
        yield None
    finally:
        proc.terminate()
        proc.wait(10)


# -- the Python floor ----------------------------------------------------------------------


async def _pyrelay(port: int, mock_port: int) -> None:
    """The least a Python relay can do: asyncio streams, no parsing beyond framing, one
    upstream keep-alive connection per downstream connection, bytes passed through as read.
    Not a product: it shows what any Python gateway pays on this machine."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                lines = head.split(b"\r\n")
                for line in lines[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", mock_port)
                up_reader, up_writer = upstream
                up_writer.write(head + body)
                tail = b""
                while True:
                    data = await up_reader.read(65536)
                    if not data:
                        return
                    writer.write(data)
                    tail = (tail + data)[-7:]
                    if tail.endswith(b"\r\n0\r\n\r\n") or tail == b"0\r\n\r\n":
                        break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    await server.serve_forever()


@contextmanager
def pyrelay_server(mock_port: int) -> Iterator[Target]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--pyrelay", str(port), str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": "Bearer sk"},
            proc,
            20,
        )
        yield Target("pyrelay", proc.pid, port, "/v1/chat/completions")
    finally:
        proc.terminate()
        proc.wait(10)


# -- the floor: uvloop + asyncio.Protocol, bytes passed through ---------------------------


class _UpstreamSide(asyncio.Protocol):
    """The upstream half of one floor connection: every byte read goes straight to the
    downstream transport; the end of a chunked answer readies the pair for the next request."""

    def __init__(self, down: _FloorSide) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        down = self.down.transport
        if down is not None:
            down.write(data)
        self.tail = (self.tail + data)[-7:] if len(data) < 7 else data[-7:]
        if self.tail.endswith(b"0\r\n\r\n"):
            self.tail = b""
            self.down.answer_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.upstream_lost()


class _FloorSide(asyncio.Protocol):
    """The downstream half: frames requests by their Content-Length, one upstream
    keep-alive connection per downstream connection, flow control both ways."""

    def __init__(self, mock_port: int) -> None:
        self.mock_port = mock_port
        self.transport: asyncio.Transport | None = None
        self.upstream: _UpstreamSide | None = None
        self.connecting = False
        self.buffer = b""
        self.pending: list[bytes] = []
        self.connect_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            request, self.buffer = self.buffer[:total], self.buffer[total:]
            self._send(request)

    def _send(self, request: bytes) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(request)
            return
        self.pending.append(request)
        if not self.connecting:
            self.connecting = True
            loop = asyncio.get_running_loop()
            self.connect_task = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, up = await loop.create_connection(
                lambda: _UpstreamSide(self), "127.0.0.1", self.mock_port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = up
        for request in self.pending:
            assert up.transport is not None
            up.transport.write(request)
        self.pending.clear()

    def answer_done(self) -> None:
        """Nothing to do between answers: the next request goes on the same upstream."""

    def upstream_lost(self) -> None:
        self.upstream = None
        self.connecting = False
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def _floor(port: int, mock_port: int) -> None:
    """The floor of a Python relay: uvloop, asyncio.Protocol on both sides, each upstream
    read written downstream as is (no parsing beyond request framing)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FloorSide(mock_port), "127.0.0.1", port)
    await server.serve_forever()


@contextmanager
def floor_server(mock_port: int, probe: str = "/v1/chat/completions") -> Iterator[Target]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--floor", str(port), str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}{probe}", {"Authorization": "Bearer sk"}, proc, 20)
        yield Target("floor", proc.pid, port, "/v1/chat/completions")
    finally:
        proc.terminate()
        proc.wait(10)


# -- measuring -----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(target: Target, concurrency: int, rounds: int) -> dict[str, float]:
    """One load run against one target; figures of the run."""
    # Warm-up: connections, imports, caches.
    subprocess.run(
        _load_args(target, min(concurrency, 8), 1), check=True, capture_output=True, timeout=600
    )
    rss_before = rss_bytes(target.pid)
    cpu_before = cpu_seconds(target.pid)
    with RssSampler(target.pid) as sampler:
        out = subprocess.run(
            _load_args(target, concurrency, rounds),
            check=True,
            capture_output=True,
            timeout=900,
            text=True,
        )
    cpu = cpu_seconds(target.pid) - cpu_before
    data = json.loads(out.stdout)
    results = data["results"]
    ttfts = [r[0] for r in results if r[0] is not None]
    chunks = sum(r[1] for r in results)
    complete = sum(1 for r in results if r[2] and r[1] >= CHUNKS - 1)
    return {
        "streams": len(results),
        "complete": complete,
        "chunks": chunks,
        "wall": data["wall"],
        "rate": chunks / data["wall"],
        "ttft50": pct(ttfts, 0.5) * 1000,
        "ttft99": pct(ttfts, 0.99) * 1000,
        "cpu_per_1k": cpu / chunks * 1000 if chunks else float("nan"),
        "cores": cpu / data["wall"],
        "us_per_chunk": cpu / chunks * 1e6 if chunks else float("nan"),
        "mem_per_stream_kib": max(0, sampler.peak - rss_before) / concurrency / 1024,
    }


def measure_median(target: Target, concurrency: int, repeat: int) -> dict[str, float]:
    """`repeat` load runs against one target; the median of each figure."""
    runs = [measure(target, concurrency, ROUNDS.get(concurrency, 1)) for _ in range(repeat)]
    return _median_run(runs)


def report_rounds(runs: dict[str, list[dict[str, float]]]) -> None:
    """The CPU ratio of unbroken to the floor and of LiteLLM to unbroken within each round
    (the targets of a round run one after another): the median and every round's value."""
    ours = runs.get("unbroken")
    if not ours or len(ours) < 2:
        return
    for name, upper in (("floor", False), ("litellm", True)):
        theirs = runs.get(name)
        if not theirs:
            continue
        pairs = [(o["us_per_chunk"], t["us_per_chunk"]) for o, t in zip(ours, theirs, strict=True)]
        if upper:
            pairs = [(t, o) for o, t in pairs]
        label = f"{name} / unbroken" if upper else f"unbroken / {name}"
        known = [top / bottom for top, bottom in pairs if bottom > 0]
        middle = f"{statistics.median(known):.2f}x" if known else "n/a"
        shown = ", ".join(cpu_ratio(top, bottom, 2) for top, bottom in pairs)
        print(f"  per round, {label}: median {middle} (rounds: {shown})")


def report(concurrency: int, rows: dict[str, dict[str, float]], repeat: int) -> None:
    rounds = ROUNDS.get(concurrency, 1)
    print(
        f"\nconcurrency {concurrency}: {concurrency * rounds} streams x {CHUNKS} chunks, "
        f"{TOKEN_MS:g} ms between tokens; medians of {repeat} runs; "
        f"load average {_load_average()}"
    )
    print(
        f"{'target':<9} {'ok':>9} {'ttft p50':>9} {'p99':>8} {'overhead p50':>13} {'p99':>8} "
        f"{'chunks/s':>9} {'cpu s/1k':>9} {'us/chunk':>9} {'KiB/stream':>11}"
    )
    base = rows.get("direct")
    for name, r in rows.items():
        over50 = r["ttft50"] - base["ttft50"] if base and name != "direct" else 0.0
        over99 = r["ttft99"] - base["ttft99"] if base and name != "direct" else 0.0
        cpu = f"{r['cpu_per_1k']:.4f}" if name != "direct" else "(mock)"
        us = f"{r['us_per_chunk']:.1f}" if name != "direct" else "-"
        mem = f"{r['mem_per_stream_kib']:.1f}" if name != "direct" else "-"
        print(
            f"{name:<9} {int(r['complete']):>4}/{int(r['streams']):<4} {r['ttft50']:>7.2f}ms "
            f"{r['ttft99']:>6.2f}ms {over50:>11.2f}ms {over99:>6.2f}ms {r['rate']:>9.0f} "
            f"{cpu:>9} {us:>9} {mem:>11}"
        )
    ours, floor = rows.get("unbroken"), rows.get("floor")
    for name in ("floor", "nginx", "pyrelay"):
        peer = rows.get(name)
        if ours and peer:
            ratio = cpu_ratio(ours["us_per_chunk"], peer["us_per_chunk"], 2)
            print(f"  CPU per chunk: unbroken / {name} = {ratio}")
    theirs = rows.get("litellm")
    if ours and theirs:
        ratio = cpu_ratio(theirs["us_per_chunk"], ours["us_per_chunk"], 1)
        print(f"  CPU per chunk: litellm / unbroken = {ratio}")
    if floor and rows.get("nginx"):
        ratio = cpu_ratio(floor["us_per_chunk"], rows["nginx"]["us_per_chunk"], 2)
        print(f"  CPU per chunk: floor / nginx = {ratio}")


def cpu_ratio(top: float, bottom: float, digits: int) -> str:
    """`top / bottom` as "1.23x"; "n/a" when `bottom` is 0: /proc counts CPU in ticks
    (10 ms), and a short run of a cheap server can use less than one."""
    return f"{top / bottom:.{digits}f}x" if bottom > 0 else "n/a"


def summarize(summary: dict[int, dict[str, dict[str, float]]]) -> None:
    """unbroken at every level on one line each: CPU per chunk and its ratios, TTFT
    overhead, memory per concurrent stream."""
    print(
        f"\nunbroken by level: {'us/chunk':>8} {'/floor':>7} {'/nginx':>7} {'litellm/':>9} "
        f"{'TTFT overhead p50':>18} {'p99':>9} {'KiB/stream':>11}"
    )
    for level, rows in summary.items():
        ours, base = rows.get("unbroken"), rows.get("direct")
        if ours is None or base is None:
            continue
        us = ours["us_per_chunk"]
        ratios = {
            name: (cpu_ratio(us, rows[name]["us_per_chunk"], 2) if name in rows else "-")
            for name in ("floor", "nginx")
        }
        lite = cpu_ratio(rows["litellm"]["us_per_chunk"], us, 1) if "litellm" in rows else "-"
        print(
            f"  concurrency {level:<5} {us:>8.1f} {ratios['floor']:>7} {ratios['nginx']:>7} "
            f"{lite:>9} "
            f"{ours['ttft50'] - base['ttft50']:>16.2f}ms "
            f"{ours['ttft99'] - base['ttft99']:>7.2f}ms {ours['mem_per_stream_kib']:>11.1f}"
        )


def _load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


# -- soak: many slow streams at once ---------------------------------------------------------


async def _soak_load(
    port: int, path: str, auth: str, n: int, ramp_s: float, limit_s: float
) -> dict[str, Any]:
    results: list[Result] = []
    failures: dict[str, int] = {}
    open_now = 0
    peak = 0

    async def one(i: int) -> None:
        nonlocal open_now, peak
        await asyncio.sleep(i * ramp_s / n)  # spread the opening over ramp_s
        open_now += 1
        peak = max(peak, open_now)
        try:
            await _one(port, path, auth, i, results)
        except (OSError, asyncio.IncompleteReadError) as exc:
            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
        finally:
            open_now -= 1

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), limit_s)
    except TimeoutError:
        failures["timeout"] = n - len(results) - sum(failures.values())
    return {
        "wall": time.perf_counter() - started,
        "results": results,
        "failures": failures,
        "peak_open": peak,
        "refusals": REFUSALS,
    }


def soak_main(argv: list[str]) -> None:
    """Entry of the soak's load process: prints one JSON line."""
    port, path, auth, n, ramp_s, limit_s = argv
    import uvloop

    out = uvloop.run(_soak_load(int(port), path, auth, int(n), float(ramp_s), float(limit_s)))
    print(json.dumps(out))


def raise_open_files() -> int:
    """The open-files soft limit raised to the hard one (the children inherit it); returns
    the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def soak_workers(streams: int, open_files: int) -> int:
    """Gateway processes needed to hold `streams` relayed streams: each holds two sockets
    (the client's and the upstream's) and the open-files limit is per process."""
    return max(1, math.ceil((2 * streams + SOAK_SPARE_FDS) / open_files))


def soak(streams: int, tokens: int, ramp_s: float, workers: int) -> None:
    """`streams` concurrent streams of `tokens` tokens 1 s apart through the gateway; each
    checked whole (as many chunks as one answer alone gets, and [DONE]); RSS reported."""
    open_files = raise_open_files()
    if streams + SOAK_SPARE_FDS > open_files:
        raise SystemExit(
            f"soak: {streams} streams need {streams + SOAK_SPARE_FDS} open files in the load "
            f"process and the mock, the hard limit is {open_files} (ulimit -Hn)"
        )
    workers = workers or soak_workers(streams, open_files)
    config = (
        f"MockConfig(seed=1, answer_tokens=({tokens}, {tokens}), latency=Latency(token_ms=1000.0))"
    )
    # Every stream comes from 127.0.0.1: the per-client cap must let them all in.
    env = {
        "UNBROKEN_GATEWAY_MAX_CONNECTIONS": str(streams + 64),
        "UNBROKEN_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": str(streams + 64),
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        mock_url = stack.enter_context(mock_process(config))
        if workers > 1:
            # Several processes share limits, sessions and stream logs through Redis.
            redis_url, redis_pid = stack.enter_context(redis_process())
            env |= {"UNBROKEN_GATEWAY_STORE": redis_url, "UNBROKEN_GATEWAY_SESSIONS": redis_url}
        log = tmp / "gateway.log"
        # Ready when it lists the models (a chat answer would take `tokens` seconds).
        target = stack.enter_context(
            unbroken_server(
                mock_url, tmp, workers=workers, extra_env=env, log=log, probe="/v1/models"
            )
        )
        # Whole: as many chunks as one answer alone through the gateway, and [DONE]; that
        # answer runs in a thread beside the soak.
        reference: list[Result] = []
        alone = threading.Thread(
            target=lambda: asyncio.run(_one(target.port, target.path, target.auth, 0, reference))
        )
        alone.start()
        rss_before = rss_bytes(target.pid)
        cpu_before = cpu_seconds(target.pid)
        # Generous: on a machine short of cores the gateway queues the openings; what the
        # soak checks is that every stream ends whole, however late.
        limit_s = ramp_s + tokens + 600.0
        store = "a Redis store" if workers > 1 else "the memory store"
        print(
            f"soak: {streams} streams of {tokens} tokens at 1 token/s, opened over {ramp_s:g} s, "
            f"bounded at {limit_s:g} s; gateway "
            f"--workers {workers} on {store} (open-files limit {open_files} per process); "
            f"load average {_load_average()}",
            flush=True,
        )
        with RssSampler(target.pid) as sampler:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--soak-client",
                    str(target.port),
                    target.path,
                    target.auth,
                    str(streams),
                    str(ramp_s),
                    str(limit_s),
                ],
                capture_output=True,
                timeout=limit_s + 60,
                text=True,
                check=True,
            )
        cpu = cpu_seconds(target.pid) - cpu_before
        alone.join()
        expected = reference[0][1]
        data = json.loads(out.stdout)
        results = data["results"]
        whole = sum(1 for r in results if r[2] and r[1] == expected)
        chunks = sum(r[1] for r in results)
        ttfts = [r[0] for r in results if r[0] is not None]
        growth = max(0, sampler.peak - rss_before)
        counts: dict[str, int] = {}
        for r in results:
            key = f"{r[1]} chunks{'' if r[2] else ' no [DONE]'}, status {r[3]}"
            counts[key] = counts.get(key, 0) + 1
        print(
            f"soak: {whole}/{streams} whole ({expected} chunks and [DONE], as one answer alone), "
            f"{len(results) - whole} cut or short, failures "
            f"{data['failures'] or 'none'}; {data['peak_open']} open at once at the peak; "
            f"wall {data['wall']:.1f} s; TTFT p50 {pct(ttfts, 0.5) * 1000:.1f} ms p99 "
            f"{pct(ttfts, 0.99) * 1000:.1f} ms"
        )
        print(
            f"soak: gateway RSS {rss_before / 2**20:.0f} MiB before, "
            f"{sampler.peak / 2**20:.0f} MiB at the peak, {growth / streams / 1024:.1f} KiB "
            f"per stream; load average {_load_average()}"
        )
        print(
            f"soak: gateway CPU {cpu:.1f} s, {cpu / streams * 1000:.2f} ms per stream, "
            f"{cpu / max(1, chunks) * 1e6:.0f} us per relayed chunk (request handling included)"
        )
        print(f"soak: streams by what they got: {counts}; refusals {data['refusals'] or 'none'}")
        if workers > 1:
            import redis

            with redis.Redis.from_url(redis_url) as client:
                stats = client.info("stats")
                commands = client.info("commandstats")
            print(
                f"soak: Redis {stats['total_connections_received']} connections received "
                f"({stats['rejected_connections']} rejected), "
                f"{stats['total_commands_processed']} commands, "
                f"{cpu_seconds(redis_pid):.1f} s of CPU"
            )
            top = sorted(commands.items(), key=lambda kv: -int(kv[1]["calls"]))[:10]
            print(
                "soak: Redis calls per stream: "
                + ", ".join(
                    f"{name.removeprefix('cmdstat_')} {int(c['calls']) / streams:.1f}"
                    for name, c in top
                )
            )
        warnings: dict[str, int] = {}
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if "WARNING" in line or "ERROR" in line:
                # Stream ids and counts vary: group the lines by their words.
                key = re.sub(r"strm_\w+|\d+(\.\d+)?", "#", line.split(" ", 2)[-1])[:140]
                warnings[key] = warnings.get(key, 0) + 1
        for key, count in sorted(warnings.items(), key=lambda kv: -kv[1])[:8]:
            print(f"soak: gateway log x{count}: {key}")


# -- workers: one process against two --------------------------------------------------------


@contextmanager
def redis_process() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port (no persistence): its URL and pid."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed; --workers needs it")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)  # waiting for redis-server to listen
            yield f"redis://127.0.0.1:{port}/0", proc.pid
        finally:
            proc.terminate()
            proc.wait(10)


def _redis_call(port: int, *args: str) -> bytes:
    """One command to the bench's redis-server over RESP; the raw reply (bulk or status)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        reply = b""
        while True:
            reply += sock.recv(65536)
            if reply[:1] in (b"+", b"-") and reply.endswith(b"\r\n"):
                return reply
            if reply[:1] == b"$" and b"\r\n" in reply:
                size = int(reply[1 : reply.index(b"\r\n")])
                if len(reply) >= reply.index(b"\r\n") + 2 + size + 2:
                    return reply


def _redis_commands(port: int) -> dict[str, int]:
    """Calls per Redis command since the last CONFIG RESETSTAT."""
    text = _redis_call(port, "INFO", "commandstats").decode(errors="replace")
    return {
        found.group(1): int(found.group(2))
        for found in re.finditer(r"cmdstat_([\w|]+):calls=(\d+)", text)
    }


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` holds open."""
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        with suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def _established_on(port: int) -> set[str]:
    """Inodes of the established TCP connections whose local port is `port`."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table, encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(fields[9])
    return found


class WorkerWatch:
    """Around one load run: the CPU (utime + stime from /proc) of a gateway's process tree
    and of each worker, and, sampled every 250 ms in a thread, how many of the gateway's
    client connections each worker holds, i.e. how the kernel's SO_REUSEPORT hashing spread
    the streams."""

    def __init__(self, supervisor: int, port: int) -> None:
        self.supervisor = supervisor
        self.port = port
        self.pids = [p for p in _tree(supervisor) if p != supervisor] or [supervisor]
        self.cpu = dict.fromkeys(self.pids, 0.0)
        self.total = 0.0
        self.held = dict.fromkeys(self.pids, 0)
        self.written = dict.fromkeys(self.pids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0
        self.wall = 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            live = _established_on(self.port)
            if not live:
                continue
            self.samples += 1
            for pid in self.pids:
                self.held[pid] += len(_socket_inodes(pid) & live)

    def __enter__(self) -> WorkerWatch:
        self.cpu = {pid: -cpu_seconds(pid) for pid in self.pids}
        self.written = {pid: -_bytes_written(pid) for pid in self.pids}
        self.total = -cpu_seconds(self.supervisor)
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self._started
        for pid in self.pids:
            self.cpu[pid] += cpu_seconds(pid)
            self.written[pid] += _bytes_written(pid)
        self.total += cpu_seconds(self.supervisor)

    def cores(self, wall: float) -> list[float]:
        """Cores each worker used over `wall` seconds of load (1.00: a full core, i.e.
        saturated)."""
        return [self.cpu[pid] / wall for pid in self.pids]

    def shares(self) -> list[float]:
        """Each worker's share of the bytes the workers wrote (nearly all of it the streams'
        chunks to their clients): how the relayed traffic was spread."""
        total = sum(self.written.values()) or 1
        return [self.written[pid] / total for pid in self.pids]

    def connections(self) -> list[float]:
        """Client connections each worker held, averaged over the samples."""
        return [self.held[pid] / max(1, self.samples) for pid in self.pids]


def _bytes_written(pid: int) -> int:
    """Bytes process `pid` has written (to sockets and files), from /proc/<pid>/io."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _load_args(target: Target, concurrency: int, rounds: int) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--client",
        str(target.port),
        target.path,
        target.auth,
        str(concurrency),
        str(rounds),
    ]


def _parallel_run(
    loads: list[Target],
    gateways: list[Target],
    concurrency: int,
    redis_port: int,
    redis_pid: int,
) -> dict[str, Any]:
    """One load process of `concurrency` streams per entry of `loads`, all at once, through
    `gateways` (the processes charged): delivered chunks/s, the gateways' CPU per chunk per
    process, each worker's cores and connections, Redis' CPU and calls per chunk."""
    rounds = ROUNDS.get(concurrency, 1)
    for target in {t.port: t for t in loads}.values():  # warm-up: connections, imports
        subprocess.run(
            _load_args(target, min(concurrency, 8), 1), check=True, capture_output=True, timeout=600
        )
    watches = [WorkerWatch(g.pid, g.port) for g in gateways]
    redis_before = cpu_seconds(redis_pid)
    _redis_call(redis_port, "CONFIG", "RESETSTAT")
    with ExitStack() as stack:
        for watch in watches:
            stack.enter_context(watch)
        # Every load process starts its streams at one instant, 1 s from now (a Python
        # process starts in ~0.3 s; staggered starts would leave the machine less loaded).
        start = str(time.time() + 1.0)
        procs = [
            subprocess.Popen(
                [*_load_args(t, concurrency, rounds), start], stdout=subprocess.PIPE, text=True
            )
            for t in loads
        ]
        outs = [json.loads(proc.communicate(timeout=900)[0]) for proc in procs]
    calls = _redis_commands(redis_port)
    results = [r for out in outs for r in out["results"]]
    chunks = sum(r[1] for r in results)
    ttfts = [r[0] for r in results if r[0] is not None]
    processes = sum(len(w.pids) for w in watches)
    run: dict[str, Any] = {
        "streams": len(results),
        "complete": sum(1 for r in results if r[2] and r[1] >= CHUNKS - 1),
        "rate": sum(sum(r[1] for r in out["results"]) / out["wall"] for out in outs),
        "ttft50": pct(ttfts, 0.5) * 1000,
        "processes": processes,
        "us_per_chunk": sum(w.total for w in watches) / chunks * 1e6,
        # Over the load's own wall time (its start-up, before the first stream, excluded).
        "cores": [c for w in watches for c in w.cores(max(out["wall"] for out in outs))],
        "connections": [c for w in watches for c in w.connections()],
        # How a gateway of several workers spread the traffic over them.
        "shares": [c for w in watches if len(w.pids) > 1 for c in w.shares()],
        "redis_us": (cpu_seconds(redis_pid) - redis_before) / chunks * 1e6,
        "redis_calls": sum(calls.values()) / chunks,
        "redis_top": {name: count / chunks for name, count in calls.items()},
    }
    return run


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure of `runs` (element-wise for lists, per key for dicts)."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, list):
            out[key] = [statistics.median(r[key][i] for r in runs) for i in range(len(first))]
        elif isinstance(first, dict):
            names = set().union(*(r[key] for r in runs))
            out[key] = {n: statistics.median(r[key].get(n, 0.0) for r in runs) for n in names}
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def compare_workers(per_process: int, repeat: int) -> None:
    """`unbroken serve --workers 2` against `--workers 1` at equal load per process and on
    an equally loaded machine, every gateway on one Redis store (the state workers share).

    A gateway process's CPU per chunk depends on how many streams it relays (more streams,
    more work per turn of its event loop) and on how busy the machine is (on a busier machine
    more chunks wait per read, per write and per Redis append, and each costs less). So:
      1 worker   two `--workers 1` gateways on two ports, each relaying `per_process` streams
                 from its own load process, at once: the per-process figures of one worker
      2 workers  one `--workers 2` gateway relaying 2 x `per_process` streams from two load
                 processes at once, the kernel spreading them over its workers
    Both carry the same streams through the same mock, load processes and Redis; what
    differs is what a second worker behind the same port costs. Their runs alternate, so a
    change in the machine's other load hits both alike. Chunks/s at saturation cannot be
    measured on a machine with fewer free cores than the workers plus the mock, the load
    processes and Redis (two cores here): so each row shows the CPU per chunk per process,
    the cores each worker used (1.00 = a full core: saturated) and the connections each
    held; the estimate at saturation is processes / CPU per chunk. One worker alone (no
    second gateway beside it) at `per_process` and at twice that many streams is shown too:
    the comparisons an earlier version of this bench made."""
    both = 2 * per_process
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock_process(MOCK_CONFIG) as mock_url,
        redis_process() as (redis_url, redis_pid),
        ExitStack() as stack,
    ):
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        mock_port = int(mock_url.rsplit(":", 1)[1])
        env = {"UNBROKEN_GATEWAY_STORE": redis_url, "UNBROKEN_GATEWAY_SESSIONS": redis_url}
        direct = Target("direct", 0, mock_port, "/v1/chat/completions")
        mock_rates = {c: measure_median(direct, c, repeat)["rate"] for c in (per_process, both)}
        gateways = []
        for name, n, store in (("a", 1, env), ("b", 1, env), ("two", 2, env), ("memory", 1, {})):
            workdir = Path(tmp) / name
            workdir.mkdir()
            gateways.append(
                stack.enter_context(unbroken_server(mock_url, workdir, workers=n, extra_env=store))
            )
        one_a, one_b, two, memory = gateways
        setups = {
            f"1 worker x {per_process}, beside another": (
                [one_a, one_b],
                [one_a, one_b],
                per_process,
            ),
            f"2 workers x {per_process}": ([two, two], [two], per_process),
            f"1 worker x {per_process}, alone": ([one_a], [one_a], per_process),
            f"1 worker x {both}, alone": ([one_a], [one_a], both),
            f"1 worker x {per_process}, alone, memory store": ([memory], [memory], per_process),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
        for _ in range(repeat):
            for name, (loads, charged, streams) in setups.items():
                runs[name].append(_parallel_run(loads, charged, streams, redis_port, redis_pid))
        rows = {name: _median_run(done) for name, done in runs.items()}
        print(
            f"\nworkers at {per_process} streams per process (Redis store), medians of "
            f"{repeat} runs, alternating: {os.cpu_count()} CPUs shared by the mock, the load "
            f"processes, Redis and the gateways; load average {_load_average()}"
        )
        print(
            f"  mock alone: {mock_rates[per_process]:.0f} chunks/s at {per_process} streams, "
            f"{mock_rates[both]:.0f} at {both} (what the machine offers)"
        )
        for name, r in rows.items():
            top = sorted(r["redis_top"].items(), key=lambda kv: -kv[1])[:4]
            per = r["rate"] / r["processes"]
            split = (
                f", bytes written {' / '.join(f'{c:.0%}' for c in r['shares'])}"
                if r["shares"]
                else ""
            )
            print(
                f"  {name}: {int(r['complete'])}/{int(r['streams'])} whole, "
                f"{r['rate']:.0f} chunks/s in all, {per:.0f} per process, TTFT p50 "
                f"{r['ttft50']:.1f} ms"
            )
            print(
                f"      gateway {r['us_per_chunk']:.1f} us CPU per chunk per process; cores per "
                f"worker {' / '.join(f'{c:.2f}' for c in r['cores'])}; connections per worker "
                f"{' / '.join(f'{c:.0f}' for c in r['connections'])}{split}; estimate at "
                f"saturation {1e6 / r['us_per_chunk']:.0f} chunks/s per process"
            )
            print(
                f"      Redis {r['redis_us']:.1f} us CPU and {r['redis_calls']:.2f} calls per "
                f"chunk ({', '.join(f'{k} {v:.2f}' for k, v in top)})"
            )
        one_name, pair_name = (
            f"1 worker x {per_process}, beside another",
            f"2 workers x {per_process}",
        )
        one, pair = rows[one_name], rows[pair_name]
        # Each repetition's two runs follow each other: their ratio is the one least moved by
        # the machine's other load drifting over the whole bench.
        paired = sorted(
            2 * a["us_per_chunk"] / b["us_per_chunk"]
            for a, b in zip(runs[one_name], runs[pair_name], strict=True)
        )
        print(
            f"  2 workers against 1 worker, {per_process} streams per process, same machine load:"
        )
        print(
            f"    chunks/s measured: {pair['rate'] / (one['rate'] / 2):.2f}x "
            f"(neither saturated: see the cores per worker)"
        )
        print(
            f"    estimate at saturation (2 / CPU per chunk against 1 / CPU per chunk): "
            f"{2 * one['us_per_chunk'] / pair['us_per_chunk']:.2f}x; what the second worker "
            f"adds per chunk: gateway {pair['us_per_chunk'] - one['us_per_chunk']:+.1f} us, "
            f"Redis {pair['redis_us'] - one['redis_us']:+.1f} us, "
            f"{pair['redis_calls'] - one['redis_calls']:+.2f} Redis calls"
        )
        print(
            f"    the same estimate from each repetition's adjacent runs: median "
            f"{statistics.median(paired):.2f}x, range {paired[0]:.2f}x to {paired[-1]:.2f}x"
        )
        for name in (
            f"1 worker x {per_process}, alone",
            f"1 worker x {both}, alone",
            f"1 worker x {per_process}, alone, memory store",
        ):
            alone = rows[name]
            print(
                f"  2 workers x {per_process} against {name}: measured "
                f"{pair['rate'] / alone['rate']:.2f}x, estimate "
                f"{2 * alone['us_per_chunk'] / pair['us_per_chunk']:.2f}x"
            )


# -- saturation: each worker under a CPU cap ---------------------------------------------------

# A step's chunks/s must beat the best earlier step's by this share to count as growth.
SATURATION_GAIN = 0.05
# The scheduling period of the CPU caps: short, so a capped worker runs in slices of a few
# milliseconds rather than in one 30 ms burst and 70 ms of nothing per 100 ms.
CAP_PERIOD_US = 20_000
# Seconds of each saturation step before its window (the staggered starts settle), and of it.
SAT_WARM_S = 2.0
SAT_WINDOW_S = 5.0
# Times a level is run again when it left the machine less idle than the margin (other
# processes on the machine may have been busy for a while).
SAT_RETRIES = 2


class CpuCapError(RuntimeError):
    """A process's CPU cannot be capped here: no cgroup CPU controller, or not writable."""


def cpu_cgroup_root(mounts: str, own: str, controllers: str | None) -> tuple[Path, int]:
    """Where to make CPU cgroups, and the cgroup version, from /proc/self/mounts (`mounts`),
    /proc/self/cgroup (`own`) and the cgroup2 mount's cgroup.controllers (`controllers`,
    None if unreadable): a cgroup v1 `cpu` hierarchy if mounted, else a cgroup v2 one whose
    controllers include cpu. The directory is this process's own cgroup in that hierarchy, so
    the caps nest under whatever limits the bench itself runs with.

    Raises:
        CpuCapError: neither hierarchy is there.
    """
    v2_mount: str | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            path = next(
                (
                    p
                    for _, names, p in (
                        e.split(":", 2) for e in own.splitlines() if e.count(":") >= 2
                    )
                    if "cpu" in names.split(",")
                ),
                "/",
            )
            return Path(fields[1]) / path.lstrip("/"), 1
        if fields[2] == "cgroup2" and v2_mount is None:
            v2_mount = fields[1]
    if v2_mount is not None and controllers is not None and "cpu" in controllers.split():
        path = next((e[3:] for e in own.splitlines() if e.startswith("0::")), "/")
        return Path(v2_mount) / path.lstrip("/"), 2
    raise CpuCapError(
        "no cgroup CPU controller: neither a cgroup v1 'cpu' hierarchy nor a cgroup v2 "
        "hierarchy with the cpu controller is mounted"
    )


def cap_files(version: int, cores: float, period_us: int = CAP_PERIOD_US) -> dict[str, str]:
    """The files that cap a cgroup at `cores` of CPU, and what to write in them, in order.

    Raises:
        ValueError: `cores` not positive or the quota below the kernel's 1 ms minimum.
    """
    quota = round(cores * period_us)
    if not cores > 0 or quota < 1000:
        raise ValueError(f"a CPU cap of {cores} core is below 1 ms per {period_us} us period")
    if version == 1:
        return {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota)}
    return {"cpu.max": f"{quota} {period_us}"}


class CpuCap:
    """One cgroup capping every process put in it at `cores` of CPU together: made on
    entry, its processes moved back to the parent cgroup and the cgroup removed on exit
    (also on an error or Ctrl-C)."""

    def __init__(self, name: str, cores: float) -> None:
        def read(path: str) -> str | None:
            try:
                return Path(path).read_text(encoding="ascii")
            except OSError:
                return None

        mounts, own = read("/proc/self/mounts") or "", read("/proc/self/cgroup") or ""
        v2 = next(
            (ln.split()[1] for ln in mounts.splitlines() if ln.split()[2:3] == ["cgroup2"]), ""
        )
        self.parent, self.version = cpu_cgroup_root(
            mounts, own, read(f"{v2}/cgroup.controllers") if v2 else None
        )
        self.files = cap_files(self.version, cores)
        self.cores = cores
        self.path = self.parent / f"unbroken-bench-{os.getpid()}-{name}"
        self.pids: list[int] = []

    def __enter__(self) -> CpuCap:
        try:
            if self.version == 2:
                control = self.parent / "cgroup.subtree_control"
                if "cpu" not in control.read_text(encoding="ascii").split():
                    control.write_text("+cpu", encoding="ascii")
            self.path.mkdir()
        except OSError as e:
            raise CpuCapError(f"cannot make a CPU cgroup at {self.path}: {e}") from e
        try:
            for file, value in self.files.items():
                (self.path / file).write_text(value, encoding="ascii")
        except OSError as e:
            self.path.rmdir()
            raise CpuCapError(f"cannot cap the CPU of {self.path}: {e}") from e
        return self

    def add(self, pid: int) -> None:
        """Put process `pid` (all its threads) in the cgroup."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid), encoding="ascii")
        except OSError as e:
            raise CpuCapError(f"cannot put process {pid} in {self.path}: {e}") from e
        self.pids.append(pid)

    def throttled(self) -> tuple[int, int]:
        """Scheduling periods so far, and those in which the cap stopped the cgroup."""
        stat = dict(
            line.split()
            for line in (self.path / "cpu.stat").read_text(encoding="ascii").splitlines()
            if len(line.split()) == 2
        )
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def __exit__(self, *exc: object) -> None:
        # A cgroup with processes in it cannot be removed: move them back first.
        with suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text(encoding="ascii").split():
                with suppress(OSError):
                    (self.parent / "cgroup.procs").write_text(pid, encoding="ascii")
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)  # a process moved out a moment ago is still counted
        print(f"warning: could not remove the cgroup {self.path}", file=sys.stderr)


def saturated(rates: list[float], gain: float = SATURATION_GAIN) -> bool:
    """Whether a ramp's chunks/s stopped growing: its last two steps did not beat the best
    step before them by `gain` (two, so that one noisy step does not end the ramp)."""
    if len(rates) < 3:
        return False
    before = max(rates[:-2])
    return max(rates[-2:]) < before * (1 + gain)


def _machine_times() -> tuple[float, float]:
    """The machine's (idle + iowait, total) CPU time from /proc/stat, in ticks."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # guest time is already in user


def _sat_load(port: int, path: str, auth: str, concurrency: int, start: float) -> dict[str, Any]:
    """Closed loop of `concurrency` streams from `start` (time.time()) on: the chunks read in
    the window SAT_WARM_S to SAT_WARM_S + SAT_WINDOW_S after it; no stream starts after the
    window, those open run to their end."""
    seen = [0]

    class Counting(_Reader):
        def data_received(self, data: bytes) -> None:
            before = self.n
            super().data_received(data)
            seen[0] += self.n - before

    async def stream(index: int, results: list[Result]) -> None:
        await _one(port, path, auth, index, results, Counting)

    async def run() -> dict[str, Any]:
        results: list[Result] = []
        over = asyncio.Event()
        stream_s = CHUNKS * TOKEN_MS / 1000.0

        async def worker(w: int) -> None:
            await asyncio.sleep(w * stream_s / concurrency)  # staggered, as in steady state
            r = 0
            while not over.is_set():
                await stream(w * 1000 + r, results)
                r += 1

        await asyncio.sleep(max(0.0, start - time.time()))  # the agreed start
        tasks = [asyncio.ensure_future(worker(w)) for w in range(concurrency)]
        await asyncio.sleep(max(0.0, start + SAT_WARM_S - time.time()))
        first, t0 = seen[0], time.perf_counter()
        await asyncio.sleep(SAT_WINDOW_S)
        chunks, wall = seen[0] - first, time.perf_counter() - t0
        # The streams open at the window's end run to their end (cut, they would only add
        # the cancel path's work to the next step's and noise to the mock's log).
        over.set()
        _, pending = await asyncio.wait(tasks, timeout=120)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ttfts = [r[0] for r in results if r[0] is not None]
        return {
            "rate": chunks / wall,
            "streams": len(results),
            "whole": sum(1 for r in results if r[2] and r[1] >= CHUNKS - 1),
            "ttft50": pct(ttfts, 0.5) * 1000,
            "refused": dict(REFUSALS),
            # Streams that ended short: (chunks, [DONE] seen, status), a few.
            "short": [r[1:] for r in results if not (r[2] and r[1] >= CHUNKS - 1)][:5],
        }

    return asyncio.run(run())


def sat_client_main(argv: list[str]) -> None:
    """Entry of a saturation load process: prints one JSON line."""
    port, path, auth, concurrency, start = argv[:5]
    import uvloop

    uvloop.install()
    print(json.dumps(_sat_load(int(port), path, auth, int(concurrency), float(start))))


def read_json_when_written(path: Path, limit_s: float, what: str) -> Any:
    """The JSON a server process writes to `path` from a signal handler, once it is there
    (it writes it whole, by a rename); `what` names it in the error after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not written in {limit_s} s")
        time.sleep(0.05)  # the process writes it from its signal handler
    return json.loads(path.read_text(encoding="utf-8"))


def _mock_pid() -> int:
    """The mock process this bench started (its CPU is reported beside Redis')."""
    for pid in _tree(os.getpid()):
        with suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"from unbroken.mock import" in f.read():
                return pid
    return 0


def _sat_step(
    gateway: Target, caps: list[CpuCap], concurrency: int, others: dict[str, int]
) -> dict[str, Any]:
    """One step of offered load against a capped gateway: chunks/s in the load's window,
    each worker's cores and throttled share and traffic share, the CPU of `others` (name ->
    pid), the machine's idle share."""
    start = time.time() + 1.0  # a Python process starts in ~0.3 s
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--sat-client",
            str(gateway.port),
            gateway.path,
            gateway.auth,
            str(concurrency),
            str(start),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(max(0.0, start + SAT_WARM_S - time.time()))  # to the load's window
        watch = WorkerWatch(gateway.pid, gateway.port)
        if sorted(watch.pids) != sorted(p for cap in caps for p in cap.pids):
            raise RuntimeError(
                f"the gateway's workers changed ({watch.pids}, capped {[c.pids for c in caps]})"
            )
        idle0, total0 = _machine_times()
        others = {**others, "load": proc.pid}
        other0 = {name: cpu_seconds(pid) for name, pid in others.items()}
        periods0 = [cap.throttled() for cap in caps]
        with watch:
            time.sleep(SAT_WINDOW_S)  # the load's window
        idle1, total1 = _machine_times()
        periods1 = [cap.throttled() for cap in caps]
        other1 = {name: cpu_seconds(pid) for name, pid in others.items()}
        out = json.loads(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_pid = dict(zip(watch.pids, watch.cores(watch.wall), strict=True))
    return {
        **out,
        "concurrency": concurrency,
        "cores": [by_pid[p] for cap in caps for p in cap.pids],
        "throttled": [
            (b[1] - a[1]) / max(1, b[0] - a[0]) for a, b in zip(periods0, periods1, strict=True)
        ],
        "shares": watch.shares() if len(watch.pids) > 1 else [],
        "others": {n: (other1[n] - other0[n]) / watch.wall for n in others},
        "idle": (idle1 - idle0) / max(1.0, total1 - total0),
    }


def saturation_level(held: list[list[bool]]) -> int | None:
    """The level to report as saturation, from each run's levels (`held[run][level]`: every
    worker ran at its cap and the machine kept its idle margin; a run that ended early has
    fewer): the highest level held in at least half of the runs; None if none is."""
    found = None
    for i in range(max((len(run) for run in held), default=0)):
        if 2 * sum(1 for run in held if len(run) > i and run[i]) >= len(held):
            found = i
    return found


def _sat_line(step: dict[str, Any]) -> str:
    """One step as printed: chunks/s, CPU per chunk, each worker's cores and throttling."""
    shares = step["shares"]
    # Chunks/s if every stream kept the mock's pace (a chunk every TOKEN_MS).
    pace = step["concurrency"] * 1000 / TOKEN_MS
    return (
        f"{step['rate']:>7.0f} chunks/s ({step['rate'] / pace:.0%} of the streams' pace) "
        f"{step['whole']:>4}/{step['streams']:<4} whole, "
        f"{sum(step['cores']) / max(1.0, step['rate']) * 1e6:>5.1f} us/chunk, TTFT p50 "
        f"{step['ttft50']:>6.1f} ms; cores {' / '.join(f'{c:.2f}' for c in step['cores'])} "
        f"(throttled {' / '.join(f'{t:.0%}' for t in step['throttled'])})"
        + (f", bytes {' / '.join(f'{s:.0%}' for s in shares)}" if shares else "")
        + f"; {', '.join(f'{n} {c:.2f}' for n, c in step['others'].items())}; idle "
        f"{step['idle']:.0%}"
    )


def _idle(pair: dict[int, dict[str, Any]]) -> float:
    """The machine's idle share in the less idle of a level's two steps."""
    return float(min(step["idle"] for step in pair.values()))


def _capped(step: dict[str, Any], cap: float) -> bool:
    """Whether every worker of a step ran at its cap (90% of it: the cap was the limit)."""
    return all(c >= 0.9 * cap for c in step["cores"])


def saturate_workers(cap: float, levels: list[int], repeat: int, margin: float) -> None:
    """`unbroken serve --workers 2` against `--workers 1` at saturation: chunks/s when each
    worker's CPU is the limit, every gateway on one Redis store.

    Each worker process (not the supervisor, Redis, the mock nor the load process) runs in
    its own cgroup capped at `cap` cores, so the workers saturate while the machine keeps
    cores to spare for the rest. The offered load rises step by step, `levels` streams per
    worker (one load process of level x workers streams); at each level the 1-worker and the
    2-worker gateway run one after the other (their order swapped every run), so each pair
    meets the same machine. A level that leaves the machine less than `margin` idle is run
    again (SAT_RETRIES times; the machine is shared) and, if it still does, does not hold; a
    ramp ends when both gateways' chunks/s stopped growing, or after two levels in a row
    short of the margin (higher, the measure would be the machine's). The figure at
    saturation is the highest level that held (every worker at its cap, the margin kept) in
    at least half of the runs: medians of those runs."""
    with CpuCap("probe", cap):  # can this process cap CPU here at all? (before any start-up)
        pass
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock_process(MOCK_CONFIG) as mock_url,
        redis_process() as (redis_url, redis_pid),
        ExitStack() as stack,
    ):
        env = {"UNBROKEN_GATEWAY_STORE": redis_url, "UNBROKEN_GATEWAY_SESSIONS": redis_url}
        gateways: dict[int, tuple[Target, list[CpuCap]]] = {}
        for n in (1, 2):
            workdir = Path(tmp) / f"w{n}"
            workdir.mkdir()
            gateway = stack.enter_context(
                unbroken_server(mock_url, workdir, workers=n, extra_env=env)
            )
            # The workers: a 1-worker gateway serves in the process started, a larger one
            # in the children it forks.
            pids = [p for p in _tree(gateway.pid) if p != gateway.pid] or [gateway.pid]
            caps = []
            for i, pid in enumerate(pids):
                capped = stack.enter_context(CpuCap(f"w{n}-{i}", cap))
                capped.add(pid)
                caps.append(capped)
            gateways[n] = (gateway, caps)
        others = {"Redis": redis_pid, "mock": _mock_pid()}
        first = gateways[1][1][0]
        print(
            f"workers at saturation (Redis store): each worker in a cgroup capped at {cap:g} "
            f"core ({first.parent}, cgroup v{first.version}); {os.cpu_count()} CPUs; streams of "
            f"{CHUNKS} chunks {TOKEN_MS:g} ms apart; {SAT_WINDOW_S:g} s window per step; load "
            f"average {_load_average()}",
            flush=True,
        )
        # runs[r][n]: run r's steps of the n-worker gateway, one per level reached.
        runs: list[dict[int, list[dict[str, Any]]]] = []
        for r in range(repeat):
            steps: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            runs.append(steps)
            print(f"  run {r + 1}/{repeat}:", flush=True)
            short = 0  # levels in a row that left the machine under the margin
            for level in levels:
                best: dict[int, dict[str, Any]] = {}
                for _ in range(1 + SAT_RETRIES):
                    pair: dict[int, dict[str, Any]] = {}
                    for n in (1, 2) if r % 2 == 0 else (2, 1):
                        gateway, caps = gateways[n]
                        pair[n] = _sat_step(gateway, caps, level * n, others)
                        print(f"    {level:>3} x {n}: {_sat_line(pair[n])}", flush=True)
                        if pair[n]["refused"] or pair[n]["short"]:
                            print(
                                f"      refused: {pair[n]['refused']}; streams ended short "
                                f"(chunks, [DONE], status): {pair[n]['short']}"
                            )
                    if not best or _idle(pair) > _idle(best):
                        best = pair
                    if _idle(pair) >= margin:
                        break
                    # The machine is shared: other load may have come and gone.
                    print(f"    the machine was less than {margin:.0%} idle: again", flush=True)
                for n, step in best.items():
                    step["held"] = _idle(best) >= margin and _capped(step, cap)
                    steps[n].append(step)
                short = short + 1 if _idle(best) < margin else 0
                if short == 2:
                    print(
                        "    the ramp stops: two levels in a row left the machine under the "
                        "margin (higher, it, not the capped workers, would be the limit)"
                    )
                    break
                if all(saturated([s["rate"] for s in steps[n]]) for n in (1, 2)):
                    break
        _sat_report(runs, levels, cap, margin)


def _sat_report(
    runs: list[dict[int, list[dict[str, Any]]]], levels: list[int], cap: float, margin: float
) -> None:
    """Per level, the medians of the runs in which it held (every worker at its cap, the
    machine `margin` idle); the figure at saturation."""
    print(
        f"\nworkers at saturation, each worker capped at {cap:g} core, {len(runs)} runs, "
        "alternating; per level the medians of the runs where it held (every worker at its cap, "
        f"the machine >= {margin:.0%} idle): chunks/s (CPU per chunk, cores per worker), the "
        "1 / 2 worker steps' other processes:"
    )
    held = [[a["held"] and b["held"] for a, b in zip(s[1], s[2], strict=True)] for s in runs]
    for i, level in enumerate(levels):
        reached = [steps for steps, ok in zip(runs, held, strict=True) if len(ok) > i and ok[i]]
        if not reached:
            print(f"  {level:>3} streams per worker: held in no run")
            continue
        one = statistics.median(s[1][i]["rate"] for s in reached)
        two = statistics.median(s[2][i]["rate"] for s in reached)
        ratios = sorted(s[2][i]["rate"] / s[1][i]["rate"] for s in reached)
        cores = {n: _median_list([s[n][i]["cores"] for s in reached]) for n in (1, 2)}
        us = {
            n: statistics.median(sum(s[n][i]["cores"]) / s[n][i]["rate"] * 1e6 for s in reached)
            for n in (1, 2)
        }
        shares = _median_list([s[2][i]["shares"] for s in reached])
        print(
            f"  {level:>3} streams per worker, held in {len(reached)} of {len(runs)} runs: "
            f"1 worker {one:>6.0f} ({us[1]:.1f} us, {cores[1][0]:.2f}), 2 workers {two:>6.0f} "
            f"({us[2]:.1f} us, {' / '.join(f'{c:.2f}' for c in cores[2])}, bytes "
            f"{' / '.join(f'{c:.0%}' for c in shares)}): {statistics.median(ratios):.2f}x (runs "
            f"{ratios[0]:.2f}x-{ratios[-1]:.2f}x); "
            + "; ".join(
                f"{name} "
                + " / ".join(
                    f"{statistics.median(s[n][i]['others'][name] for s in reached):.2f}"
                    for n in (1, 2)
                )
                for name in ("Redis", "mock", "load")
            )
            + f" core; idle >= {min(min(s[1][i]['idle'], s[2][i]['idle']) for s in reached):.0%}"
        )
    top = saturation_level(held)
    if top is None:
        print(
            f"  no figure at saturation: no level held in half of the runs (every worker at its "
            f"cap, the machine {margin:.0%} idle): raise --sat-levels or lower --cpu-cap"
        )
        return
    reached = [steps for steps, ok in zip(runs, held, strict=True) if len(ok) > top and ok[top]]
    one = statistics.median(s[1][top]["rate"] for s in reached)
    two = statistics.median(s[2][top]["rate"] for s in reached)
    ratios = sorted(s[2][top]["rate"] / s[1][top]["rate"] for s in reached)
    print(
        f"  at saturation ({levels[top]} streams per worker: the highest level held in at least "
        f"half of the runs): 1 worker {one:.0f} chunks/s, 2 workers {two:.0f}: 2 workers / "
        f"1 worker = {two / one:.2f}x (each run's pair: median {statistics.median(ratios):.2f}x, "
        f"range {ratios[0]:.2f}x to {ratios[-1]:.2f}x)"
    )
    growing = [
        n for n in (1, 2) if not all(saturated([s["rate"] for s in steps[n]]) for steps in runs)
    ]
    if growing:
        print(
            f"  chunks/s still grew with the offered load at the last level for "
            f"{' and '.join(f'{n} worker' + ('s' if n > 1 else '') for n in growing)}: with "
            "the CPU capped, a worker further behind reads more chunks per read and per turn "
            "of its loop, so each chunk costs it less"
        )


def _median_list(rows: list[list[float]]) -> list[float]:
    """Element-wise medians of equally long lists."""
    return [statistics.median(r[i] for r in rows) for i in range(len(rows[0]))] if rows else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--levels", default="1,32,256,1024", help="concurrency levels")
    parser.add_argument("--skip", default="", help="targets to skip: litellm,nginx,floor,pyrelay")
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="instead: N concurrent slow streams (1 token/s) through the gateway (e.g. 10000)",
    )
    parser.add_argument(
        "--soak-tokens", type=int, default=120, help="tokens per soak stream (1 per second)"
    )
    parser.add_argument(
        "--soak-ramp", type=float, default=60.0, help="seconds over which the soak's streams open"
    )
    parser.add_argument(
        "--soak-workers",
        type=int,
        default=0,
        help="gateway processes for the soak (default: as many as the open-files limit needs)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="C",
        help="instead: --workers 2 against 1 at C streams per process (e.g. 128)",
    )
    parser.add_argument(
        "--saturate",
        action="store_true",
        help="instead: --workers 2 against 1 at saturation, each worker under a CPU cap",
    )
    parser.add_argument(
        "--cpu-cap", type=float, default=0.2, help="cores per worker under --saturate"
    )
    parser.add_argument(
        "--sat-levels",
        default="16,24,32,48,64",
        help="streams per worker at each step of --saturate (until chunks/s stops growing)",
    )
    parser.add_argument(
        "--idle-margin",
        type=float,
        default=0.10,
        help="--saturate flags a step leaving the machine less idle than this share",
    )
    args = parser.parse_args()
    raise_open_files()
    if args.saturate:
        # The cgroups are removed on the way out: let a SIGTERM unwind as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            cap_files(1, args.cpu_cap)
            levels = [int(x) for x in args.sat_levels.split(",") if x]
        except ValueError as e:
            parser.error(f"--cpu-cap / --sat-levels: {e}")
        if not levels or min(levels) < 1 or not 0 <= args.idle_margin < 1:
            parser.error("--sat-levels needs streams >= 1, --idle-margin a share in [0, 1)")
        try:
            saturate_workers(args.cpu_cap, levels, args.repeat, args.idle_margin)
        except CpuCapError as e:
            sys.exit(f"--saturate: {e} (it needs root and a cgroup CPU controller)")
        return
    if args.soak:
        soak(args.soak, args.soak_tokens, args.soak_ramp, args.soak_workers)
        return
    if args.workers:
        compare_workers(args.workers, args.repeat)
        return
    levels = [int(x) for x in args.levels.split(",") if x]
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        mock_url = stack.enter_context(mock_process(MOCK_CONFIG))
        mock_port = int(mock_url.rsplit(":", 1)[1])
        targets: list[Target] = [Target("direct", 0, mock_port, "/v1/chat/completions")]
        targets.append(stack.enter_context(unbroken_server(mock_url, workdir)))
        if "floor" not in skip:
            targets.append(stack.enter_context(floor_server(mock_port)))
        if "nginx" not in skip:
            relay = stack.enter_context(nginx_server(mock_port, workdir))
            if relay is not None:
                targets.append(relay)
        if "pyrelay" not in skip:
            targets.append(stack.enter_context(pyrelay_server(mock_port)))
        if "litellm" not in skip:
            lite = stack.enter_context(litellm_server(mock_url, workdir))
            if lite is not None:
                targets.append(lite)
        print(
            f"mock at {mock_url}; targets: {', '.join(t.name for t in targets)}; "
            f"{os.cpu_count()} CPUs"
        )
        summary: dict[int, dict[str, dict[str, float]]] = {}
        for concurrency in levels:
            # Round by round, every target once per round: a drift of the shared machine's
            # speed during the level then moves every target alike, and the per-round
            # ratios show how steady each ratio is.
            runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for _ in range(args.repeat):
                for target in targets:
                    rounds = ROUNDS.get(concurrency, 1)
                    runs[target.name].append(measure(target, concurrency, rounds))
            rows = {name: _median_run(done) for name, done in runs.items()}
            report(concurrency, rows, args.repeat)
            report_rounds(runs)
            summary[concurrency] = rows
        summarize(summary)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        load_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--sat-client":
        sat_client_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--soak-client":
        soak_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--pyrelay":
        asyncio.run(_pyrelay(int(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--floor":
        import uvloop

        uvloop.run(_floor(int(sys.argv[2]), int(sys.argv[3])))
    else:
        main()
