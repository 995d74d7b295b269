"""LeanTransport, the gateway's upstream transport, against the mock: keep-alive reuse,
httpx's exception types for refused connections and mid-body resets, and read-ahead that
pauses instead of buffering a whole answer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import select
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from tests.support import Watched, on_loop
from unbroken.client import AsyncClient
from unbroken.client._driver import Exchange
from unbroken.client.async_ import AsyncStream
from unbroken.core.flow import PackedMessages
from unbroken.core.wire import ChatCompletionChunk
from unbroken.errors import InternalServerError
from unbroken.gateway.upstream import AHEAD, LeanTransport
from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

BODY = json.dumps(
    {"model": "deepseek-chat", "stream": True, "messages": [{"role": "user", "content": "t"}]}
).encode()
HEADERS = {"Authorization": "Bearer sk", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=2)) as server:
        yield server


@pytest.fixture
async def lean() -> AsyncIterator[tuple[httpx.AsyncClient, LeanTransport]]:
    transport = LeanTransport(high_water_bytes=8192)
    async with httpx.AsyncClient(transport=transport) as client:
        yield client, transport


@pytest.mark.anyio
async def test_sequential_requests_reuse_one_connection(
    upstream: MockServer, lean: tuple[httpx.AsyncClient, LeanTransport]
) -> None:
    """A fully read response returns its connection to the pool; the next request reuses
    it (one open connection after three requests)."""
    client, transport = lean
    bodies = []
    for _ in range(3):
        response = await client.post(
            upstream.url + "/chat/completions", content=BODY, headers=HEADERS
        )
        assert response.status_code == 200
        bodies.append(response.content)
        assert transport._open == 1
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    assert bodies[0].count(b"data: {") == bodies[2].count(b"data: {")


async def _settled(transport: LeanTransport) -> None:
    """Until the connections being opened ahead are open (a turn first: a request's own
    task starts them)."""
    await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*transport._ahead_tasks), 10)
    assert not transport._ahead_tasks


@pytest.mark.anyio
async def test_requests_outgrowing_the_pool_find_a_connection_opened_ahead(
    upstream: MockServer, lean: tuple[httpx.AsyncClient, LeanTransport]
) -> None:
    """A request that finds no idle connection while others are busy connects and opens one
    more ahead; the next such request takes that one (no connect of its own) and opens the
    next one ahead. A request alone opens nothing ahead; closing closes them all."""
    client, transport = lean
    url = upstream.url + "/chat/completions"

    def idle() -> int:
        return sum(len(conns) for conns in transport._idle.values())

    async with client.stream("POST", url, content=BODY, headers=HEADERS) as first:
        assert first.status_code == 200
        await _settled(transport)
        assert (transport._open, idle()) == (1, 0)
        async with client.stream("POST", url, content=BODY, headers=HEADERS) as second:
            assert second.status_code == 200
            await _settled(transport)
            assert (transport._open, idle()) == (3, 1)  # its own, and one ahead
            async with client.stream("POST", url, content=BODY, headers=HEADERS) as third:
                assert third.status_code == 200
                await _settled(transport)
                # It took the one opened ahead (its own connect would make 5).
                assert (transport._open, idle()) == (4, 1)
            for response in (first, second):
                await response.aread()
    await transport.aclose()
    assert transport._open == 0


@pytest.mark.anyio
async def test_a_burst_of_requests_finds_spares_opened_ahead(
    upstream: MockServer, lean: tuple[httpx.AsyncClient, LeanTransport]
) -> None:
    """Requests read in one loop turn (a busy gateway reads several at once) find no
    connection opened in between: while others are busy, those that find none open one
    more ahead each, up to one per `AHEAD_SHARE` connections open at once (not `AHEAD`), so
    the next burst finds them idle and sends at once. Each connect starts in the turn of
    the request that wants it (a connection being opened ahead is counted at once)."""
    client, transport = lean
    url = upstream.url + "/chat/completions"

    def idle() -> int:
        return sum(len(conns) for conns in transport._idle.values())

    def send() -> Coroutine[Any, Any, httpx.Response]:
        request = client.build_request("POST", url, content=BODY, headers=HEADERS)
        return client.send(request, stream=True)

    busy = [await send() for _ in range(40)]  # one after another: a busy pool
    await _settled(transport)
    assert transport._open == 40 + idle()
    burst = [asyncio.ensure_future(send()) for _ in range(24)]
    await asyncio.sleep(0)  # the burst's requests all take (or open) a connection now
    opening = sum(transport._opening.values())
    assert opening > AHEAD
    assert transport._open == 40 + 24 + opening  # counted: their connects started
    busy += await asyncio.gather(*burst)
    await _settled(transport)
    spares = idle()
    assert spares > AHEAD
    # The next burst takes them: no connect of its own.
    opened = transport._open
    busy += await asyncio.gather(*(send() for _ in range(spares)))
    await _settled(transport)
    assert transport._open - opened == sum(transport._opening.values()) + idle()
    for response in busy:
        await response.aclose()
    await transport.aclose()


class _HeldUpstream:
    """A raw HTTP/1.1 upstream on 127.0.0.1 that counts the connections it accepts and
    answers each request with a chunked head only when told (`answer`), its body left open
    (a busy stream) until `end`."""

    def __init__(self) -> None:
        self.accepted = 0
        self.requests: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
        self.handlers: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> _HeldUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/chat/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self._requests(reader, writer)
        finally:
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                await self.requests.put(writer)

    @staticmethod
    def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n"
        )

    @staticmethod
    def end(writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")


@pytest.mark.anyio
async def test_a_request_taking_the_last_idle_connection_replaces_it_after_its_head(
    lean: tuple[httpx.AsyncClient, LeanTransport],
) -> None:
    """Requests far apart (no burst), others busy: the one that takes the last idle
    connection starts no connect while the upstream works on it (a connection the upstream
    would accept before answering); its replacement is opened once its head is in. A
    request that finds none idle still opens one ahead at once."""
    client, transport = lean
    async with _HeldUpstream() as upstream:

        def send() -> Coroutine[Any, Any, httpx.Response]:
            request = client.build_request("POST", upstream.url, content=BODY, headers=HEADERS)
            return client.send(request, stream=True)

        async def answered() -> httpx.Response:
            sending = asyncio.ensure_future(send())
            writer = await upstream.requests.get()
            upstream.answer(writer)
            writers.append(writer)
            return await sending

        writers: list[asyncio.StreamWriter] = []
        busy = [await answered()]
        # None idle, one busy: its own connect and one ahead, at once.
        sending = asyncio.ensure_future(send())
        writer = await upstream.requests.get()
        assert transport._open == 3
        upstream.answer(writer)
        writers.append(writer)
        busy.append(await sending)
        await _settled(transport)
        assert (transport._open, upstream.accepted) == (3, 3)
        # The last idle one taken: nothing opened while its head is awaited.
        sending = asyncio.ensure_future(send())
        writer = await upstream.requests.get()
        assert transport._open == 3
        assert not transport._ahead_tasks
        upstream.answer(writer)
        writers.append(writer)
        busy.append(await sending)
        await _settled(transport)
        assert (transport._open, upstream.accepted) == (4, 4)
        assert sum(len(conns) for conns in transport._idle.values()) == 1
        for w in writers:
            upstream.end(w)
        for response in busy:
            await response.aread()
    await transport.aclose()


@pytest.mark.anyio
async def test_refused_connection_is_an_httpx_connect_error(
    lean: tuple[httpx.AsyncClient, LeanTransport],
) -> None:
    """Nothing listening: httpx.ConnectError, and no connection is counted."""
    client, transport = lean
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await client.post(f"http://127.0.0.1:{port}/chat/completions", content=BODY)
    assert transport._open == 0


@pytest.mark.anyio
async def test_reset_mid_body_is_a_read_error(
    upstream: MockServer, lean: tuple[httpx.AsyncClient, LeanTransport]
) -> None:
    """A TCP reset after some chunks surfaces as httpx.ReadError while reading, and the
    broken connection is not reused."""
    client, transport = lean
    headers = {**HEADERS, "X-Mock-Fault": "reset after=3", "X-Mock-Fault-Key": "lean-reset"}
    request = client.build_request(
        "POST", upstream.url + "/chat/completions", content=BODY, headers=headers
    )
    response = await client.send(request, stream=True)
    got = b""
    with pytest.raises(httpx.ReadError):
        async for data in response.aiter_raw():
            got += data
    await response.aclose()
    assert got.count(b"data: {") == 3
    assert transport._open == 0


@pytest.mark.anyio
async def test_read_ahead_pauses_for_a_slow_consumer(
    upstream: MockServer, lean: tuple[httpx.AsyncClient, LeanTransport]
) -> None:
    """With a consumer that does not read, at most about the high-water mark is buffered
    (plus one socket read), not the whole answer."""
    client, _ = lean
    headers = {**HEADERS, "X-Mock-Tokens": "20000"}
    request = client.build_request(
        "POST", upstream.url + "/chat/completions", content=BODY, headers=headers
    )
    response = await client.send(request, stream=True)
    stream = response.aiter_raw()
    first = await stream.__anext__()
    wrapped: Any = response.stream  # httpx wraps our stream in its BoundAsyncStream
    conn = wrapped._stream._conn
    deadline = anyio.current_time() + 5.0
    while not conn.paused and anyio.current_time() < deadline:  # noqa: ASYNC110 - a flag set by a protocol callback, no event to await
        await anyio.sleep(0.01)  # polling the transport's flag: the server pushes meanwhile
    assert conn.paused
    assert conn.buffered < 8192 + 256 * 1024
    assert len(first) > 0
    await response.aclose()


@pytest.mark.anyio
async def test_a_chunk_sink_takes_the_chunks_of_one_read_together(upstream: MockServer) -> None:
    """On this transport the SDK stream's chunk sink gets the chunks of one upstream read
    as one list (the gateway appends and writes them once): an answer streamed without
    delays arrives in reads of several events, the sink sees lists longer than one, and
    the chunks it took plus those the stream yielded are the whole answer, in order."""
    # The first token comes late (the tap is open by then), the rest in one burst.
    headers = {"X-Mock-Ttft-Ms": "100", "X-Mock-Token-Ms": "0", "X-Mock-Tokens": "600"}
    messages = [{"role": "user", "content": "t"}]
    async with AsyncClient(
        api_key="sk", base_url=upstream.url, transport=LeanTransport()
    ) as client:
        plain = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        expected = _text([c async for c in plain])

        batches: list[list[ChatCompletionChunk]] = []

        def sink(chunks: list[ChatCompletionChunk]) -> bool:
            batches.append(list(chunks))
            return True

        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        stream.set_chunk_sink(sink)
        yielded = [c async for c in stream]
    taken = [c for batch in batches for c in batch]
    assert max(len(batch) for batch in batches) > 1
    assert all(c.usage is None for c in taken)
    # The sink takes from the first tapped read on; the stream yields what was read before
    # the tap (and the usage chunk, after).
    assert expected
    head = [c for c in yielded if c.usage is None]
    assert _text([*head, *taken]) == expected


@pytest.mark.anyio
async def test_a_payload_sink_gets_the_upstream_bytes_of_each_chunk_read_alone(
    upstream: MockServer,
) -> None:
    """With `with_payloads=True` a chunk read alone (tokens 10 ms apart) comes with the
    upstream's own JSON of it: bytes that decode to that chunk, and that re-encoding gives
    back for the mock's chunks."""
    headers = {"X-Mock-Ttft-Ms": "100", "X-Mock-Token-Ms": "10", "X-Mock-Tokens": "20"}
    messages = [{"role": "user", "content": "t"}]
    taken: list[tuple[list[ChatCompletionChunk], list[bytes] | None]] = []

    def sink(chunks: list[ChatCompletionChunk], payloads: list[bytes] | None) -> bool:
        taken.append((list(chunks), payloads))
        return True

    async with AsyncClient(
        api_key="sk", base_url=upstream.url, transport=LeanTransport()
    ) as client:
        plain = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        expected = _text([c async for c in plain])
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        stream.set_chunk_sink(sink, with_payloads=True)
        yielded = [c async for c in stream]
    with_bytes = [(chunks, payloads) for chunks, payloads in taken if payloads is not None]
    assert len(with_bytes) >= 10
    for chunks, payloads in with_bytes:
        assert payloads is not None
        assert len(chunks) == len(payloads) == 1
        assert msgspec.json.decode(payloads[0], type=ChatCompletionChunk) == chunks[0]
        assert msgspec.json.encode(chunks[0]) == payloads[0]
    head = [c for c in yielded if c.usage is None]
    assert expected
    assert _text([*head, *(c for chunks, _ in taken for c in chunks)]) == expected


