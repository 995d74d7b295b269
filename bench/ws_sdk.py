"""The SDK's WebSocket transport through connection loss: how many answers end
byte-identical when a TCP proxy cuts each client's first connection at a random byte.

Setup (real processes on 127.0.0.1): the mock DeepSeek with paced tokens, one gateway,
and a TCP fault proxy in front of it. `--streams` AsyncClients with
`transport="websocket"` each stream one answer through the proxy; the proxy cuts each
client's first WebSocket at a random byte offset; the client reconnects through the same
proxy and resumes after its last event. Every answer is compared with the same request's
fault-free answer over HTTP; the bench also counts the answers that took one attempt
(resumed from the gateway's log; an answer whose connection drops before its `started`
frame is retried instead, as a refused connection is). A second phase multiplexes all the
answers on one client (32 per connection, the gateway's limit, so 100 answers take 4
connections) and cuts its first connection once.

Run: python bench/ws_sdk.py [--streams 100] [--rounds 3] [--token-ms 5] [-v]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import FaultProxy

from unbroken import AsyncClient, Client
from unbroken.gateway.app import create_app
from unbroken.mock import Latency, MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Q{i}: which sizes and colours are there?"}]


async def _answer(client: AsyncClient, i: int) -> tuple[str, int]:
    """The text of answer `i` and how many attempts it took (failed ones are named)."""
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=_messages(i), stream=True
    )
    parts = [
        c.choices[0].delta.content or ""
        async for c in stream
        if c.choices and c.choices[0].delta is not None
    ]
    answer = await stream.final()
    attempts = answer.unbroken.attempts
    if len(attempts) > 1:
        print(f"    answer {i}: attempts {[(a.kind, a.outcome) for a in attempts]}")
    return "".join(parts), len(attempts)


async def _separate(base: str, streams: int) -> list[tuple[str, int]]:
    async def one(i: int) -> tuple[str, int]:
        headers = {"X-Bench-Client": str(i)}
        async with AsyncClient(
            api_key="sk-bench", base_url=base, transport="websocket", default_headers=headers
        ) as client:
            return await _answer(client, i)

    return list(await asyncio.gather(*(one(i) for i in range(streams))))


async def _shared(base: str, streams: int) -> list[tuple[str, int]]:
    async with AsyncClient(api_key="sk-bench", base_url=base, transport="websocket") as client:
        return list(await asyncio.gather(*(_answer(client, i) for i in range(streams))))


def one_round(
    streams: int, token_ms: float, seed: int
) -> tuple[tuple[int, int, str], tuple[int, int, str]]:
    """The scores (see `_score`) of a client per answer, and of one client for all."""
    config = MockConfig(seed=seed, latency=Latency(token_ms=token_ms))
    rng = random.Random(seed)
    with MockServer(config) as mock:
        settings = Settings(api_key="sk-bench", base_url=mock.url, gateway=GatewaySettings())
        with ServerThread(create_app(settings), lifespan="on", ws="websockets-sansio") as server:
            with Client(api_key="sk-bench", base_url=server.url + "/v1") as http:
                expected = [
                    http.chat.completions.create(model="deepseek-chat", messages=_messages(i))
                    .choices[0]
                    .message.content
                    for i in range(streams)
                ]
            port = int(server.url.rsplit(":", 1)[1])
            seen: set[bytes] = set()

            def cut_first(index: int, head: bytes) -> int | None:
                # One cut per client: its first connection (named by its header).
                start = head.lower().find(b"x-bench-client: ")
                name = head[start : head.find(b"\r\n", start)]
                if start < 0 or name in seen:
                    return None
                seen.add(name)
                return rng.randrange(400, 6_000)

            with FaultProxy(("127.0.0.1", port), cut_first) as proxy:
                started = time.monotonic()
                separate = asyncio.run(_separate(proxy.url + "/v1", streams))
                elapsed = time.monotonic() - started
                n_cut_separate = proxy.n_cut
            with FaultProxy(("127.0.0.1", port), lambda i, head: 8_000 if i == 0 else None) as p2:
                shared = asyncio.run(_shared(p2.url + "/v1", streams))
                n_cut_shared = p2.n_cut
    return (
        _score(separate, expected, n_cut_separate, elapsed),
        _score(shared, expected, n_cut_shared, None),
    )


def _score(
    got: list[tuple[str, int]], expected: list[str | None], n_cut: int, elapsed: float | None
) -> tuple[int, int, str]:
    """(byte-identical answers, of them in one attempt, a line describing the phase)."""
    identical = sum(text == want for (text, _), want in zip(got, expected, strict=True))
    first = sum(
        text == want and attempts == 1 for (text, attempts), want in zip(got, expected, strict=True)
    )
    took = f", {elapsed:.1f} s" if elapsed is not None else ""
    line = (
        f"{identical}/{len(got)} byte-identical, {first} of them in one attempt "
        f"({n_cut} connections cut{took})"
    )
    return identical, first, line


def main() -> None:
    if "-v" in sys.argv:
        sys.argv.remove("-v")
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("unbroken.client").setLevel(logging.DEBUG)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-ms", type=float, default=5.0)
    args = parser.parse_args()
    print(
        f"SDK over WebSocket with loss: {args.streams} streams x {args.rounds} rounds, tokens "
        f"every {args.token_ms:g} ms"
    )
    separate, shared = [], []
    for r in range(args.rounds):
        each, one = one_round(args.streams, args.token_ms, seed=r + 1)
        separate.append(each[0])
        shared.append(one[0])
        print(f"  round {r + 1}: a client each: {each[2]}")
        print(f"           one client, shared connections: {one[2]}")
    print(
        f"byte-identical: median {statistics.median(separate):.0f}/{args.streams} "
        f"(a client each), {statistics.median(shared):.0f}/{args.streams} (one client)"
    )


if __name__ == "__main__":
    main()
