"""The gateway while it heals an answer: keep-alives hide the upstream's silence, the
official openai SDK reads them without error, and each key recovers from its own share of
the retry budgets."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.servers import raw_exchange
from tests.support import gateway_thread as gateway
from unbroken.core import ChatStreamDecoder, ChunkAccumulator
from unbroken.mock import MockConfig, MockServer, answer_text
from unbroken.settings import KeySettings, hash_key

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=4)
MESSAGES = [{"role": "user", "content": "Explain keep-alives."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


def test_keepalives_at_least_every_5_s_while_a_stall_is_healed(upstream: MockServer) -> None:
    """The upstream goes silent mid-answer for longer than the idle limit: the gateway
    heals the answer (a continuation) and, meanwhile, sends a keep-alive at least every
    5 s with its default keepalive_s; the client gets the whole answer once."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    fault = {"X-Mock-Fault": "stall after=4 ms=60000 times=1", "X-Mock-Fault-Key": "heal-1"}
    with gateway(upstream.url, idle_s=9.0) as server:
        result = raw_exchange(
            server.url, BODY, path="/v1/chat/completions", headers=fault, timeout_s=20
        )
    assert result.status == 200
    moments = [t for t, _ in result.times]
    gaps = [b - a for a, b in itertools.pairwise(moments)]
    assert max(gaps) <= 5.0, gaps
    assert sum(gap > 3.0 for gap in gaps) >= 1  # the silence really happened
    assert b": keep-alive" in result.body
    decoder, answer = ChatStreamDecoder(), ChunkAccumulator()
    for chunk in decoder.feed(result.body):
        answer.feed(chunk)
    assert answer.content(0) == content
    assert answer.finish_reason(0) == "stop"


@pytest.mark.anyio
async def test_openai_sdk_reads_keepalives_between_events(upstream: MockServer) -> None:
    """Keep-alive comments between `id:`-numbered events do not trip the official openai
    SDK (whose decoder turns a blank line after any `id:` into an empty event)."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    with gateway(upstream.url, keepalive_s=0.1) as server:
        client = openai.AsyncOpenAI(api_key="sk", base_url=f"{server.url}/v1")
        try:
            stream: Any = await client.chat.completions.create(
                model="deepseek-chat",
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
                extra_headers={"X-Mock-Token-Ms": "60"},
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        finally:
            await client.close()
    assert "".join(parts) == content


@pytest.mark.anyio
async def test_one_keys_failures_do_not_spend_another_keys_recovery(
    upstream: MockServer,
) -> None:
    """A key flooding a failing route spends only its own share of the retry budget: a
    victim key's broken streams are all healed meanwhile."""
    keys = (
        KeySettings("flood", hash_key("sk-flood")),
        KeySettings("victim", hash_key("sk-victim")),
    )
    budget = {"retry_budget_ratio": 1.0, "retry_budget_min_per_s": 0.1, "retry_budget_window_s": 5}
    with gateway(upstream.url, keys=keys, retry_wait_initial_s=0.01, **budget) as server:
        url = f"{server.url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as http:

            async def flood(i: int) -> int:
                headers = {"Authorization": "Bearer sk-flood", "X-Mock-Fault": "503"}
                body = {**BODY, "stream": False, "messages": [{"role": "user", "content": str(i)}]}
                response = await http.post(url, json=body, headers=headers, timeout=3)
                return response.status_code

            async def victim(i: int) -> str:
                headers = {
                    "Authorization": "Bearer sk-victim",
                    "X-Mock-Fault": "reset after=4 times=1",
                    "X-Mock-Fault-Key": f"victim-{i}",
                }
                messages = [{"role": "user", "content": f"victim {i}"}]
                body = {"model": "deepseek-chat", "messages": messages, "stream": False}
                response = await http.post(url, json=body, headers=headers)
                assert response.status_code == 200, response.text
                got: str = response.json()["choices"][0]["message"]["content"]
                assert got == answer_text("deepseek-chat", messages, config=CONFIG)[1]
                return got

            flooding = [asyncio.create_task(_swallow(flood(i))) for i in range(40)]
            await asyncio.sleep(0.5)  # the flood has spent its key's budget by now
            healed = await asyncio.gather(*(victim(i) for i in range(10)))
            await asyncio.gather(*flooding)
    assert len(healed) == 10


async def _swallow(call: Any) -> None:
    # The flood's own answers may time out: that is its problem, not the victim's.
    with contextlib.suppress(httpx.HTTPError):
        await call
