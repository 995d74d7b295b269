"""A direct body's one-flag check (gateway/direct.py `DirectBody._open`) on the gateway's
real protocol: the protocol reports every change that makes a response unwritable (a pause
of the connection's writes, the response's end, the client's loss) to the body of the
response running then, also with a pipelined request queued behind it; a resume makes it
writable again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.server import ServerState

from unbroken.gateway.direct import DIRECT_EXTENSION, DirectBody
from unbroken.gateway.guard import Guard, guarded_protocol
from unbroken.gateway.metrics import GatewayMetrics
from unbroken.gateway.problems import Scrubber
from unbroken.gateway.relay import LiveSink, StreamRelay
from unbroken.settings import GatewaySettings

pytestmark = pytest.mark.integration

GET = b"GET /stream HTTP/1.1\r\nHost: gw.test\r\n\r\n"


class _Transport(asyncio.Transport):
    """Records writes; `closing` once closed or aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _App:
    """Streams a response per request, writes nothing more until told to end it."""

    def __init__(self) -> None:
        self.bodies: list[DirectBody] = []
        self.end: list[asyncio.Event] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        end = asyncio.Event()
        self.end.append(end)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"start", "more_body": True})
        self.bodies.append(scope["extensions"][DIRECT_EXTENSION])
        await end.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _turns() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _serving() -> tuple[_App, Any, _Transport]:
    """The gateway's protocol on a stand-in transport, one GET's response started."""
    app = _App()
    cls = guarded_protocol(Guard(GatewaySettings(), GatewayMetrics(CollectorRegistry())))
    protocol: Any = cls(
        config=uvicorn.Config(app, http="httptools"), server_state=ServerState(), app_state={}
    )
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(GET)
    await _turns()
    return app, protocol, transport


def _sink(body: DirectBody) -> LiveSink:
    relay = StreamRelay(
        object(),  # type: ignore[arg-type]  # a LiveSink reads only the relay's own fields
        Scrubber([]),
        keepalive_s=15.0,
        send_timeout_s=10.0,
    )
    return LiveSink(relay, body)


def test_the_protocol_tells_the_running_body_of_each_change() -> None:
    async def main() -> None:
        app, protocol, transport = await _serving()
        [first] = app.bodies
        sink = _sink(first)
        assert first.write(b"a")
        assert sink.feed_one(1, b"b")  # the fused path (its flag now set)
        assert first._open
        assert transport.writes[-2:] == [b"1\r\na\r\n", b"f\r\nid: 1\ndata: b\n\n\r\n"]

        protocol.pause_writing()  # the client stopped draining
        n = len(transport.writes)
        assert not sink.feed_one(2, b"c")
        assert not first.write_event(2, b"c")
        assert not first.write(b"c")
        protocol.resume_writing()
        assert sink.feed_one(2, b"c")
        assert len(transport.writes) == n + 1

        # A pipelined request waits behind the running response: a pause is still this
        # response's.
        protocol.data_received(GET)
        await _turns()
        assert app.bodies == [first]
        protocol.pause_writing()
        assert not sink.feed_one(3, b"d")
        protocol.resume_writing()
        assert sink.feed_one(3, b"d")

        app.end[0].set()  # the response ends; the pipelined one starts
        await _turns()
        assert first._cycle.response_complete
        assert not sink.feed_one(4, b"e")
        assert not first.write(b"e")
        [_, second] = app.bodies
        sink = _sink(second)
        assert sink.feed_one(1, b"f")
        protocol.pause_writing()
        assert not sink.feed_one(2, b"g")
        protocol.resume_writing()
        assert sink.feed_one(2, b"g")

        n = len(transport.writes)
        # The client is gone (a reset: the protocol closes no transport of its own).
        protocol.connection_lost(ConnectionResetError())
        assert not transport.closing
        assert not sink.feed_one(3, b"h")
        assert not second.write(b"h")
        assert len(transport.writes) == n
        app.end[1].set()
        await _turns()

    asyncio.run(main())


def test_a_closing_transport_is_seen_with_the_flag_set() -> None:
    """The transport's own state is checked at every write: an abort (a slow client's cut)
    stops the fused path at once."""

    async def main() -> None:
        app, protocol, transport = await _serving()
        [body] = app.bodies
        sink = _sink(body)
        assert sink.feed_one(1, b"a")
        transport.abort()
        assert not sink.feed_one(2, b"b")
        assert not body.write_event(2, b"b")
        protocol.connection_lost(None)
        app.end[0].set()
        await _turns()

    asyncio.run(main())
