"""The gateway's HTTP protocol as made per connection: what it takes from uvicorn's config
once, and the addresses it learns from the acceptor instead of the kernel."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from unbroken._flag import Flag
from unbroken.gateway.accept import Acceptor
from unbroken.gateway.guard import Guard, GuardedProtocol, _Cycle, guarded_protocol
from unbroken.gateway.metrics import GatewayMetrics
from unbroken.settings import GatewaySettings

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.integration


async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - not called
    raise AssertionError("no request is made")


def make_guard() -> Guard:
    return Guard(GatewaySettings(), GatewayMetrics(CollectorRegistry()))


def config(**options: Any) -> uvicorn.Config:
    return uvicorn.Config(app, http="httptools", **options)


def made(cls: type[HttpToolsProtocol], cfg: uvicorn.Config) -> HttpToolsProtocol:
    loop = asyncio.new_event_loop()
    try:
        return cls(config=cfg, server_state=ServerState(), app_state={}, _loop=loop)
    finally:
        loop.close()


def test_a_protocol_has_uvicorns_attributes_in_uvicorns_order() -> None:
    """The guarded protocol has every attribute uvicorn's __init__ sets (a uvicorn that
    adds one fails here), with the same values: set per connection, or (the same for every
    connection) at its class level; likewise for a protocol of a second config."""
    cfg = config(root_path="/r", timeout_keep_alive=7, limit_concurrency=9)
    cls = guarded_protocol(make_guard())
    made(cls, config())  # the class holds the first config's values
    ours = made(cls, cfg)
    theirs = made(HttpToolsProtocol, cfg)
    for name in vars(theirs):
        assert hasattr(ours, name), name
    for name in (
        "config",
        "app",
        "logger",
        "access_logger",
        "access_log",
        "ws_protocol_class",
        "root_path",
        "asgi_version",
        "limit_concurrency",
        "timeout_keep_alive",
        "timeout_keep_alive_task",
        "server",
        "client",
        "scheme",
        "scope",
        "headers",
        "expect_100_continue",
        "cycle",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.parser is not theirs.parser


def test_the_config_values_are_taken_once_and_again_for_another_config() -> None:
    """Connections of one config share what was taken from it; a protocol made for another
    config (a second server in the process) gets that config's values, not the first's."""
    guard = make_guard()
    cls = guarded_protocol(guard)
    first = config(root_path="/a", timeout_keep_alive=3, limit_concurrency=5)
    second = config(root_path="/b", timeout_keep_alive=4, limit_concurrency=None)
    one, two = made(cls, first), made(cls, first)
    assert guard.from_config(first) is guard.from_config(first)
    assert (one.root_path, one.timeout_keep_alive, one.limit_concurrency) == ("/a", 3, 5)
    assert one.app is two.app is first.loaded_app
    other = made(cls, second)
    assert (other.root_path, other.timeout_keep_alive, other.limit_concurrency) == ("/b", 4, None)
    assert other.app is second.loaded_app is not first.loaded_app
    assert made(cls, first).root_path == "/a"


def test_the_access_log_switch_follows_handlers_added_while_serving() -> None:
    """As in uvicorn, whether the access log is written is seen per connection."""
    import logging

    cls = guarded_protocol(make_guard())
    cfg = config()
    access = logging.getLogger("uvicorn.access")
    handlers, propagate = access.handlers[:], access.propagate
    access.handlers, access.propagate = [], False
    try:
        assert made(cls, cfg).access_log is False
        access.addHandler(logging.NullHandler())
        assert made(cls, cfg).access_log is True
    finally:
        access.handlers, access.propagate = handlers, propagate


@pytest.mark.parametrize("bound", [True, False])
def test_the_addresses_come_from_accept_and_match_the_kernels(bound: bool) -> None:
    """Through an `Acceptor`, the protocol's client and server addresses are those of the
    socket, and the client's connection is counted under its address; likewise when the
    listener's address is not known to the guard (the loop's socket is asked then)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    guard = make_guard()
    if bound:
        guard.local_address = listener.getsockname()
    cls = guarded_protocol(guard)

    async def main() -> tuple[Any, Any, dict[str, int], tuple[str, int]]:
        protocols: list[GuardedProtocol] = []
        cfg = config()
        state = ServerState()

        def factory() -> GuardedProtocol:
            protocols.append(cls(config=cfg, server_state=state, app_state={}))
            return protocols[-1]

        acceptor = Acceptor(asyncio.get_running_loop(), listener, factory)
        client = socket.create_connection(listener.getsockname(), source_address=("127.0.0.2", 0))
        second = socket.create_connection(listener.getsockname(), source_address=("127.0.0.2", 0))
        try:
            for _ in range(5):  # turns of the loop: the connects are complete, they are queued
                await asyncio.sleep(0)
            protocol, other = protocols
            # The host's str is one for both connections (interned), the ports their own.
            assert other.client is not None
            assert protocol.client is not None
            assert other.client[0] is protocol.client[0]
            assert other.client == second.getsockname()
            counts = dict(guard.per_client)
            return protocol.client, protocol.server, counts, client.getsockname()
        finally:
            client.close()
            second.close()
            acceptor.close()
            await asyncio.sleep(0)

    try:
        peer, server, counts, client_address = uvloop.run(main())
    finally:
        listener_address = listener.getsockname()
        listener.close()
    assert peer == client_address
    assert peer[0] == "127.0.0.2"
    assert server == listener_address
    assert counts == {"127.0.0.2": 2}