@pytest.mark.anyio
async def test_a_one_sink_gets_each_lone_chunk_as_bytes_and_a_refusal_is_yielded(
    upstream: MockServer,
) -> None:
    """With `one`, a content chunk read alone goes to `one` as just its upstream bytes
    (decoding to the chunk the plain stream yields), the other reads to the sink; when `one`
    refuses, that chunk and the rest of the attempt are yielded instead, in order, with
    nothing lost or repeated."""
    headers = {"X-Mock-Ttft-Ms": "100", "X-Mock-Token-Ms": "10", "X-Mock-Tokens": "30"}
    messages = [{"role": "user", "content": "t"}]
    seen: list[ChatCompletionChunk] = []  # what the sink and `one` took, in order
    n_ones = 0

    def sink(chunks: list[ChatCompletionChunk], payloads: list[bytes] | None) -> bool:
        seen.extend(chunks)
        return True

    def one(payload: bytes) -> bool:
        nonlocal n_ones
        if n_ones >= 12:
            return False
        n_ones += 1
        seen.append(msgspec.json.decode(payload, type=ChatCompletionChunk))
        return True

    async with AsyncClient(
        api_key="sk", base_url=upstream.url, transport=LeanTransport()
    ) as client:
        plain = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        expected = [c async for c in plain if c.usage is None]
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        stream.set_chunk_sink(sink, with_payloads=True, one=one)
        yielded = [c async for c in stream if c.usage is None]
        answer = await stream.final()
    assert n_ones == 12
    assert len(yielded) > len(expected) - len(seen) - 3  # the rest after the refusal
    # What was read before the tap, then what was taken, then the rest, yielded.
    # (The two answers differ in id and created only.)
    want = [c.choices for c in expected]
    n_head = want.index(seen[0].choices)
    assert [c.choices for c in [*yielded[:n_head], *seen, *yielded[n_head:]]] == want
    assert len({c.id for c in [*yielded, *seen]}) == 1
    assert answer.choices[0].message.content == _text(expected)


