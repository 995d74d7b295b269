"""WebSocket answers through connection loss: how many end byte-identical, and how long a
client waits from the cut to its next chunk after resuming.

Setup (real processes on 127.0.0.1): the mock DeepSeek with paced tokens, one gateway,
and a TCP fault proxy that cuts every client's first connection at a random byte offset.
Each client reconnects straight to the gateway and sends `resume` with its last event id.
Every answer is compared with the same request's fault-free answer.

Run: python bench/ws.py [--streams 100] [--rounds 3] [--token-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import httpx

# The clients and the proxy are the tests' own, so the bench measures what the tests check.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import FaultProxy, percentile
from tests.wsloss import cut_first_connections, run_ws_loss

from unbroken.gateway.app import create_app
from unbroken.mock import Latency, MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings


def one_round(streams: int, token_ms: float, seed: int) -> tuple[int, int, list[float]]:
    """(answers byte-identical, reconnects, cut-to-next-chunk gaps in seconds)."""
    bodies = [
        {"model": "deepseek-chat", "messages": [{"role": "user", "content": f"Q{i} sizes?"}]}
        for i in range(streams)
    ]
    config = MockConfig(seed=seed, latency=Latency(token_ms=token_ms))
    with MockServer(config) as mock:
        settings = Settings(api_key="sk-bench", base_url=mock.url, gateway=GatewaySettings())
        with ServerThread(create_app(settings), lifespan="on", ws="websockets-sansio") as server:
            expected = [
                httpx.post(server.url + "/v1/chat/completions", json=b, timeout=60).json()[
                    "choices"
                ][0]["message"]["content"]
                for b in bodies
            ]
            port = int(server.url.rsplit(":", 1)[1])
            cut = cut_first_connections(seed, 400, 1_200)
            with FaultProxy(("127.0.0.1", port), cut) as proxy:
                run = asyncio.run(
                    run_ws_loss(
                        proxy.url.replace("http", "ws") + "/v1/chat/ws",
                        server.url.replace("http", "ws") + "/v1/chat/ws",
                        bodies,
                        concurrency=streams,
                    )
                )
    whole = sum(
        got == want and ev == list(range(1, len(ev) + 1))
        for got, want, ev in zip(run.answers, expected, run.events, strict=True)
    )
    return whole, run.reconnects, run.gaps_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-ms", type=float, default=5.0)
    args = parser.parse_args()
    print(
        f"WebSocket loss: {args.streams} streams x {args.rounds} rounds, tokens every "
        f"{args.token_ms:g} ms, every first connection cut at a random byte"
    )
    wholes, gaps = [], []
    for r in range(args.rounds):
        whole, reconnects, round_gaps = one_round(args.streams, args.token_ms, seed=r + 1)
        wholes.append(whole)
        gaps += round_gaps
        print(f"  round {r + 1}: {whole}/{args.streams} byte-identical, {reconnects} resumed")
    print(f"byte-identical: median {statistics.median(wholes):.0f}/{args.streams}")
    print(
        f"cut to next chunk after resuming: p50 {percentile(gaps, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(gaps, 0.99) * 1000:.1f} ms ({len(gaps)} resumes)"
    )


if __name__ == "__main__":
    main()
