"""Instance loss: how long clients wait for the next byte when the gateway instance that
writes their answers is killed, against a plain network loss measured side by side.

Setup (real processes on 127.0.0.1): the mock DeepSeek, one redis-server, two gateway
instances on it, nginx round robin in front (buffering off). N concurrent streams run
through nginx; mid-answer, either instance A is killed with SIGKILL (its answers are taken
over by B once their leases expire, and continued upstream from the log), or - the peer -
a TCP fault proxy in front of nginx resets every client connection (the writers live on).
Every client reconnects with its last event id; all answers are checked byte-identical.
Printed per scenario: streams that lost their connection, p50/p99 of the time from the
loss to the client's next byte (often replayed from the log: what the dead instance had
logged but not yet delivered), and p50/p99 of the longest wait for a byte after the loss
(for a dead instance: until the new writer produces), pooled over the rounds; then the
ratios of the medians.

Run: python bench/streams.py [--streams 100] [--rounds 3] [--lease 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

# The process fixtures are the tests' own (tests/cluster.py), so the bench measures exactly
# what the tests check.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _mockproc import mock_process
from tests.cluster import (
    FaultProxy,
    Reader,
    gateway_process,
    nginx,
    percentile,
    redis_server,
    run_with_loss,
)
from tests.integration.test_gateway_streams import fold

from unbroken.mock import MockConfig, answer_text

MOCK = MockConfig(seed=21)
MESSAGES = [{"role": "user", "content": "An answer that must survive its gateway."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
HEADERS = {"X-Mock-Tokens": "80", "X-Mock-Token-Ms": "40", "X-Unbroken-Resumable": "1"}


def check(readers: list[Reader], content: str) -> None:
    for reader in readers:
        payloads = [reader.events[i] for i in sorted(reader.events)]
        if not reader.done or fold(payloads).content(0) != content:
            raise SystemExit(f"stream {reader.stream_id}: the answer is not byte-identical")


def one_round(
    n: int, lease: str, scenario: str, tools: tuple[str, str]
) -> tuple[list[float], list[float]]:
    redis_bin, nginx_bin = tools
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=80)
    with ExitStack() as stack:
        # Every server in its own process: the clients' process holds only the clients and
        # the fault proxy.
        upstream = stack.enter_context(mock_process("MockConfig(seed=21)"))
        store = stack.enter_context(redis_server(redis_bin))
        a, url_a = stack.enter_context(gateway_process(upstream, store, stream_lease_s=lease))
        _, url_b = stack.enter_context(gateway_process(upstream, store, stream_lease_s=lease))
        front = stack.enter_context(
            nginx(nginx_bin, [url_a.removeprefix("http://"), url_b.removeprefix("http://")])
        )
        host, port = front.removeprefix("http://").split(":")
        proxy = stack.enter_context(FaultProxy((host, int(port)), lambda i, head: None))

        def kill() -> None:
            a.send_signal(signal.SIGKILL)

        lose = kill if scenario == "instance" else proxy.cut_all
        run = asyncio.run(run_with_loss(proxy.url, BODY, HEADERS, n, lose, after_events=10))
    check(run.readers, content)
    return run.gaps_s, run.stalls_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lease", default="3", help="gateway stream_lease_s (default 3)")
    args = parser.parse_args()
    tools = (shutil.which("redis-server"), shutil.which("nginx"))
    if None in tools:
        raise SystemExit("needs redis-server and nginx (apt-get install redis-server nginx)")
    gaps: dict[str, list[float]] = {"network": [], "instance": []}
    stalls: dict[str, list[float]] = {"network": [], "instance": []}
    for r in range(args.rounds):
        for scenario in ("network", "instance"):  # alternated, side by side in one run
            g, s = one_round(args.streams, args.lease, scenario, tools)  # type: ignore[arg-type]
            gaps[scenario] += g
            stalls[scenario] += s
            print(f"round {r + 1} {scenario:8}: {len(g)} streams reconnected", flush=True)
    print(f"\n{args.streams} streams x {args.rounds} rounds, stream_lease_s={args.lease}")
    print(f"{'loss':9} {'moved':>5} | next byte p50 p99 | longest wait p50 p99 (s)")
    for scenario in ("network", "instance"):
        g, s = gaps[scenario], stalls[scenario]
        print(
            f"{scenario:9} {len(g):5d} | {percentile(g, 0.5):9.3f} {percentile(g, 0.99):5.3f} "
            f"| {percentile(s, 0.5):12.3f} {percentile(s, 0.99):5.3f}"
        )
    for name, table in (("next byte", gaps), ("longest wait", stalls)):
        ratio = percentile(table["instance"], 0.5) / percentile(table["network"], 0.5)
        print(f"instance loss / network loss, {name} p50: {ratio:.1f}x")
    print("all answers byte-identical")


if __name__ == "__main__":
    main()