def test_a_request_cycle_has_uvicorns_attributes() -> None:
    """The gateway's request cycle has every attribute uvicorn's cycle sets (a uvicorn that
    adds one fails here), with the same start values, its protocol's."""
    protocol: Any = made(guarded_protocol(make_guard()), config())
    transport: Any = object()
    protocol.transport = transport
    protocol.flow = FlowControl(transport)
    scope: Any = {"type": "http"}
    event = Flag()
    ours = _Cycle(protocol, scope, event, False)
    theirs = RequestResponseCycle(
        scope=scope,
        transport=transport,
        flow=protocol.flow,
        logger=protocol.logger,
        access_logger=protocol.access_logger,
        access_log=protocol.access_log,
        default_headers=protocol.server_state.default_headers,
        message_event=event,  # type: ignore[arg-type]  # the same interface
        expect_100_continue=protocol.expect_100_continue,
        keep_alive=False,
        on_response=protocol,
    )
    for name, value in vars(theirs).items():
        assert getattr(ours, name) == value, name
    assert ours.body is not theirs.body  # each request's own


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


HEAD_FIELDS = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: gw.test\r\n"
    b"Content-Type: application/json  \r\n"
    b"X-Mixed-CASE: Value With Spaces\t \r\n"
    b"expect: 100-Continue\r\n"
    b"X-Empty:\r\n"
    b"x-dup: 1\r\n"
    b"X-Dup: 2\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


@pytest.mark.parametrize("head", [HEAD_FIELDS, HEAD_FIELDS.replace(b"100-Continue", b"x")])
def test_header_fields_reach_the_app_as_uvicorn_gives_them(head: bytes) -> None:
    """The fields the app sees (lowered names, values without trailing whitespace, in
    order, duplicates kept) and the 100-continue flag are uvicorn's, though the guarded
    protocol checks and converts them all at the head's end, not one by one."""
    scopes: dict[str, Any] = {}

    def recording(name: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            scopes[name] = scope

        return app

    async def feed(cls: type[HttpToolsProtocol], name: str) -> HttpToolsProtocol:
        cfg = uvicorn.Config(recording(name), http="httptools")
        protocol = cls(config=cfg, server_state=ServerState(), app_state={})
        protocol.connection_made(_Transport())
        protocol.data_received(head)
        expect = protocol.expect_100_continue
        for _ in range(3):
            await asyncio.sleep(0)
        assert protocol.expect_100_continue == expect or name == "theirs"
        scopes[name + "_expect"] = expect
        return protocol

    async def main() -> None:
        await feed(guarded_protocol(make_guard()), "ours")
        await feed(HttpToolsProtocol, "theirs")

    asyncio.run(main())
    assert scopes["ours"]["headers"] == scopes["theirs"]["headers"]
    assert scopes["ours"]["headers"][1] == (b"content-type", b"application/json")
    assert scopes["ours_expect"] == scopes["theirs_expect"] == (b"100-Continue" in head)


def test_a_flood_of_fields_is_refused_at_the_first_too_many() -> None:
    """Fields past `max_headers` are never listed: the read of a head with thousands of
    tiny fields is refused (431) at the first one too many."""
    guard = Guard(GatewaySettings(max_headers=20), GatewayMetrics(CollectorRegistry()))

    async def main() -> tuple[HttpToolsProtocol, _Transport]:
        protocol = guarded_protocol(guard)(
            config=uvicorn.Config(app, http="httptools"), server_state=ServerState(), app_state={}
        )
        transport = _Transport()
        protocol.connection_made(transport)
        fields = b"".join(b"x%d: 1\r\n" % i for i in range(5000))
        protocol.data_received(b"GET /healthz HTTP/1.1\r\n" + fields + b"\r\n")
        return protocol, transport

    protocol, transport = asyncio.run(main())
    assert len(protocol.headers) == 20
    assert transport.writes
    assert transport.writes[0].startswith(b"HTTP/1.1 431 ")
    assert b"too_many_headers" in transport.writes[0]
