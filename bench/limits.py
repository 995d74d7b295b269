"""What per-key rate limits cost a request on a Redis store: first-token time at
concurrency 1 and Redis commands per request, without limits (the peer), with requests- and
tokens-per-minute limits, and with a concurrency limit too.

One redis-server and one mock process; one `unbroken serve` per configuration (and per
source tree with `--other NAME=PATH/src`, to compare with another version side by side).
Rounds alternate the servers; each round sends N requests one after another to each and
reads Redis's INFO commandstats (reset before the round). Prints, per configuration, the
median over rounds of each round's TTFT p50 (with the range), its difference to the same
tree without limits, and the median Redis commands per request (those run inside scripts
included, as Redis counts them).
Run: python bench/limits.py [--rounds 10] [--requests 20] [--other old=/tmp/old/src]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from _mockproc import free_port, mock_process
from gateway import (
    GATEWAY_KEY,
    Result,
    _one,
    _redis_call,
    _redis_commands,
    _wait_ready,
    redis_process,
)

CONFIGS = {
    "none": "",
    "rpm+tpm": "requests_per_minute = 1000000\ntokens_per_minute = 100000000\n",
    "rpm+tpm+conc": (
        "requests_per_minute = 1000000\ntokens_per_minute = 100000000\nconcurrent_streams = 100\n"
    ),
}
# Short answers: the first token is what is measured.
MOCK = "MockConfig(seed=1, answer_tokens=(8, 8), latency=Latency(token_ms=1.0))"
SERVE = (
    "import sys, typer; from unbroken.cli.gateway_cmds import serve; "
    "app = typer.Typer(); app.command()(serve); app(sys.argv[1:])"
)


@contextmanager
def gateway(
    src: str | None, mock_url: str, redis_url: str, limits: str, workdir: Path
) -> Iterator[int]:
    """`unbroken serve` from `src` (None: this interpreter's own path) on the Redis store,
    with one key holding `limits`; yields its port."""
    port = free_port()
    digest = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
    config = workdir / f"unbroken-{port}.toml"
    config.write_text(
        f'[gateway]\naccess_log = false\nstore = "{redis_url}"\n\n'
        f'[[gateway.keys]]\nname = "bench"\nsha256 = "{digest}"\n{limits}',
        encoding="utf-8",
    )
    env = {**os.environ, "DEEPSEEK_API_KEY": "sk-bench"}
    if src is not None:
        env["PYTHONPATH"] = src
    command = [sys.executable, "-c", SERVE, "--config", str(config), "--port", str(port)]
    command += ["--upstream", mock_url, "--log-level", "warning", "--workers", "1"]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_ready(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": f"Bearer {GATEWAY_KEY}"},
            proc,
            30.0,
        )
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


async def _sequential(port: int, requests: int) -> list[Result]:
    results: list[Result] = []
    for index in range(requests):
        await _one(port, "/v1/chat/completions", GATEWAY_KEY, index, results)
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--other", action="append", default=[], metavar="NAME=SRC")
    args = parser.parse_args(argv)
    trees: dict[str, str | None] = {"this": None}
    trees.update(dict(item.split("=", 1) for item in args.other))
    ttft: dict[tuple[str, str], list[float]] = {}
    commands: dict[tuple[str, str], list[dict[str, float]]] = {}
    with ExitStack() as stack:
        redis_url, _ = stack.enter_context(redis_process())
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        mock_url = stack.enter_context(mock_process(MOCK))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        ports = {
            (tree, name): stack.enter_context(gateway(src, mock_url, redis_url, limits, workdir))
            for tree, src in trees.items()
            for name, limits in CONFIGS.items()
        }
        for port in ports.values():
            asyncio.run(_sequential(port, 5))  # warm-up: connections, scripts loaded
        for _ in range(args.rounds):
            for key, port in ports.items():
                _redis_call(redis_port, "CONFIG", "RESETSTAT")
                results = asyncio.run(_sequential(port, args.requests))
                counts = _redis_commands(redis_port)
                firsts = [r[0] for r in results if r[0] is not None and r[3] == 200]
                if len(firsts) != args.requests:
                    raise SystemExit(f"{key}: {args.requests - len(firsts)} requests failed")
                ttft.setdefault(key, []).append(statistics.median(firsts) * 1000)
                commands.setdefault(key, []).append(
                    {
                        name: calls / args.requests
                        for name, calls in counts.items()
                        if name not in ("config|resetstat", "info")
                    }
                )
    print(f"{args.rounds} alternated rounds of {args.requests} sequential requests each")
    for (tree, name), values in ttft.items():
        peer = statistics.median(ttft[(tree, "none")])
        median = statistics.median(values)
        rounds = commands[(tree, name)]
        names = sorted({n for counts in rounds for n in counts})
        per_request = {n: statistics.median(c.get(n, 0.0) for c in rounds) for n in names}
        shown = ", ".join(f"{n} {v:g}" for n, v in per_request.items() if v >= 0.5)
        print(
            f"{tree:>6} {name:<13} TTFT p50 {median:.2f} ms ({min(values):.2f}-{max(values):.2f}),"
            f" {median - peer:+.2f} ms vs no limits; Redis commands per request: {shown}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
