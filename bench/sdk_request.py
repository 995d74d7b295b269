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

With --inprocess: no sockets and no mock process (a quieter figure on a busy machine): the
gateway's LeanTransport on connections whose peer is a loop callback answering each request
with the mock's 5-chunk answer, one event per loop turn, parsed as from a socket; the SDK
on it beside the bare transport on the same peer (`lean`: the POST's parts in, the body
read, the response closed). The SDK's share is the difference.

With --counts: figures the host's load does not move, for the in-process SDK answer: the
bytecodes it runs (traced, by file and by function) and the objects each answer leaves to
the garbage collector (collected with DEBUG_SAVEALL; 0 when reference counting frees it all).

With --memory N: the Python memory each holds per live stream instead (tracemalloc), N
streams of a slow answer held open mid-answer, the SDK's with the gateway's sinks;
the tasks that drive the SDK's streams are left out (the gateway's producer task exists
either way), the connection is counted for both.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import inspect
import os
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import httpx
import msgspec
from _bytecodes import opcode_tracer
from _mockproc import mock_process
from prometheus_client import CollectorRegistry

# The sources, also where `make` compiled the chunk path (unbroken/_native.py): `_InProcess`
# below subclasses LeanTransport, which a compiled gateway/upstream.py does not allow
# ("interpreted classes cannot inherit from compiled"). The SDK itself is not compiled.
os.environ["UNBROKEN_PURE_PYTHON"] = "1"

from unbroken.gateway.app import build_upstream  # (after the mode above)
from unbroken.gateway.serving import BreakerWatch
from unbroken.gateway.upstream import LeanTransport, _Connection
from unbroken.instrumentation import PrometheusHook
from unbroken.settings import Settings

MOCK = "MockConfig(seed=1, answer_tokens=(3, 3), latency=Latency(token_ms=1.0))"
# Answers that last longer than a --memory run.
SLOW_MOCK = "MockConfig(seed=1, answer_tokens=(2000, 2000), latency=Latency(token_ms=100.0))"
# Chunks each held stream has received when memory is measured.
MEMORY_CHUNKS = 3
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
    return sdk_on(
        build_upstream(
            Settings.from_env(env), [PrometheusHook(CollectorRegistry()), BreakerWatch()]
        )
    )


def sdk_on(client: Any) -> One:
    """One request as the gateway makes it, on `client` (an upstream AsyncClient)."""
    routes = client.routes

    async def one() -> None:
        stream = client.stream_checked(
            "deepseek-chat",
            MESSAGES,
            extra_body=None,
            extra_headers={"X-Request-ID": os.urandom(8).hex()},
            fallbacks=None,
            routes=routes,
            budget_key="bench",
        )
        # As the gateway's producer: its payload sink and its one-chunk sink, and no chunk
        # held while the next is awaited.
        stream.set_chunk_sink(_take, with_payloads=True, one=_take_one)
        async for chunk in stream:
            del chunk
        await stream.final()
        await stream.aclose()

    return one


def _take(chunks: list[Any], payloads: list[bytes] | None) -> bool:
    return True


def _take_one(payload: bytes) -> bool:
    return True


