"""The SDK talking to an unbroken gateway: when its connection breaks mid-answer it
reconnects to the gateway's stream log (Last-Event-ID) instead of asking upstream for a
continuation, so the answer is whole and costs no extra upstream tokens; stopping a stream
early stops the gateway's answer too."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest

import unbroken
from tests.cluster import FaultProxy
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text
from unbroken.settings import GatewaySettings, Settings

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=31)
MESSAGES = [{"role": "user", "content": "Reconnect me to the log, please."}]
SLOW = {"X-Mock-Tokens": "60", "X-Mock-Token-Ms": "10"}
N_STREAMS = 20


@pytest.fixture
def upstream() -> Iterator[MockServer]:
    """A fresh mock: the tests count its requests."""
    with MockServer(MOCK) as server:
        yield server


@pytest.fixture
def gateway_url(upstream: MockServer) -> Iterator[str]:
    """A gateway (memory store) in front of the mock."""
    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(forward_headers=("x-mock-*",)),
    )
    with ServerThread(create_app(settings), lifespan="on") as server:
        yield server.url


def proxy_cutting_posts(url: str, seed: int) -> FaultProxy:
    """A fault proxy that cuts each POST's connection at a random offset past its headers
    (an answer here is ~12 KB on the wire)."""
    rng = random.Random(seed)  # test data
    host, port = url.removeprefix("http://").split(":")

    def cut(_: int, head: bytes) -> int | None:
        return rng.randrange(600, 9000) if head.startswith(b"POST ") else None

    return FaultProxy((host, int(port)), cut)


def test_async_client_reconnects_to_the_log(upstream: MockServer, gateway_url: str) -> None:
    """Cut mid-answer, 20 concurrent AsyncClient streams end identical, with no resume and
    one upstream request each."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=60)

    async def main(base_url: str) -> list[unbroken.Answer]:
        async with unbroken.AsyncClient(api_key="sk-gw", base_url=base_url + "/v1") as client:

            async def one() -> unbroken.Answer:
                stream = await client.chat.completions.create(
                    model="deepseek-chat", messages=MESSAGES, stream=True, extra_headers=SLOW
                )
                async for _ in stream:
                    pass
                return await stream.final()

            return await asyncio.gather(*(one() for _ in range(N_STREAMS)))

    with proxy_cutting_posts(gateway_url, 3) as proxy:
        answers = asyncio.run(main(proxy.url))
        assert proxy.n_cut == N_STREAMS
    for answer in answers:
        assert answer.choices[0].message.content == content
        assert answer.unbroken.resumes == 0
    stats = upstream.stats()
    assert stats["requests_total"] == N_STREAMS
    assert stats["streams"]["cancelled"] == 0


def test_sync_client_reconnects_to_the_log(upstream: MockServer, gateway_url: str) -> None:
    """The blocking Client does the same."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK, n_tokens=60)
    with proxy_cutting_posts(gateway_url, 4) as proxy:
        for _ in range(3):
            # A fresh pool each time: the proxy cuts new connections that start with a POST.
            with unbroken.Client(api_key="sk-gw", base_url=proxy.url + "/v1") as client:
                stream = client.chat.completions.create(
                    model="deepseek-chat", messages=MESSAGES, stream=True, extra_headers=SLOW
                )
                text = "".join(
                    (c.choices[0].delta and c.choices[0].delta.content) or ""
                    for c in stream
                    if c.choices
                )
                assert text == content
                assert stream.final().unbroken.resumes == 0
        assert proxy.n_cut == 3
    assert upstream.stats()["requests_total"] == 3


def test_stopping_the_stream_stops_the_gateway_answer(
    upstream: MockServer, gateway_url: str
) -> None:
    """Closing an SDK stream early sends DELETE: the gateway cancels the upstream rather
    than generating on for a reconnect that will never come."""
    slow = {"X-Mock-Tokens": "2000", "X-Mock-Token-Ms": "20"}
    with unbroken.Client(api_key="sk-gw", base_url=gateway_url + "/v1") as client:
        stream = client.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, stream=True, extra_headers=slow
        )
        for i, _ in enumerate(stream):
            if i == 5:
                break
        stream.close()
    deadline = time.monotonic() + 2.0
    while upstream.stats()["streams"]["cancelled"] < 1:
        assert time.monotonic() < deadline, "the upstream was not cancelled"
        time.sleep(0.02)  # polling another server's counters
