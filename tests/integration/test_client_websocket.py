"""Client and AsyncClient with `transport="websocket"` against a real gateway and mock over
loopback: the same answers, events and errors as over HTTP/SSE, several answers on one
connection, timers, and answers that survive a TCP proxy cutting the WebSocket mid-answer
(reconnect + resume: byte-identical, no gap, no repeat)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import unbroken
from tests.cluster import FaultProxy
from unbroken import (
    AsyncClient,
    Client,
    ConfigError,
    RetryPolicy,
    TextEvent,
    Timeouts,
    UpstreamTimeout,
)
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, Settings, hash_key

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Which sizes does the jacket come in?"}]
GATEWAY_KEY = "sk-gw-" + "w" * 20
FAST = RetryPolicy(attempts=3, wait_initial_s=0.01, wait_max_s=0.05)


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=19)) as server:
        yield server


@contextmanager
def gateway(mock: MockServer, **options: Any) -> Iterator[ServerThread]:
    settings = Settings(
        api_key="sk-test",
        base_url=mock.url,
        gateway=GatewaySettings(forward_headers=("x-mock-*",), **options),
    )
    with ServerThread(create_app(settings), lifespan="on", ws="websockets-sansio") as server:
        yield server


@pytest.fixture(scope="module")
def server(mock: MockServer) -> Iterator[ServerThread]:
    """One gateway with a key (and quick upstream retries) for the module's tests."""
    keys = (KeySettings("app", hash_key(GATEWAY_KEY)),)
    with gateway(
        mock, keys=keys, retry_attempts=2, retry_wait_initial_s=0.01, retry_wait_max_s=0.02
    ) as running:
        yield running


def text(chunks: list[unbroken.ChatCompletionChunk]) -> str:
    return "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta
    )


def first_cut_at(offset: int) -> Callable[[int, bytes], int | None]:
    """A FaultProxy cut: the first connection at `offset` bytes, no other."""
    return lambda index, head: offset if index == 0 else None


def ask(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {n}: which colours and sizes are there?"}]


def test_same_answers_events_and_meta_as_http(server: ServerThread) -> None:
    """Streamed, non-streamed and typed-event answers over the WebSocket equal the SSE
    ones, with one complete attempt and the stream's response marked as the gateway's."""
    base = server.url + "/v1"
    with (
        Client(api_key=GATEWAY_KEY, base_url=base, transport="websocket") as ws,
        Client(api_key=GATEWAY_KEY, base_url=base) as http,
    ):
        stream = ws.chat.completions.create(
            model="deepseek-reasoner", messages=QUESTION, stream=True
        )
        chunks = list(stream)
        answer = stream.final()
        folded = ws.chat.completions.create(model="deepseek-chat", messages=QUESTION)
        events = list(ws.chat.stream(model="deepseek-chat", messages=QUESTION))
        reference = http.chat.completions.create(model="deepseek-reasoner", messages=QUESTION)
        chat_reference = http.chat.completions.create(model="deepseek-chat", messages=QUESTION)
        response = stream.response
    assert text(chunks) == reference.choices[0].message.content != ""
    assert (
        answer.choices[0].message.reasoning_content
        == reference.choices[0].message.reasoning_content
    )
    assert answer.choices[0].message.reasoning_content
    assert answer.choices[0].finish_reason == "stop"
    assert [a.outcome for a in answer.unbroken.attempts] == ["complete"]
    assert folded.choices[0].message.content == chat_reference.choices[0].message.content
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == (
        chat_reference.choices[0].message.content
    )
    assert response.headers["x-unbroken-stream-id"].startswith("strm_")


def test_gateway_errors_map_to_the_http_classes(server: ServerThread) -> None:
    """An error frame before any chunk raises what the HTTP path raises for the same
    request, by the gateway's status: a wrong key, an unknown model, an upstream that keeps
    failing (502 after retries) or rejects the prompt (400)."""
    base = server.url + "/v1"
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("sk-wrong-key-000000000000", "deepseek-chat", {}),
        (GATEWAY_KEY, "no-such-model", {}),
        (GATEWAY_KEY, "deepseek-chat", {"X-Mock-Fault": "503"}),
        (GATEWAY_KEY, "deepseek-chat", {"X-Mock-Fault": "context_length"}),
    ]
    raised: list[tuple[BaseException, BaseException]] = []
    for key, model, headers in cases:
        pair: list[BaseException] = []
        for transport in ("websocket", "http"):
            with (
                Client(api_key=key, base_url=base, transport=transport, retry=FAST) as c,
                pytest.raises(unbroken.UnbrokenError) as info,
            ):
                c.chat.completions.create(model=model, messages=QUESTION, extra_headers=headers)
            pair.append(info.value)
        ws_error, http_error = pair
        assert type(ws_error) is type(http_error), (model, headers, ws_error, http_error)
        assert getattr(ws_error, "status_code", None) == getattr(http_error, "status_code", None)
        assert "sk-wrong" not in str(ws_error)
        raised.append((ws_error, http_error))
    assert isinstance(raised[0][0], unbroken.AuthenticationError)
    assert isinstance(raised[1][0], unbroken.NotFoundError)
    assert isinstance(raised[2][0], unbroken.InternalServerError)
    assert isinstance(raised[3][0], unbroken.BadRequestError)


