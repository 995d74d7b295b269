"""gateway/detach.py: the detached reader's waiter, and `run_asgi`/`resume_asgi` ending a
request as uvicorn's `run_asgi` does (on uvicorn's own request cycle over a transport
stand-in that records what is written)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from unbroken.gateway.detach import Detached, Parked, resume_asgi, run_asgi

pytestmark = pytest.mark.anyio

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_detach", default="-")


class _Transport:
    """A transport stand-in: what was written, and whether it was closed."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Protocol:
    """The protocol side `run_asgi` talks to: its response callback, and the resumption
    of a detached request (what gateway/guard.py's protocol does, recorded)."""

    def __init__(self) -> None:
        self.responses = 0
        self.resumed: list[tuple[Detached, str]] = []

    def __call__(self) -> None:
        # The cycle's `on_response` is the protocol itself (gateway/guard.py).
        self.responses += 1

    def resume_task(
        self, cycle: RequestResponseCycle, detached: Detached, context: contextvars.Context
    ) -> None:
        self.resumed.append((detached, context.run(VAR.get)))


def _cycle(protocol: _Protocol) -> tuple[RequestResponseCycle, _Transport]:
    transport = _Transport()
    scope: Any = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "http_version": "1.1",
        "client": ("127.0.0.1", 1),
        "headers": [],
    }
    cycle = RequestResponseCycle(
        scope=scope,
        transport=transport,  # type: ignore[arg-type]  # the stand-in
        flow=FlowControl(transport),  # type: ignore[arg-type]  # the stand-in
        logger=logging.getLogger("test_detach"),
        access_logger=logging.getLogger("test_detach.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=protocol,
    )
    return cycle, transport


async def _start(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first", "more_body": True})


def test_a_waiter_woken_before_it_parks_resumes_once_when_it_parks() -> None:
    """`set_result` before `park` (the task has not ended yet) resumes at `park`; a second
    `set_result` does nothing; `done` says whether it was woken."""
    spawned: list[Detached] = []
    waiter = Detached(producer=None, sink=None)
    assert not waiter.done()
    waiter.set_result(None)
    waiter.set_result(None)
    assert waiter.done()
    assert spawned == []
    cycle: Any = object()  # not used by the waiter itself

    class Resumer:
        def resume_task(self, cycle: Any, detached: Detached, context: Any) -> None:
            spawned.append(detached)

    waiter.park(cycle, Resumer())
    assert spawned == [waiter]
    waiter.set_result(None)
    assert spawned == [waiter]


def test_carry_takes_the_layers_state() -> None:
    before = Detached(producer="p1", sink="s1")
    before.gateway, before.writer, before.stream_id = "g", "w", "strm"
    before.streamed, before.cache_key, before.observed = "b", "k", "o"
    before.ex, before.record, before.path = "ex", "r", "/v1/chat/completions"
    before.method = "POST"
    again = Detached(producer="p2", sink="s2")
    again.carry(before)
    assert (again.producer, again.sink) == ("p2", "s2")
    assert (again.gateway, again.writer, again.stream_id) == ("g", "w", "strm")
    assert (again.streamed, again.cache_key, again.observed) == ("b", "k", "o")
    assert (again.ex, again.record, again.path) == ("ex", "r", "/v1/chat/completions")
    assert again.method == "POST"


async def test_a_parked_app_ends_its_task_and_resumes_in_its_context() -> None:
    """The app detaches mid-response: `run_asgi` returns leaving the response open (no
    error, not closed, the response callback kept); woken, the rest runs through the
    protocol's `resume_task` in the request's context, and ends the response."""
    protocol = _Protocol()
    cycle, transport = _cycle(protocol)
    waiter = Detached(producer=None, sink=None)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        VAR.set("request-1")
        await _start(send)
        raise Parked(waiter)

    await asyncio.create_task(run_asgi(cycle, app))
    assert b"first" in transport.written
    assert not transport.closed
    assert cycle.on_response is protocol
    assert protocol.resumed == []
    waiter.set_result(None)
    assert protocol.resumed == [(waiter, "request-1")]

    class _Gateway:
        async def _http_resume(self, detached: Detached) -> None:
            await cycle.send({"type": "http.response.body", "body": b"last", "more_body": False})

    waiter.gateway = _Gateway()
    await resume_asgi(cycle, waiter)
    assert transport.written.endswith(b"0\r\n\r\n")
    assert protocol.responses == 1
    assert not transport.closed


@pytest.mark.parametrize(
    ("behaviour", "status"),
    [
        ("raise_before_start", b"500"),
        ("return_before_start", b"500"),
        ("raise_after_start", None),
        ("return_unfinished", None),
        ("return_a_value", None),
    ],
)
async def test_run_asgi_ends_a_request_as_uvicorn_does(
    behaviour: str, status: bytes | None
) -> None:
    """An app that fails or returns early: a 500 (with `connection: close`) when nothing
    was sent, and the connection closed; the response callback is dropped."""
    protocol = _Protocol()
    cycle, transport = _cycle(protocol)

    async def app(scope: Any, receive: Any, send: Any) -> Any:
        if behaviour in ("raise_after_start", "return_unfinished", "return_a_value"):
            await _start(send)
        if behaviour.startswith("raise"):
            raise RuntimeError("boom")
        return 1 if behaviour == "return_a_value" else None

    await run_asgi(cycle, app)
    if status is not None:
        assert transport.written.startswith(b"HTTP/1.1 " + status)
    else:
        assert b"HTTP/1.1 500" not in transport.written
    assert transport.closed
    assert cycle.on_response is not protocol
