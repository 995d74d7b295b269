"""CPU per request of the SDK as the gateway uses it, side by side with a raw client.

The gateway opens each upstream answer with the SDK: `AsyncClient` on its `LeanTransport`,
with its Prometheus hook and a chunk sink (as gateway/streams.py does). This bench runs
that loop in-process against the mock DeepSeek (its own process, 5-chunk answers) and,
in the same run, two peers sending the same request on the same loop:

  raw   an asyncio protocol + httptools keep-alive client: write the request, parse the
        response, nothing else (the floor of an HTTP client)
  lean  the bare LeanTransport: an httpx.Request in, the body read, the response closed

Printed: CPU us per request of each (this process only; medians of --repeat rounds), and
the SDK's share above the raw client. Run: python bench/sdk_request.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import httpx
import msgspec
from _mockproc import mock_process
from prometheus_client import CollectorRegistry

from unbroken.gateway.app import build_upstream
from unbroken.gateway.serving import BreakerWatch
from unbroken.gateway.upstream import LeanTransport
from unbroken.instrumentation import PrometheusHook
from unbroken.settings import Settings

MOCK = "MockConfig(seed=1, answer_tokens=(3, 3), latency=Latency(token_ms=1.0))"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there, how are you"}]
BODY = msgspec.json.encode(
    {
        "model": "deepseek-chat",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
One = Callable[[], Awaitable[None]]


class _Raw(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.done is not None:
            self.done.set_result(None)


def raw_client(url: str) -> One:
    host, port = url.rsplit("/", 1)[1].split(":")
    idle: list[_Raw] = []
    head = (
        f"POST /chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAuthorization: Bearer sk\r\n"
        f"X-Request-ID: 0123456789abcdef\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()

    async def one() -> None:
        loop = asyncio.get_running_loop()
        if idle:
            conn = idle.pop()
        else:
            _, conn = await loop.create_connection(_Raw, host, int(port))
        conn.done = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(head + BODY)
        await conn.done
        conn.parser = httptools.HttpResponseParser(conn)
        idle.append(conn)

    return one


def lean_client(url: str) -> One:
    transport = LeanTransport()
    target = httpx.URL(url + "/chat/completions")
    timeout = {"connect": 5.0, "read": None, "write": 5.0, "pool": 5.0}

    async def one() -> None:
        request = httpx.Request(
            "POST",
            target,
            content=BODY,
            headers={"Authorization": "Bearer sk", "X-Request-ID": "0123456789abcdef"},
            extensions={"timeout": timeout},
        )
        response = await transport.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        async for _ in response.stream:
            pass
        await response.aclose()

    return one


def sdk_client(url: str) -> One:
    env = {"DEEPSEEK_API_KEY": "sk-bench", "UNBROKEN_BASE_URL": url}
    client = build_upstream(
        Settings.from_env(env), [PrometheusHook(CollectorRegistry()), BreakerWatch()]
    )
    routes = client.routes

    async def one() -> None:
        stream = await client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_body=None,
            extra_headers={"X-Request-ID": os.urandom(8).hex()},
            fallbacks=None,
            routes=routes,
            budget_key="bench",
        )
        stream.set_chunk_sink(lambda chunks: True)
        async for _ in stream:
            pass
        await stream.final()
        await stream.aclose()

    return one


async def cpu_per_request(one: One, requests: int, concurrency: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm up
    cpu0 = time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return 1e6 * (time.process_time() - cpu0) / (requests // concurrency * concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import uvloop

    with mock_process(MOCK) as url:

        async def run() -> dict[str, list[float]]:
            clients = {"sdk": sdk_client(url), "raw": raw_client(url), "lean": lean_client(url)}
            results: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(args.repeat):  # interleaved, so load changes hit all three
                for name, one in clients.items():
                    results[name].append(
                        await cpu_per_request(one, args.requests, args.concurrency)
                    )
            return results

        results = uvloop.run(run())
    med = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
    print(f"CPU us per request (median of {args.repeat}, {args.requests} requests each):")
    for name, value in med.items():
        print(f"  {name:<5} {value:7.0f}")
    print(
        f"  SDK share above the raw client: {med['sdk'] - med['raw']:.0f} us "
        f"(sdk/raw {med['sdk'] / med['raw']:.1f}x)"
    )


if __name__ == "__main__":
    main()