def _text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta
    )


@pytest.mark.anyio
async def test_the_sdk_sends_through_send_post_the_bytes_of_its_httpx_request() -> None:
    """The SDK hands LeanTransport a POST's parts (`unbroken_send_post`, no httpx.Request); the
    upstream receives byte for byte what the same attempt's httpx.Request sent through
    `handle_async_request` gives."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = LeanTransport()
    client = AsyncClient(
        api_key="sk-test", base_url=f"http://127.0.0.1:{port}", transport=transport, max_retries=0
    )
    sent: list[httpx.Request] = []
    original = Exchange.head

    def head(ex: Exchange, content: bytes) -> bytes:
        sent.append(ex.request)  # the httpx.Request of the same attempt, to replay below
        return original(ex, content)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Exchange, "head", head)
            with pytest.raises(InternalServerError):
                await client.chat.completions.create(
                    model="deepseek-chat",
                    messages=[{"role": "user", "content": "caf\u00e9"}],
                    extra_headers={"X-Request-ID": "abc"},
                )
        response = await transport.handle_async_request(sent[0])
        await response.aclose()
        assert len(received) == 2
        assert received[0] == received[1]
        assert received[0].startswith(b"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nX-Request-ID: abc\r\n" in received[0]
        assert b"\r\nAuthorization: Bearer sk-test\r\n" in received[0]
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_response_headers_are_the_upstreams_in_order() -> None:
    """LeanTransport's responses keep their headers packed until read; read, they are
    the upstream's, in order, repeated names and empty values included."""
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nX-Dup: a\r\n"
        b"Retry-After: 3\r\nx-dup: b\r\nX-Empty: \r\n\r\n{}"
    )

    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        await writer.drain()
        await reader.read()  # until the pool closes its idle connection
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = LeanTransport()
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(f"http://127.0.0.1:{port}/x")
        assert response.status_code == 429
        assert response.headers.raw == [
            (b"Content-Length", b"2"),
            (b"X-Dup", b"a"),
            (b"Retry-After", b"3"),
            (b"x-dup", b"b"),
            (b"X-Empty", b""),
        ]
        assert response.headers.get_list("x-dup") == ["a", "b"]
        assert response.content == b"{}"
        with anyio.fail_after(5):
            await closed.wait()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_a_response_without_headers_has_none() -> None:
    """A response with no header at all (its body ends with the connection)."""
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nbye")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=LeanTransport()) as client:
            response = await client.get(f"http://127.0.0.1:{port}/x")
        assert response.status_code == 200
        assert response.headers.raw == []
        assert response.content == b"bye"
        with anyio.fail_after(5):
            await closed.wait()
    finally:
        server.close()
        await server.wait_closed()


