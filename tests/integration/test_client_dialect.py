"""Continuation that adapts to the server: against the mock answering 404 on `/beta` (as
vLLM and llama.cpp servers do), the default `auto` dialect switches the route to vLLM's
way at once, remembers it, and every answer arrives whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unbroken import Client
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=21, beta=False)


@pytest.fixture(scope="module")
def no_beta() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


def test_auto_dialect_learns_the_vllm_way_on_a_404(no_beta: MockServer) -> None:
    """First break: `/beta` answers 404, the continuation goes the vLLM way at once and
    the answer is whole; second break: straight to the vLLM way (remembered)."""
    no_beta.reset()
    with Client(api_key="sk", base_url=no_beta.url) as client:
        for i in range(2):
            messages = [{"role": "user", "content": f"Adapt, please ({i})."}]
            stream = client.chat.completions.create(
                model="deepseek-chat",
                messages=messages,
                stream=True,
                extra_headers={
                    "X-Mock-Fault": "reset after=6 times=1",
                    "X-Mock-Fault-Key": f"d{i}",
                },
            )
            text = "".join(ch.delta.content or "" for c in stream for ch in c.choices if ch.delta)
            assert text == answer_text("deepseek-chat", messages, config=CONFIG)[1]
            final = stream.final()
            assert final.unbroken is not None
            assert final.unbroken.attempts[0].outcome == "truncated"
    log = [(e["path"], e["status"]) for e in no_beta.log(100) if "chat" in str(e["path"])]
    assert log == [
        ("/chat/completions", 200),  # answer 1, broken
        ("/beta/chat/completions", 404),  # DeepSeek's way: not here
        ("/chat/completions", 200),  # the vLLM way, at once
        ("/chat/completions", 200),  # answer 2, broken
        ("/chat/completions", 200),  # the vLLM way straight away
    ]
    assert no_beta.stats().get("prefix_mismatches", 0) == 0
