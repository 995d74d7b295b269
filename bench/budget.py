"""Exact daily token budgets under concurrency: N requests at once against one key's
budget, on the memory store and on Redis side by side, with and without `max_tokens`.

Each run starts a fresh `unbroken serve` (and a fresh redis-server for Redis) in front of
one mock process whose answers are 30-40 tokens, fires N requests at once and sums the
billed `usage.total_tokens` of the answers served. It prints the spend, the budget, one
request's reservation (prompt + max_tokens, or prompt + reserve_tokens), the overshoot
past the budget and spend / (budget + one reservation), which must stay <= 1.
Run: python bench/budget.py [--requests 200] [--budget 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
from _mockproc import free_port, mock_process

KEY = "sk-bench-budget-0123456789"
SERVE = (
    "import sys; from unbroken.cli.gateway_cmds import serve; import typer;"
    "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
)
MAX_TOKENS = 40
RESERVE_TOKENS = 40


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _wait(port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("a server did not start")
        time.sleep(0.05)  # waiting for another process to listen


@contextmanager
def redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
        proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)
        try:
            _wait(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait(10)


@contextmanager
def gateway(mock_url: str, store: str, budget: int) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "DEEPSEEK_API_KEY": "sk-bench",
        "UNBROKEN_GATEWAY_KEY": KEY,
        "UNBROKEN_GATEWAY_DAILY_TOKENS": str(budget),
        "UNBROKEN_GATEWAY_STORE": store,
        "UNBROKEN_GATEWAY_RESERVE_TOKENS": str(RESERVE_TOKENS),
    }
    args = [SERVE, "--port", str(port), "--upstream", mock_url, "--log-level", "error"]
    proc = subprocess.Popen([sys.executable, "-c", *args], env=env, stdout=subprocess.DEVNULL)
    try:
        _wait(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def fire(url: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(n))
        )


def run(mock_url: str, store: str, n: int, budget: int, max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Hi"}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    with gateway(mock_url, store, budget) as url:
        responses = asyncio.run(fire(url, n, body))
    served = [r.json()["usage"] for r in responses if r.status_code == 200]
    other = sorted({r.status_code for r in responses} - {200, 429})
    spent = sum(u["total_tokens"] for u in served)
    reservation = max((u["prompt_tokens"] for u in served), default=0) + (
        max_tokens or RESERVE_TOKENS
    )
    return {
        "served": len(served),
        "spent": spent,
        "reservation": reservation,
        "overshoot": max(0, spent - budget),
        "ratio": spent / (budget + reservation),
        "other": other,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--budget", type=int, default=2000)
    args = parser.parse_args()
    config = "MockConfig(seed=1, answer_tokens=(30, 40))"
    rows = []
    with ExitStack() as stack:
        mock_url = stack.enter_context(mock_process(config))
        for max_tokens in (MAX_TOKENS, None):
            for store in ("memory", "redis"):
                url = "memory" if store == "memory" else stack.enter_context(redis())
                result = run(mock_url, url, args.requests, args.budget, max_tokens)
                rows.append((store, max_tokens, result))
    print(f"{args.requests} parallel requests, daily budget {args.budget} tokens")
    print(
        f"{'store':8}{'max_tokens':>11}{'served':>8}{'spent':>8}{'1 resv':>8}"
        f"{'overshoot':>11}{'spent/(budget+resv)':>21}"
    )
    for store, max_tokens, r in rows:
        shown = str(max_tokens) if max_tokens else f"none({RESERVE_TOKENS})"
        print(
            f"{store:8}{shown:>11}{r['served']:>8}{r['spent']:>8}{r['reservation']:>8}"
            f"{r['overshoot']:>11}{r['ratio']:>21.3f}"
            + (f"  other: {r['other']}" if r["other"] else "")
        )


if __name__ == "__main__":
    main()