def test_answers_share_one_connection(server: ServerThread) -> None:
    """Concurrent AsyncClient answers share WebSocket connections, up to the gateway's 32
    answers per connection: 40 answers take two TCP connections through a counting proxy,
    each answer whole and its own."""
    port = int(server.url.rsplit(":", 1)[1])
    http_base = server.url + "/v1"
    slow = {"X-Mock-Token-Ms": "5"}  # every answer is still running when the last starts

    async def run(base: str) -> list[str]:
        async with AsyncClient(api_key=GATEWAY_KEY, base_url=base, transport="websocket") as c:

            async def one(n: int) -> str:
                answer = await c.chat.completions.create(
                    model="deepseek-chat", messages=ask(n), extra_headers=slow
                )
                return answer.choices[0].message.content or ""

            return list(await asyncio.gather(*(one(n) for n in range(40))))

    with Client(api_key=GATEWAY_KEY, base_url=http_base) as http:
        expected = [
            http.chat.completions.create(model="deepseek-chat", messages=ask(n))
            .choices[0]
            .message.content
            for n in range(40)
        ]
    with FaultProxy(("127.0.0.1", port), lambda i, head: None) as proxy:
        got = asyncio.run(run(proxy.url + "/v1"))
        n_connections = proxy._n
    assert got == expected
    assert len(set(got)) == 40
    assert n_connections == 2


def test_cut_connection_resumes_byte_identical_sync(server: ServerThread) -> None:
    """A proxy cuts each client's first WebSocket at a random byte mid-answer: the blocking
    client reconnects, resumes after its last event and ends with the fault-free answer
    (every chunk once), in one attempt."""
    port = int(server.url.rsplit(":", 1)[1])
    headers = {"X-Mock-Token-Ms": "2"}
    rng = random.Random(3)
    with Client(api_key=GATEWAY_KEY, base_url=server.url + "/v1") as http:
        expected = [
            http.chat.completions.create(model="deepseek-chat", messages=ask(n))
            .choices[0]
            .message.content
            for n in range(8)
        ]
    got: list[str] = []
    cuts = 0
    for n in range(8):
        offset = rng.randrange(600, 2_500)
        with (
            FaultProxy(("127.0.0.1", port), first_cut_at(offset)) as proxy,
            Client(api_key=GATEWAY_KEY, base_url=proxy.url + "/v1", transport="websocket") as c,
        ):
            stream = c.chat.completions.create(
                model="deepseek-chat", messages=ask(n), stream=True, extra_headers=headers
            )
            chunks = list(stream)
            got.append(text(chunks))
            assert [a.outcome for a in stream.final().unbroken.attempts] == ["complete"]
            cuts += proxy.n_cut
    assert cuts == 8
    assert got == expected


def test_cut_shared_connection_resumes_every_answer_async(server: ServerThread) -> None:
    """Twenty answers multiplexed on one AsyncClient connection; the proxy cuts it twice
    mid-answer: every answer resumes on the next connection and ends byte-identical."""
    port = int(server.url.rsplit(":", 1)[1])
    headers = {"X-Mock-Token-Ms": "3"}
    with Client(api_key=GATEWAY_KEY, base_url=server.url + "/v1") as http:
        expected = [
            http.chat.completions.create(model="deepseek-chat", messages=ask(100 + n))
            .choices[0]
            .message.content
            for n in range(20)
        ]

    async def run(base: str) -> list[str]:
        async with AsyncClient(api_key=GATEWAY_KEY, base_url=base, transport="websocket") as c:

            async def one(n: int) -> str:
                stream = await c.chat.completions.create(
                    model="deepseek-chat", messages=ask(100 + n), stream=True, extra_headers=headers
                )
                return text([chunk async for chunk in stream])

            return list(await asyncio.gather(*(one(n) for n in range(20))))

    cuts = {0: 3_000, 1: 9_000}
    with FaultProxy(("127.0.0.1", port), lambda i, head: cuts.get(i)) as proxy:
        got = asyncio.run(run(proxy.url + "/v1"))
        n_cut = proxy.n_cut
    assert n_cut == 2
    assert got == expected