async def cpu_per_request(one: One, requests: int, concurrency: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm up
    cpu0 = time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return 1e6 * (time.process_time() - cpu0) / (requests // concurrency * concurrency)


class _RawStream(_Raw):
    def __init__(self) -> None:
        super().__init__()
        self.n_body = 0

    def on_body(self, body: bytes) -> None:
        self.n_body += 1


async def raw_streams(url: str, n: int) -> tuple[list[Any], Callable[[], int]]:
    """`n` raw connections, each reading a streamed answer (the body parsed, dropped)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    head = (
        f"POST /chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAuthorization: Bearer sk\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    conns: list[_RawStream] = []
    for _ in range(n):
        _, conn = await loop.create_connection(_RawStream, host, int(port))
        assert conn.transport is not None
        conn.transport.write(head + BODY)
        conns.append(conn)
    return conns, lambda: min(c.n_body for c in conns)


async def sdk_streams(url: str, n: int) -> tuple[list[Any], Callable[[], int]]:
    """`n` SDK streams as the gateway opens them (payload and one-chunk sinks), each driven
    by a task."""
    env = {"DEEPSEEK_API_KEY": "sk-bench", "UNBROKEN_BASE_URL": url}
    client = build_upstream(
        Settings.from_env(env), [PrometheusHook(CollectorRegistry()), BreakerWatch()]
    )
    routes = client.routes
    got = [0] * n

    async def one(i: int) -> None:
        stream = client.stream_checked(
            "deepseek-chat",
            MESSAGES,
            extra_headers={"X-Request-ID": os.urandom(8).hex()},
            routes=routes,
            budget_key="bench",
        )

        def sink(chunks: list[Any], payloads: list[bytes] | None) -> bool:
            got[i] += len(chunks)
            return True

        def one_sink(payload: bytes) -> bool:
            got[i] += 1
            return True

        stream.set_chunk_sink(sink, with_payloads=True, one=one_sink)
        async for chunk in stream:
            # As the gateway's producer: the chunk not held while the next is awaited.
            del chunk
            got[i] += 1

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    return [client, tasks], lambda: min(got)


async def held_per_stream(
    url: str, n: int, start: Callable[[str, int], Awaitable[tuple[list[Any], Callable[[], int]]]]
) -> float:
    """Python bytes held per live stream, `n` streams each past MEMORY_CHUNKS chunks."""
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    held, least = await start(url, n)
    while least() < MEMORY_CHUNKS:  # noqa: ASYNC110 - polls counters the callbacks bump
        await asyncio.sleep(0.05)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    # Not the streams': the driving tasks (their objects, registry and coroutines).
    leave_out = [
        tracemalloc.Filter(False, asyncio.tasks.__file__),
        tracemalloc.Filter(False, "*/_weakrefset.py"),
        tracemalloc.Filter(False, asyncio.runners.__file__),
    ]
    lines, first = inspect.getsourcelines(sdk_streams)
    driver = range(first, first + len(lines))
    stats = [
        stat
        for stat in after.filter_traces(leave_out).compare_to(
            before.filter_traces(leave_out), "lineno"
        )
        if not (stat.traceback[0].filename == __file__ and stat.traceback[0].lineno in driver)
    ]
    for item in held:
        if isinstance(item, list):
            for task in item:
                task.cancel()
            await asyncio.gather(*item, return_exceptions=True)
        elif isinstance(item, _RawStream) and item.transport is not None:
            item.transport.abort()
        else:
            await item.aclose()
    return sum(stat.size_diff for stat in stats) / n


def memory(n: int) -> None:
    import uvloop

    with mock_process(SLOW_MOCK) as url:

        async def run() -> dict[str, float]:
            await held_per_stream(url, 20, sdk_streams)  # warm up (imports, caches)
            return {
                "sdk": await held_per_stream(url, n, sdk_streams),
                "raw": await held_per_stream(url, n, raw_streams),
            }

        held = uvloop.run(run())
    print(f"Python bytes held per live stream ({n} streams, {MEMORY_CHUNKS}+ chunks each):")
    for name, value in held.items():
        print(f"  {name:<5} {value:7.0f}")
    print(
        f"  SDK share above the raw client: {held['sdk'] - held['raw']:.0f} bytes "
        f"(sdk/raw {held['sdk'] / held['raw']:.1f}x)"
    )


# The mock's answer to a request, as the in-process peer sends it: the head, then each
# event in its own chunked frame (one per loop turn), then the end of the body.
_EVENT = (
    b'{"id":"8ca01c93-3c49-49d2-9cf0-5d59554728df","object":"chat.completion.chunk",'
    b'"created":1796457753,"model":"deepseek-chat","system_fingerprint":'
    b'"fp_5417b77867_prod0820_fp8_kvcache","choices":[{"index":0,"delta":%s,"logprobs":null,'
    b'"finish_reason":%s}],"usage":%s}'
)
_USAGE = (
    b'{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":'
    b'{"cached_tokens":0},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":12}'
)
_EVENTS = [
    _EVENT % (b'{"role":"assistant","content":""}', b"null", b"null"),
    _EVENT % (b'{"content":"Hello"}', b"null", b"null"),
    _EVENT % (b'{"content":" and"}', b"null", b"null"),
    _EVENT % (b'{"content":" welcome"}', b"null", b"null"),
    _EVENT % (b'{"content":""}', b'"stop"', _USAGE),
    b"[DONE]",
]
_PARTS = [
    b"HTTP/1.1 200 OK\r\ndate: Sat, 05 Dec 2026 08:02:33 GMT\r\nserver: uvicorn\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n",
    *(b"%x\r\n%s\r\n" % (len(e) + 8, b"data: " + e + b"\n\n") for e in _EVENTS),
    b"0\r\n\r\n",
]


class _Peer:
    """The transport of an in-process connection: each request written is answered with
    `_PARTS`, fed to the connection's protocol one per loop turn."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop

    def write(self, data: bytes) -> None:
        self._feed(0)

    def _feed(self, i: int) -> None:
        self._conn.data_received(_PARTS[i])
        if i + 1 < len(_PARTS):
            self._loop.call_soon(self._feed, i + 1)

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _InProcess(LeanTransport):
    """A LeanTransport whose new connections are `_Peer`s instead of sockets."""

    async def _connect(self, key: Any, timeouts: Any) -> Any:
        idle = self._idle.get(key)
        if idle:
            return idle.pop()
        loop = asyncio.get_running_loop()
        self._open += 1
        conn = _Connection(loop, key, self._high)
        conn.connection_made(_Peer(conn, loop))  # type: ignore[arg-type]  # a stand-in
        return conn


def _in_process_client() -> Any:
    env = {"DEEPSEEK_API_KEY": "sk-bench", "UNBROKEN_BASE_URL": "http://127.0.0.1:9"}
    return build_upstream(
        Settings.from_env(env),
        [PrometheusHook(CollectorRegistry()), BreakerWatch()],
        transport=_InProcess(),
    )


def counts(answers: int) -> None:
    """Print the bytecodes one in-process SDK answer runs (by file, then the top
    functions) and the objects each answer leaves to the garbage collector: figures the
    host's load does not move."""
    import uvloop

    one = sdk_on(_in_process_client())
    tally: collections.Counter[str] = collections.Counter()

    tracer = opcode_tracer(tally)

    async def run() -> tuple[int, int]:
        for _ in range(20):  # warm up (imports, caches, the connection)
            await one()
        sys.settrace(tracer)
        try:
            for _ in range(answers):
                await one()
        finally:
            sys.settrace(None)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(answers):
                await one()
            gc.collect()
            garbage = len(gc.garbage)
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
            gc.enable()
        return sum(tally.values()), garbage

    total, garbage = uvloop.run(run())
    print(f"bytecodes per answer: {total / answers:.0f} (in-process, {answers} answers traced)")
    files: collections.Counter[str] = collections.Counter()
    for where, count in tally.items():
        files[where.partition(":")[0]] += count
    for where, count in files.most_common(12):
        print(f"  {count / answers:6.0f}  {where}")
    print("top functions:")
    for where, count in tally.most_common(int(os.environ.get("TOP", "25"))):
        print(f"  {count / answers:6.0f}  {where}")
    print(f"objects left to the garbage collector per answer: {garbage / answers:.1f}")


def in_process(requests: int, repeat: int) -> None:
    import uvloop

    url = "http://127.0.0.1:9"
    client = _in_process_client()
    bare = _InProcess()
    target = httpx.URL(url + "/chat/completions")
    head = (
        b"Host: 127.0.0.1:9\r\nContent-Type: application/json\r\nAuthorization: Bearer sk\r\n"
        b"X-Request-ID: 0123456789abcdef\r\nContent-Length: %d\r\n" % len(BODY)
    )
    timeouts: dict[str, float | None] = {"connect": 5.0, "read": None, "write": 5.0, "pool": 5.0}

    async def lean() -> None:
        response = await bare.unbroken_send_post(target, head, BODY, timeouts)
        async for _ in response.stream:  # type: ignore[union-attr]  # an async stream
            pass
        await response.aclose()

    async def run() -> dict[str, list[float]]:
        clients = {"sdk": sdk_on(client), "lean": lean}
        results: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(repeat):
            for name, one in clients.items():
                results[name].append(await cpu_per_request(one, requests, 1))
        return results

    results = uvloop.run(run())
    med = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
    print(f"CPU us per request in-process (median of {repeat}, {requests} requests each):")
    for name, value in med.items():
        print(f"  {name:<5} {value:7.1f}")
    print(f"  SDK share above the bare transport: {med['sdk'] - med['lean']:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="see the doc")
    parser.add_argument("--inprocess", action="store_true", help="see the doc")
    parser.add_argument(
        "--counts",
        action="store_true",
        help="in-process: bytecodes per answer and objects left to the collector",
    )
    args = parser.parse_args()
    if args.memory:
        memory(args.memory)
        return
    if args.counts:
        counts(50)
        return
    if args.inprocess:
        in_process(args.requests, args.repeat)
        return
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