def _event(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    chunk = {
        "id": "r1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


@pytest.mark.anyio
@pytest.mark.parametrize("refuse_at", [None, 4])
async def test_a_frame_of_several_events_goes_to_one_event_by_event(
    refuse_at: int | None,
) -> None:
    """An upstream frame of several text events (a loaded upstream sends them so) reaches
    `one` event by event, as their bytes, not the sink as one decoded list; when `one`
    refuses inside such a frame, that chunk and the rest are yielded, in order."""
    texts = [f"t{i} " for i in range(9)]
    role = _event({"role": "assistant", "content": ""})
    events = [_event({"content": text}) for text in texts]
    usage = {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}
    frames = [
        role + events[0],
        b"".join(events[1:4]),
        b"".join(events[4:8]),
        events[8] + _event({"content": ""}, "stop") + _event({}, usage=usage),
        b"data: [DONE]\n\n",
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for frame in frames:
            await asyncio.sleep(0.05)  # each frame a read of its own, the tap open
            writer.write(b"%x\r\n%b\r\n" % (len(frame), frame))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    batches: list[list[ChatCompletionChunk]] = []
    ones: list[bytes] = []
    seen: list[ChatCompletionChunk] = []  # what the sink and `one` took, in order

    def sink(chunks: list[ChatCompletionChunk], payloads: list[bytes] | None) -> bool:
        batches.append(list(chunks))
        seen.extend(chunks)
        return True

    def one(payload: bytes) -> bool:
        if len(ones) == refuse_at:
            return False
        ones.append(payload)
        seen.append(msgspec.json.decode(payload, type=ChatCompletionChunk))
        return True

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncClient(
            api_key="sk", base_url=f"http://127.0.0.1:{port}", transport=LeanTransport()
        ) as client:
            stream = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "t"}], stream=True
            )
            stream.set_chunk_sink(sink, with_payloads=True, one=one)
            yielded = [c async for c in stream if c.usage is None]
            answer = await stream.final()
    finally:
        server.close()
        await server.wait_closed()
    # No read's events decoded together: one at a time to `one`, the first event too (its
    # read, one whole event, tells the decoder that the body is SSE).
    assert not batches
    relayable = [e[6:-2] for e in [role, *events, _event({"content": ""}, "stop")]]
    start = relayable.index(ones[0])  # the role's, or t1's if the first frame beat the tap
    assert start in (0, 2)
    # Each as it came, in order (the finish too, usage never), up to a refusal.
    assert ones == relayable[start : None if refuse_at is None else start + refuse_at]
    # What was read before the tap, what was taken, then the rest, yielded.
    want = [msgspec.json.decode(e[6:-2], type=ChatCompletionChunk).choices for e in [role, *events]]
    n_head = want.index(seen[0].choices)
    got = [*yielded[:n_head], *seen, *yielded[n_head:]]
    assert _text(got) == "".join(texts)
    assert answer.choices[0].message.content == "".join(texts)


