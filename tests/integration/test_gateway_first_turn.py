"""The way to an answer's first token on the gateway's own protocol: a chat request whose
bytes arrive in one read is checked, admitted and sent upstream within that read's loop
callback (gateway/eager.py, guard.py `_start_eager`, streams.py `Producer.start_now`), not
in later turns of the loop; the answer is then relayed whole as before."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from unbroken.gateway.app import create_app
from unbroken.gateway.guard import guarded_protocol
from unbroken.gateway.upstream import LeanTransport
from unbroken.mock import MockConfig, MockServer
from unbroken.settings import GatewaySettings, LimitSettings, Settings
from unbroken.stores.memory import MemoryStore

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def chat_bytes(n: int) -> bytes:
    body = json.dumps(
        {
            "model": "deepseek-chat",
            "stream": True,
            "messages": [{"role": "user", "content": f"question {n}"}],
        }
    ).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def chats_seen(mock: MockServer) -> int:
    """Chat requests the mock has received (its own counters; it serves in its thread)."""
    by_route: dict[str, dict[str, int]] = mock.stats()["requests"]
    return sum(
        sum(by_status.values())
        for route, by_status in by_route.items()
        if route.endswith("/chat/completions")
    )


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One streamed response, read to its chunked end."""
    data = b""
    while not (b"data: [DONE]" in data and data.endswith(b"0\r\n\r\n")):
        part = await asyncio.wait_for(reader.read(65536), 10)
        assert part, f"the gateway closed the connection; got {data[-300:]!r}"
        data += part
    return data


def serve_on_uvloop(main: Any) -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class RemoteLevels(MemoryStore):
    """A memory store whose bucket levels (the rate-limit headers' reads) answer in a later
    turn of the loop, as a remote store's round trip does."""

    async def level(self, key: str, capacity: float, refill_per_s: float, now: float) -> float:
        await asyncio.sleep(0)
        return await super().level(key, capacity, refill_per_s, now)


def recording_protocols(app: Any) -> tuple[Callable[[], asyncio.Protocol], list[asyncio.Protocol]]:
    """A protocol factory serving `app` as `unbroken serve` does, and the list of the
    protocols it made (a test hands one request bytes as the loop would)."""
    config = uvicorn.Config(app, http=guarded_protocol(app.guard), lifespan="off")
    config.load()
    state = ServerState()
    protocols: list[asyncio.Protocol] = []

    def protocol() -> asyncio.Protocol:
        made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]  # uvicorn's protocols take these
            config=config, server_state=state, app_state={}
        )
        protocols.append(made)
        return made

    return protocol, protocols


@pytest.mark.parametrize("limited", [False, True], ids=["plain", "rate_limited"])
def test_the_upstream_request_is_written_in_the_turn_the_request_arrives(limited: bool) -> None:
    """`rate_limited`: the answer's x-ratelimit-* headers are read from the store after the
    upstream request is written, not before it."""
    with MockServer(MockConfig(seed=2)) as mock:
        limits = LimitSettings(requests_per_minute=1000) if limited else LimitSettings()
        app = create_app(
            Settings(api_key="sk-up", base_url=mock.url, gateway=GatewaySettings(limits=limits)),
            store=RemoteLevels(),
        )
        protocol, protocols = recording_protocols(app)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(protocol, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                # A first answer: the upstream connection is open and idle in the pool.
                writer.write(chat_bytes(1))
                first = await answer(reader)
                assert first.startswith(b"HTTP/1.1 200")
                before = chats_seen(mock)
                # The next request's bytes as the loop hands a read to the protocol; the
                # loop does not turn until the mock has seen the upstream request (or the
                # deadline passes: then it was left for a later turn).
                protocols[0].data_received(chat_bytes(2))
                deadline = time.monotonic() + 10
                while chats_seen(mock) == before and time.monotonic() < deadline:
                    # Blocking on purpose: the loop must not turn; the mock serves in its thread.
                    time.sleep(0.005)  # noqa: ASYNC251
                assert chats_seen(mock) == before + 1, "not sent upstream within the read"
                second = await answer(reader)
                assert second.startswith(b"HTTP/1.1 200")
                assert second.count(b"data: {") >= 3  # role, content..., usage: whole
                assert (b"x-ratelimit-limit-requests: 1000" in second) is limited
            finally:
                writer.close()
                server.close()
                await app.aclose()

        serve_on_uvloop(main)


def test_an_answer_started_from_the_ready_queue_is_relayed_from_the_heads_read() -> None:
    """Request bytes that came with the connection as it was accepted reach the protocol
    from the loop's ready queue (gateway/accept.py); the producer's task made there has its
    own first step only in the loop's next pass over that queue, after the next poll for
    I/O (uvloop). The upstream's head read in that poll goes on to the client's response
    head and first events within the read's callback, not one or two passes later."""
    with MockServer(MockConfig(seed=2)) as mock:
        app = create_app(Settings(api_key="sk-up", base_url=mock.url))
        protocol, protocols = recording_protocols(app)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(protocol, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = writer.get_extra_info("socket")
            try:
                writer.write(chat_bytes(1))
                assert (await answer(reader)).startswith(b"HTTP/1.1 200")
                # The pool's idle upstream connections (the next request takes one).
                pool = app.client._transport
                assert isinstance(pool, LeanTransport)
                upstream = [
                    conn.transport.get_extra_info("socket")
                    for idle in pool._idle.values()
                    for conn in idle
                    if conn.transport is not None
                ]
                assert upstream
                seen: list[bool] = []

                def before_the_next_pass() -> None:
                    # A timer due now runs after the poll and before the ready queue.
                    seen.append(bool(select.select([client], [], [], 0)[0]))

                def accepted_with_bytes() -> None:
                    protocols[0].data_received(chat_bytes(2))  # sent upstream here
                    # The loop must not turn before the upstream's head and first event
                    # are in its socket (peeked at, left for the loop's read).
                    readable = select.select(upstream, [], [], 10)[0]
                    assert readable, "the upstream did not answer"
                    deadline = time.monotonic() + 10
                    # (uvloop's socket objects do not read: a duplicate of its descriptor.)
                    with socket.fromfd(readable[0].fileno(), socket.AF_INET, 0) as peek:
                        while b"data: {" not in peek.recv(65536, socket.MSG_PEEK):
                            assert time.monotonic() < deadline, "no event from the upstream"
                            # Blocking on purpose: the loop must not turn; the mock serves
                            # in its thread.
                            time.sleep(0.001)
                    loop.call_later(0, before_the_next_pass)

                loop.call_soon(accepted_with_bytes)
                second = await answer(reader)
                assert seen == [True], "the response started after the head's read"
                assert second.startswith(b"HTTP/1.1 200")
                assert second.count(b"data: {") >= 3  # role, content..., usage: whole
            finally:
                writer.close()
                server.close()
                await app.aclose()

        serve_on_uvloop(main)
