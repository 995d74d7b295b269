"""The answer cache's cost and its degrade latency, measured on a real gateway process.

    python bench/cache.py [--tokens 2000] [--requests 20] [--repeat 3] [--pace-ms 5]

For each replay pace (0 = at once, and a paced typing effect), one `unbroken serve` process
with the answer cache in serve mode relays `--requests` distinct 2,000-token answers from
the mock (misses: relayed and stored), then is asked the same questions again (hits), all
`--requests` at once each time. The
gateway process's CPU time (utime + stime from /proc) per chunk delivered is printed for
both, side by side, with their ratio. Then the mock is stopped and the time to a whole
stale answer (degrade mode) is measured against a fresh relayed answer of the same length.
Medians over `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from unbroken.mock import MockConfig, MockServer

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextmanager
def gateway(mock_url: str, workdir: Path, pace_s: float) -> Iterator[tuple[int, str]]:
    config = workdir / f"cache-{pace_s}.toml"
    config.write_text(
        f'base_url = "{mock_url}"\n'
        "[gateway]\n"
        'forward_headers = ["x-mock-*"]\n'
        "retry_attempts = 1\n"
        "[gateway.cache]\n"
        'store = "memory"\n'
        'serve_models = ["deepseek-chat"]\n'
        f"pace_s = {pace_s}\n"
        "degrade_after_failures = 1\n"
        "probe_after_s = 60\n"
    )
    env = {**os.environ, "DEEPSEEK_API_KEY": "sk-bench", "UNBROKEN_CONFIG": str(config)}
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "unbroken.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.1)
        yield proc.pid, url
    finally:
        proc.terminate()
        proc.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(i: int) -> dict[str, object]:
    return {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": f"Question {i} about the pre-sale"}],
        "stream": True,
        "temperature": 0,
    }


def ask(client: httpx.Client, i: int, tokens: int) -> tuple[int, str | None, float]:
    """(chunks received, cache header, seconds to the whole answer)."""
    started = time.perf_counter()
    with client.stream(
        "POST", "/v1/chat/completions", json=body(i), headers={"X-Mock-Tokens": str(tokens)}
    ) as response:
        response.raise_for_status()
        n = sum(line.startswith("data: {") for line in response.iter_lines())
        return n, response.headers.get("x-unbroken-cache"), time.perf_counter() - started


def one_run(tokens: int, requests: int, pace_s: float) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        MockServer(MockConfig(seed=3)) as mock,
        gateway(mock.url, Path(tmp), pace_s) as (pid, url),
        httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=200)) as client,
    ):
        figures: dict[str, float] = {}
        for phase, expected in (("miss", None), ("hit", "hit")):
            cpu0 = cpu_seconds(pid)
            # All questions at once, as FAQ traffic at a peak arrives.
            with ThreadPoolExecutor(requests) as pool:
                results = list(pool.map(lambda i: ask(client, i, tokens), range(requests)))
            figures[f"{phase}_us_per_chunk"] = (
                (cpu_seconds(pid) - cpu0) / sum(n for n, _, _ in results) * 1e6
            )
            figures[f"{phase}_s"] = statistics.median(t for _, _, t in results)
            marks = {mark for _, mark, _ in results}
            assert marks == {expected}, f"{phase}: x-unbroken-cache {marks}"
        mock.stop()
        # One uncached request finds the upstream down (503) and opens the breaker.
        client.post("/v1/chat/completions", json=body(-1))
        stale = []
        for i in range(requests):
            _, mark, elapsed = ask(client, i, tokens)
            assert mark == "stale", f"degrade: x-unbroken-cache {mark!r}"
            stale.append(elapsed)
        figures["stale_p50_ms"] = statistics.median(stale) * 1000
        figures["stale_max_ms"] = max(stale) * 1000
        return figures


def _ratio(a: float, b: float) -> str:
    # CPU time comes in clock ticks (10 ms): a short run can measure 0.
    return f"{a / b:.1f}x" if b > 0 else "n/a (too short to measure)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pace-ms", type=float, default=2.0, help="the paced replay's pace")
    args = parser.parse_args()
    print(
        f"answer cache, {args.tokens}-token answers, {args.requests} requests, "
        f"median of {args.repeat} runs, {os.cpu_count()} CPUs"
    )
    print(
        f"{'replay pace':>12} {'miss us/chunk':>14} {'hit us/chunk':>13} {'ratio':>6} "
        f"{'stale p50 ms':>13} {'stale max ms':>13} {'fresh p50 ms':>13}"
    )
    at_once_hit = paced_hit = paced_miss = 0.0
    stale_p50 = 0.0
    for pace_s in (0.0, args.pace_ms / 1000):
        runs = [one_run(args.tokens, args.requests, pace_s) for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if pace_s == 0:
            at_once_hit = med["hit_us_per_chunk"]
        else:
            paced_hit, paced_miss = med["hit_us_per_chunk"], med["miss_us_per_chunk"]
        stale_p50 = max(stale_p50, med["stale_p50_ms"])
        print(
            f"{pace_s * 1000:>9.1f} ms {med['miss_us_per_chunk']:>14.2f} "
            f"{med['hit_us_per_chunk']:>13.2f} "
            f"{_ratio(med['miss_us_per_chunk'], med['hit_us_per_chunk']):>6} "
            f"{med['stale_p50_ms']:>13.1f} {med['stale_max_ms']:>13.1f} "
            f"{med['miss_s'] * 1000:>13.1f}"
        )
    print(
        f"hit CPU per chunk: {at_once_hit:.2f} us replayed at once, {paced_hit:.2f} us paced "
        f"at {args.pace_ms:g} ms (target <= 5 us): "
        f"{'met' if at_once_hit <= 5 else 'NOT met'} at once, "
        f"{'met' if paced_hit <= 5 else 'NOT met'} paced"
    )
    print(
        f"paced hit {paced_hit:.2f} us/chunk: {_ratio(paced_hit, at_once_hit)} the hit "
        f"replayed at once ({at_once_hit:.2f} us), {_ratio(paced_miss, paced_hit)} cheaper "
        f"than a miss relayed from the upstream ({paced_miss:.2f} us)"
    )
    print(
        f"whole stale answer p50 {stale_p50:.1f} ms (target <= 50 ms): "
        f"{'met' if stale_p50 <= 50 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