@pytest.mark.anyio
async def test_a_step_of_a_tapped_stream_runs_as_a_task_and_its_cancel_stops_the_answer(
    upstream: MockServer,
) -> None:
    """What `__anext__` returns while the answer streams into the sink can run as an
    asyncio task, as a coroutine can, and waits without a suspended engine coroutine (the
    memory a gateway holds per live answer; the first token comes after the headers, so
    the wait starts before any item); cancelling that task while it waits stops the
    answer (the sink takes nothing more) and keeps what came (`current()`); a stream read
    one task per item gives the whole answer."""
    headers = {"X-Mock-Ttft-Ms": "50", "X-Mock-Token-Ms": "20", "X-Mock-Tokens": "200"}
    messages = [{"role": "user", "content": "t"}]
    async with AsyncClient(
        api_key="sk", base_url=upstream.url, transport=LeanTransport()
    ) as client:
        taken: list[ChatCompletionChunk] = []
        yielded: list[ChatCompletionChunk] = []
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )

        def sink(chunks: list[ChatCompletionChunk]) -> bool:
            taken.extend(chunks)
            return True

        stream.set_chunk_sink(sink)
        while True:  # the items read before the tap, each in a task of its own
            step = asyncio.create_task(_step(stream))
            await asyncio.sleep(0.3)
            if not step.done():
                break  # waiting while the sink takes the answer
            yielded.append(step.result())
        assert taken
        gc.collect()
        frames = [o for o in gc.get_objects() if issubclass(type(o), Coroutine)]
        assert not [f for f in frames if "Engine" in getattr(f, "__qualname__", "")]
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        n_taken = len(taken)
        await asyncio.sleep(0.2)
        assert len(taken) == n_taken
        assert stream.current().choices[0].message.content == _text([*yielded, *taken])

        whole = await client.chat.completions.create(
            model="deepseek-chat", messages=messages, stream=True, extra_headers=headers
        )
        whole.set_chunk_sink(lambda chunks: True)
        while True:
            try:
                await asyncio.create_task(_step(whole))
            except StopAsyncIteration:
                break
        answer = await whole.final()
    assert answer.choices[0].finish_reason is not None
    assert len(answer.choices[0].message.content or "") > len(_text(taken))


