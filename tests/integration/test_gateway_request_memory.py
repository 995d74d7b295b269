"""What each request's connection holds on the gateway's own protocol beyond ASGI's needs:
no empty copy of the lifespan state in every scope (a copy when the lifespan set any), and
one str of a client host shared by the connections from it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from tests.integration.test_gateway_first_turn import serve_on_uvloop
from unbroken.gateway.app import create_app
from unbroken.gateway.guard import guarded_protocol
from unbroken.settings import Settings

pytestmark = pytest.mark.integration

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def protocols_with(
    app: Any, app_state: dict[str, Any]
) -> tuple[Callable[[], asyncio.Protocol], list[Any]]:
    """A protocol factory serving `app` as `unbroken serve` does, with the lifespan state
    `app_state`, and the protocols it made."""
    config = uvicorn.Config(app, http=guarded_protocol(app.guard), lifespan="off")
    config.load()
    state = ServerState()
    made: list[Any] = []

    def protocol() -> asyncio.Protocol:
        one: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]  # uvicorn's protocols take these
            config=config, server_state=state, app_state=app_state
        )
        made.append(one)
        return one

    return protocol, made


def served(app_state: dict[str, Any], n_connections: int) -> list[Any]:
    """The protocols of `n_connections` connections that each had a health check answered
    (their last request's scope is still theirs)."""
    app = create_app(Settings(api_key="sk-up", base_url="http://127.0.0.1:9"))
    protocol, made = protocols_with(app, app_state)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        writers = []
        try:
            for _ in range(n_connections):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
                writer.write(HEALTH)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200"), head
        finally:
            for writer in writers:
                writer.close()
            server.close()
            await app.aclose()

    serve_on_uvloop(main)
    assert len(made) == n_connections
    return made


def test_a_scope_holds_no_state_when_the_lifespan_set_none() -> None:
    """No empty dict per request: the key is absent (ASGI: optional)."""
    (protocol,) = served({}, 1)
    assert protocol.scope["path"] == "/healthz"
    assert "state" not in protocol.scope


def test_a_scope_holds_a_copy_of_the_state_the_lifespan_set() -> None:
    """As uvicorn: each request's own shallow copy of the lifespan's state."""
    app_state = {"shared": [1, 2]}
    (protocol,) = served(app_state, 1)
    state = protocol.scope["state"]
    assert state == app_state
    assert state is not app_state
    assert state["shared"] is app_state["shared"]


def test_connections_from_one_host_share_its_str() -> None:
    """The client address of each connection from 127.0.0.1 holds one str of the host, not
    one each; the ports stay each connection's own."""
    first, second = served({}, 2)
    assert first.client[0] == "127.0.0.1"
    assert second.client[0] is first.client[0]
    assert first.client[1] != second.client[1]
    assert first.scope["client"] == first.client


def test_a_streamed_answer_lets_its_requests_parser_go_and_the_connection_serves_on() -> None:
    """Once a streamed answer's head is out, its connection holds no request parser and no
    timer (at once, not after the head timeout); the client's next request on the same
    connection gets a new parser and is answered whole."""
    import gc
    import json
    import socket

    from tests.support import gateway_thread
    from unbroken.gateway.guard import GuardedProtocol
    from unbroken.mock import MockConfig, MockServer

    body = json.dumps(
        {
            "model": "deepseek-chat",
            "stream": True,
            "messages": [{"role": "user", "content": "parsers"}],
        }
    ).encode()

    def chat(tokens: int, token_ms: int) -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Mock-Tokens: {tokens}\r\nX-Mock-Token-Ms: {token_ms}\r\n\r\n"
        ).encode() + body

    def read_to_end(sock: socket.socket) -> bytes:
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            part = sock.recv(65536)
            assert part, data[-200:]
            data += part
        return data

    with (
        MockServer(MockConfig(seed=3)) as mock,
        gateway_thread(mock.url, head_timeout_s=60) as server,
        socket.create_connection((server.host, server.port), timeout=30) as sock,
    ):
        sock.sendall(chat(200, 10))
        data = b""
        while data.count(b"\n\n") < 10:
            data += sock.recv(65536)
        live = [
            o
            for o in gc.get_objects()
            if issubclass(type(o), GuardedProtocol)
            and not o.transport.is_closing()
            and o.scope.get("path") == "/v1/chat/completions"
        ]
        assert len(live) == 1
        parser: Any = live[0].parser
        timer = live[0]._timer
        del live
        first = data + read_to_end(sock)
        # The same connection: the next answer is parsed and served.
        sock.sendall(chat(5, 1))
        second = read_to_end(sock)
    assert parser is None
    assert timer is None
    assert first.count(b"data: {") >= 200
    assert b"data: [DONE]" in first
    assert second.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in second


def test_a_finished_requests_cycle_goes_by_refcount() -> None:
    """A request's cycle (uvicorn's, with the direct body and response hooks its scope
    offered) is freed as soon as its connection and protocol are let go: no reference
    cycle left for the garbage collector (which runs here only when called)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        protocols = served({}, 2)
        cycles = [weakref.ref(p.cycle) for p in protocols]
        assert all(p.scope["path"] == "/healthz" for p in protocols)
        del protocols
        assert [ref() for ref in cycles] == [None, None]
    finally:
        gc.enable()
