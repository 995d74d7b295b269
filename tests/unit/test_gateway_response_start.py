"""`CycleHooks.start_now` renders a response's start and first body part itself: the bytes
and the cycle's response state must be exactly what uvicorn's own ASGI `send` makes of the
same two messages, and a message uvicorn refuses is refused with nothing written."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from unbroken.gateway.direct import DIRECT_EXTENSION, DirectBody, hold_writes, release_writes
from unbroken.gateway.guard import CycleHooks

pytestmark = pytest.mark.anyio


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_STATE = ("response_started", "chunked_encoding", "expected_content_length", "keep_alive")


def _cycle(method: str = "POST", keep_alive: bool = True) -> tuple[RequestResponseCycle, Any]:
    transport = _Transport()
    scope = {
        "type": "http",
        "method": method,
        "http_version": "1.1",
        "client": ("127.0.0.1", 5000),
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
    }
    cycle = RequestResponseCycle(
        scope=scope,  # type: ignore[arg-type]  # the keys send reads
        transport=transport,  # type: ignore[arg-type]  # what send uses
        flow=FlowControl(transport),  # type: ignore[arg-type]  # what send uses
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[(b"date", b"Thu, 03 Dec 2026 10:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    return cycle, transport


def _messages(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[Any, Any]:
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    return start, {"type": "http.response.body", "body": body, "more_body": True}


SSE = [(b"content-type", b"text/event-stream"), (b"X-Request-ID", b"abc")]
CASES = {
    "chunked": ("POST", True, SSE),
    "explicit chunked": ("POST", True, [*SSE, (b"transfer-encoding", b"chunked")]),
    "content-length": ("POST", True, [(b"content-length", b"40")]),
    "connection close": ("POST", True, [*SSE, (b"Connection", b"keep-alive, Close")]),
    "no keep-alive": ("POST", False, SSE),
    "HEAD": ("HEAD", True, SSE),
    "gateway-shaped": (
        "POST",
        True,
        [
            *SSE,
            (b"Cache-Control", b"no-cache"),
            (b"x-unbroken-gateway", b"1"),
            (b"X-Unbroken-Stream-ID", b"s-1"),
            (b"x-empty", b""),
            (b"x-tab", b"a\tb"),
        ],
    ),
    "a name holding a framing name": ("POST", True, [*SSE, (b"x-connection-id", b"7")]),
    "no headers": ("POST", True, []),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_start_is_uvicorns_own(case: str) -> None:
    method, keep_alive, headers = CASES[case]
    ours, ours_transport = _cycle(method, keep_alive)
    theirs, theirs_transport = _cycle(method, keep_alive)
    start, body = _messages(headers, b"data: x\n\n")
    assert CycleHooks(ours).start_now(start, body)
    await theirs.send(start)
    await theirs.send(body)
    assert ours_transport.writes == [b"".join(theirs_transport.writes)]
    assert len(theirs_transport.writes) == (1 if method == "HEAD" else 2)  # ours: one write
    for name in (*_STATE, "waiting_for_100_continue"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
    ("headers", "body", "error"),
    [
        ([(b"x-bad name", b"v")], b"x", "Invalid HTTP header name."),
        ([(b"x-ok", b"v"), (b"x-bad\nname", b"v")], b"x", "Invalid HTTP header name."),
        ([(b"x-ok", b"v"), (b"x-bad\n", b"v")], b"x", "Invalid HTTP header name."),
        ([(b"x-ok", b"line\r\nbreak")], b"x", "Invalid HTTP header value."),
        ([(b"content-length", b"2")], b"three", "Response content longer than Content-Length"),
    ],
)
async def test_what_uvicorn_refuses_is_refused_with_nothing_sent(
    headers: list[tuple[bytes, bytes]], body: bytes, error: str
) -> None:
    cycle, transport = _cycle()
    before = [getattr(cycle, name) for name in _STATE]
    with pytest.raises(RuntimeError, match=error):
        CycleHooks(cycle).start_now(*_messages(headers, body))
    assert transport.writes == []
    assert [getattr(cycle, name) for name in _STATE] == before


async def test_no_direct_start_once_started_or_gone() -> None:
    """A started response, a gone client or a closing transport: nothing is written."""
    for change in ("response_started", "disconnected", "closing"):
        cycle, transport = _cycle()
        if change == "closing":
            transport.closed = True
        else:
            setattr(cycle, change, True)
        assert not CycleHooks(cycle).start_now(*_messages(SSE, b"x"))
        assert transport.writes == []


async def test_a_direct_start_while_writes_are_held_goes_out_with_the_held_events() -> None:
    """An upstream read that brings the answer's first events: the response's head and
    all of them reach the client in one write, in order, when the writes are released."""
    cycle, transport = _cycle()
    direct = DirectBody(cycle)
    cycle.scope["extensions"] = {DIRECT_EXTENSION: direct}  # type: ignore[dict-item]  # the server's
    start, body = _messages(SSE, b"first")
    hold_writes()
    try:
        assert CycleHooks(cycle).start_now(start, body)
        assert direct.write(b"second")
        assert transport.writes == []
    finally:
        release_writes()
    head, rest = transport.writes[0].split(b"\r\n\r\n", 1)
    assert len(transport.writes) == 1
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest == b"5\r\nfirst\r\n6\r\nsecond\r\n"


async def test_a_direct_start_with_no_writes_held_is_written_at_once() -> None:
    cycle, transport = _cycle()
    cycle.scope["extensions"] = {DIRECT_EXTENSION: DirectBody(cycle)}  # type: ignore[dict-item]  # the server's
    assert CycleHooks(cycle).start_now(*_messages(SSE, b"first"))
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"\r\n\r\n5\r\nfirst\r\n")


async def test_names_seen_before_render_and_refuse_as_the_first_time() -> None:
    """Header names already rendered once are not checked again: the bytes, a bad value
    beside them and a bad new name among them are still uvicorn's."""
    headers = [*SSE, (b"X-Stream-ID", b"s1"), (b"Cache-Control", b"no-cache")]
    for _ in range(2):  # the second time with every name seen
        ours, ours_transport = _cycle()
        theirs, theirs_transport = _cycle()
        start, body = _messages(headers, b"data: x\n\n")
        assert CycleHooks(ours).start_now(start, body)
        await theirs.send(start)
        await theirs.send(body)
        assert ours_transport.writes == [b"".join(theirs_transport.writes)]
    for bad, error in [
        ([*headers, (b"X-Stream-ID", b"s\r\n2")], "Invalid HTTP header value."),
        ([*headers, (b"x-bad name", b"v")], "Invalid HTTP header name."),
        ([(b"x-bad name", b"v"), *headers], "Invalid HTTP header name."),  # not kept
    ]:
        cycle, transport = _cycle()
        with pytest.raises(RuntimeError, match=error):
            CycleHooks(cycle).start_now(*_messages(bad, b"x"))
        assert transport.writes == []
        assert not cycle.response_started