def _step(stream: AsyncStream) -> Coroutine[Any, Any, ChatCompletionChunk]:
    # What `__anext__` returns while a sink is set: a coroutine for create_task.
    step = stream.__anext__()
    assert isinstance(step, Coroutine)
    return step


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> bytes:
    data: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        data["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    event = b"data: " + json.dumps(data).encode() + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


@pytest.mark.anyio
async def test_the_request_is_packed_as_it_is_encoded_before_the_first_events_reach_the_sink() -> (
    None
):
    """The streaming request's messages are packed as JSON when the request is encoded
    (`Exchange.content`: that JSON is the wire's too), so nothing is left to pack after the
    response's head: the first events, read with the head, reach the chunk sink (in a
    gateway: the client's first write) with the messages packed already, and they stay
    packed for the rest of the answer."""
    later = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        # The head and the first events in one write (one read on the other side).
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + _chunk({"role": "assistant", "content": ""})
            + _chunk({"content": "Hello"})
        )
        await writer.drain()
        await later.wait()
        writer.write(
            _chunk({"content": " there"})
            + _chunk({}, "stop")
            + _chunk({}, None, usage=True)
            + b"%x\r\ndata: [DONE]\n\n\r\n0\r\n\r\n" % len(b"data: [DONE]\n\n")
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    held: list[type] = []
    try:
        async with AsyncClient(
            api_key="sk", base_url=f"http://127.0.0.1:{port}", transport=LeanTransport()
        ) as client:
            stream = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "t"}], stream=True
            )

            def sink(chunks: list[ChatCompletionChunk]) -> bool:
                held.append(type(stream._run._body["messages"]))
                later.set()
                return True

            stream.set_chunk_sink(sink)
            [c async for c in stream]
    finally:
        server.close()
    assert len(held) > 1
    assert all(t is PackedMessages for t in held)  # packed from the request's encoding on


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_request_that_connects_is_written_from_the_connections_callback(
    loop_name: str,
) -> None:
    """A request that finds no idle connection opens one; its bytes are written upstream
    from the callback in which the loop completes the connection (`connection_made`), not
    from a later pass of the loop. The response is then read as ever and the connection
    returns to the pool."""
    seen: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []
        connected = asyncio.Event()
        connect = loop.create_connection

        def after_made() -> None:
            # The loop does not turn here: what the request wrote is in the upstream's
            # socket now or was left for a later pass.
            listener.settimeout(10)
            server, _ = listener.accept()
            accepted.append(server)
            ready = select.select([server], [], [], 1)[0]
            seen.append(server.recv(65536, socket.MSG_PEEK) if ready else b"")
            connected.set()

        async def watched_connect(factory: Any, *args: Any, **kwargs: Any) -> Any:
            made: list[asyncio.Protocol] = []

            def watched() -> asyncio.Protocol:
                made.append(factory())
                return Watched(made[0], after_made=after_made)

            transport, _ = await connect(watched, *args, **kwargs)
            return transport, made[0]

        loop.create_connection = watched_connect  # type: ignore[method-assign,assignment]  # watch the loop's calls
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            head = b"Host: 127.0.0.1\r\nContent-Length: 2\r\n"
            sent = asyncio.ensure_future(pool.unbroken_send_post(url, head, b"{}", {}))
            await asyncio.wait_for(connected.wait(), 10)
            assert len(seen) == 1
            assert seen[0].startswith(b"POST /chat/completions HTTP/1.1\r\n"), "written later"
            accepted[0].recv(65536)
            accepted[0].sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            response = await asyncio.wait_for(sent, 10)
            assert response.status_code == 200
            assert await response.aread() == b"ok"
            await response.aclose()
            assert pool._open == 1
            assert len(pool._idle[("http", "127.0.0.1", port)]) == 1
        finally:
            await pool.aclose()
            for server in accepted:
                server.close()
            listener.close()

    on_loop(loop_name, main)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_request_cancelled_while_it_connects_closes_the_connection(loop_name: str) -> None:
    """A request cancelled (its client gone) after its connect started and before the
    connection is made: the cancellation reaches the caller, the connection is closed once
    made and not counted, and nothing is left running."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        pool = LeanTransport()
        try:
            url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
            sent = loop.create_task(
                pool.unbroken_send_post(url, b"Host: 127.0.0.1\r\nContent-Length: 0\r\n", b"", {})
            )
            await asyncio.sleep(0)  # its first step: the connect is under way
            assert pool._open == 1
            sent.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sent
            assert pool._open == 0
            listener.settimeout(10)
            server, _ = listener.accept()
            with server:
                server.settimeout(10)
                # Closed with nothing written: EOF (or a reset).
                with contextlib.suppress(ConnectionResetError):
                    assert server.recv(65536) == b""
            others = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
            await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 10)
        finally:
            await pool.aclose()
            listener.close()

    on_loop(loop_name, main)


@pytest.mark.anyio
async def test_a_connect_past_its_timeout_is_an_httpx_connect_timeout() -> None:
    """A connect timeout that ends before the connection is made: httpx.ConnectTimeout, and
    no connection is counted."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pool = LeanTransport()
    try:
        url = httpx.URL(f"http://127.0.0.1:{port}/chat/completions")
        with pytest.raises(httpx.ConnectTimeout):
            await pool.unbroken_send_post(
                url, b"Host: 127.0.0.1\r\nContent-Length: 0\r\n", b"", {"connect": 0.0}
            )
        assert pool._open == 0
    finally:
        await pool.aclose()
        listener.close()
