"""An answer relayed through the fast lane (a chunk sink on the gateway's upstream
connections) ends as a read to the body's end would end it: its chunks all given, its
usage shown, its attempt recorded complete once, its connection back in the pool for the
next request - whether the body's end comes in a read of its own or with the last events
(client/_engine.py `Engine._lane_ended`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support import RecordingHook
from unbroken.client import AsyncClient
from unbroken.core.routes import Route
from unbroken.gateway.upstream import LeanTransport, _Connection

_EVENT = (
    b'{"id":"a","object":"chat.completion.chunk","created":1,"model":"deepseek-chat",'
    b'"choices":[{"index":0,"delta":%s,"finish_reason":%s}],"usage":%s}'
)
_USAGE = b'{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}'
EVENTS = [
    _EVENT % (b'{"role":"assistant","content":""}', b"null", b"null"),
    _EVENT % (b'{"content":"Hi"}', b"null", b"null"),
    _EVENT % (b'{"content":" there"}', b"null", b"null"),
    _EVENT % (b'{"content":""}', b'"stop"', _USAGE),
    b"[DONE]",
]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
FRAMES = [b"%x\r\n%s\r\n" % (len(e) + 8, b"data: " + e + b"\n\n") for e in EVENTS]
END = b"0\r\n\r\n"

# The reads of one response, one per loop turn: the end alone, or with the last events.
APART = [HEAD, *FRAMES, END]
TOGETHER = [HEAD, *FRAMES[:-2], FRAMES[-2] + FRAMES[-1] + END]
# Several events in one frame (a loaded upstream's), and then the rest in one read.
_SEVERAL = b"".join(b"data: " + e + b"\n\n" for e in EVENTS[:3])
SEVERAL = [HEAD, b"%x\r\n%s\r\n" % (len(_SEVERAL), _SEVERAL), FRAMES[-2] + FRAMES[-1] + END]


class _Peer:
    """An in-process connection's transport: each request written is answered with the
    reads of `parts`, fed to the connection one per loop turn."""

    def __init__(self, conn: _Connection, parts: list[bytes]) -> None:
        self._conn = conn
        self._parts = parts
        self.requests = 0

    def write(self, data: bytes) -> None:
        self.requests += 1
        self._feed(0)

    def _feed(self, i: int) -> None:
        self._conn.data_received(self._parts[i])
        if i + 1 < len(self._parts):
            self._conn.loop.call_soon(self._feed, i + 1)

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _InProcess(LeanTransport):
    def __init__(self, parts: list[bytes]) -> None:
        super().__init__()
        self.parts = parts
        self.peers: list[_Peer] = []

    async def _connect(self, key: Any, timeouts: Any) -> Any:
        idle = self._idle.get(key)
        if idle:
            return idle.pop()
        self._open += 1
        conn = _Connection(asyncio.get_running_loop(), key, self._high)
        peer = _Peer(conn, self.parts)
        self.peers.append(peer)
        conn.connection_made(peer)  # type: ignore[arg-type]  # a stand-in
        return conn


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("parts", "sink"),
    [
        (APART, "one"),
        (TOGETHER, "one"),
        (SEVERAL, "one"),  # each of a read's events relayed as its bytes, in turn
        (APART, "list"),
        (TOGETHER, "list"),
    ],
    ids=["end-apart-one", "end-together-one", "several-a-frame-one", "end-apart", "end-together"],
)
async def test_a_lane_answer_ends_whole_and_frees_its_connection(
    parts: list[bytes], sink: str
) -> None:
    transport = _InProcess(parts)
    hook = RecordingHook()
    client = AsyncClient(
        routes=[Route(name="r", base_url="http://127.0.0.1:9/v1", api_key="sk")],
        transport=transport,
        hooks=[hook],
    )
    for n in range(1, 3):
        stream = await client.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        relayed: list[bytes] = []

        def take(
            chunks: list[Any], payloads: list[bytes] | None, into: list[bytes] = relayed
        ) -> bool:
            into.extend(payloads or [b"(encoded)"] * len(chunks))
            return True

        def take_one(payload: bytes, into: list[bytes] = relayed) -> bool:
            into.append(payload)
            return True

        stream.set_chunk_sink(take, with_payloads=True, one=take_one if sink == "one" else None)
        yielded = [chunk async for chunk in stream]
        answer = await stream.final()
        await stream.aclose()
        # The content chunks went to the sink; the finish (with usage) and OpenAI's usage
        # chunk were yielded.
        assert len(relayed) == 3
        assert relayed[1:] == EVENTS[1:3]  # (the first: the role's, maybe encoded)
        assert [c.usage is not None for c in yielded] == [False, True]
        assert yielded[0].choices[0].finish_reason == "stop"
        assert yielded[1].choices == []
        assert answer.choices[0].message.content == "Hi there"
        assert answer.usage is not None
        assert answer.usage.total_tokens == 5
        assert [(r.outcome, r.n_chunks) for r in hook.attempts] == [("complete", 4)] * n
        assert [(r.outcome, r.attempts) for r in hook.answers] == [("complete", 1)] * n
        # One connection, back in the pool after each answer: the second reuses it.
        assert [p.requests for p in transport.peers] == [n]
        assert transport._open == 1
    await client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("parts", [APART, SEVERAL], ids=["apart", "several-a-frame"])
async def test_a_refused_chunk_and_the_rest_are_yielded_in_order(parts: list[bytes]) -> None:
    """The sink refuses the second content chunk: it and every chunk after it are yielded,
    in order, whether they came in reads of their own or in one read with it."""
    client = AsyncClient(
        routes=[Route(name="r", base_url="http://127.0.0.1:9/v1", api_key="sk")],
        transport=_InProcess(parts),
    )
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    relayed: list[bytes] = []

    def take(chunks: list[Any], payloads: list[bytes] | None) -> bool:
        relayed.extend(payloads or [b"(encoded)"] * len(chunks))
        return True

    def take_one(payload: bytes) -> bool:
        if b"Hi" in payload:
            return False
        relayed.append(payload)
        return True

    stream.set_chunk_sink(take, with_payloads=True, one=take_one)
    yielded = [chunk async for chunk in stream]
    answer = await stream.final()
    assert len(relayed) == 1  # the role's
    deltas = [c.choices[0].delta for c in yielded]
    assert [d.content if d is not None else None for d in deltas] == ["Hi", " there", ""]
    assert yielded[-1].choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "Hi there"
    await client.close()