def test_timers_are_honoured(server: ServerThread) -> None:
    """The idle timer cuts a stalled answer and the deadline bounds the whole answer, as
    over HTTP (typed UpstreamTimeout with the phase)."""
    base = server.url + "/v1"
    once = RetryPolicy(attempts=1)
    stall = {"X-Mock-Fault": "stall after=3 ms=5000"}
    with Client(
        api_key=GATEWAY_KEY,
        base_url=base,
        transport="websocket",
        retry=once,
        timeouts=Timeouts(idle_s=0.3),
    ) as c:
        with pytest.raises(UpstreamTimeout) as idle:
            list(
                c.chat.completions.create(
                    model="deepseek-chat", messages=QUESTION, stream=True, extra_headers=stall
                )
            )
        with pytest.raises(UpstreamTimeout) as deadline:
            c.chat.completions.create(
                model="deepseek-chat",
                messages=QUESTION,
                extra_headers={"X-Mock-Token-Ms": "200"},
                deadline=0.5,
            )
    assert idle.value.phase == "idle"
    assert deadline.value.phase == "deadline"


def test_bad_transport_values_are_typed_errors() -> None:
    """A transport that is neither http, websocket nor an httpx transport: a ConfigError
    naming the value."""
    with pytest.raises(ConfigError, match="'carrier-pigeon'"):
        Client(api_key="k", base_url="http://127.0.0.1:9", transport="carrier-pigeon")  # type: ignore[arg-type]  # the bad value on purpose
    with pytest.raises(ConfigError, match="'ws'"):
        AsyncClient(api_key="k", base_url="http://127.0.0.1:9", transport="ws")  # type: ignore[arg-type]  # the bad value on purpose


def test_a_server_without_the_socket_says_so(mock: MockServer) -> None:
    """Against a plain upstream (the mock has no /v1/chat/ws) the handshake's refusal is a
    typed status error that says the transport needs an unbroken gateway."""
    with (
        Client(api_key="sk-test", base_url=mock.url, transport="websocket", max_retries=0) as c,
        pytest.raises(unbroken.UpstreamStatusError, match="unbroken gateway"),
    ):
        c.chat.completions.create(model="deepseek-chat", messages=QUESTION)


def test_stopping_a_stream_early_cancels_the_gateway_answer(
    server: ServerThread, mock: MockServer
) -> None:
    """Closing a WebSocket stream after a few chunks sends `cancel`: the mock logs the
    request as cancelled within seconds, long before its 2,000 tokens (10 s) would end,
    and the connection goes on serving answers."""
    headers = {"X-Mock-Token-Ms": "5", "X-Mock-Tokens": "2000"}
    question = [{"role": "user", "content": "Tell me everything about the jacket."}]
    before = len(mock.log(1000))
    with Client(api_key=GATEWAY_KEY, base_url=server.url + "/v1", transport="websocket") as c:
        stream = c.chat.completions.create(
            model="deepseek-chat", messages=question, stream=True, extra_headers=headers
        )
        for n, _ in enumerate(stream):
            if n == 5:
                break
        stream.close()
        again = c.chat.completions.create(model="deepseek-chat", messages=QUESTION)
    assert again.choices[0].finish_reason == "stop"
    cancelled: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        cancelled = [e for e in mock.log(1000)[before:] if e.get("outcome") == "cancelled"]
        time.sleep(0.05)  # polling the mock's log: it is written when a request ends
    assert cancelled
    assert cancelled[0]["chunks"] < 2000


def test_async_errors_and_timers(server: ServerThread) -> None:
    """AsyncClient over the WebSocket: a wrong key is an AuthenticationError, a stalled
    answer trips the idle timer, and a closed client opens no new connection."""
    base = server.url + "/v1"
    stall = {"X-Mock-Fault": "stall after=3 ms=5000"}

    async def run() -> tuple[BaseException, BaseException, BaseException]:
        async with AsyncClient(
            api_key="sk-wrong-key-000000000000", base_url=base, transport="websocket"
        ) as bad:
            with pytest.raises(unbroken.AuthenticationError) as refused:
                await bad.chat.completions.create(model="deepseek-chat", messages=QUESTION)
        client = AsyncClient(
            api_key=GATEWAY_KEY,
            base_url=base,
            transport="websocket",
            retry=RetryPolicy(attempts=1),
            timeouts=Timeouts(idle_s=0.3),
        )
        with pytest.raises(UpstreamTimeout) as idle:
            await client.chat.completions.create(
                model="deepseek-chat", messages=QUESTION, extra_headers=stall
            )
        await client.aclose()
        with pytest.raises(unbroken.APIConnectionError) as closed:
            await client.chat.completions.create(model="deepseek-chat", messages=QUESTION)
        return refused.value, idle.value, closed.value

    refused, idle, closed = asyncio.run(run())
    assert getattr(refused, "status_code", None) == 401
    assert isinstance(idle, UpstreamTimeout)
    assert idle.phase == "idle"
    assert "closed" in str(closed)
