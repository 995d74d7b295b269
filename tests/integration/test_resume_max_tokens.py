"""A resumed answer under max_tokens ends exactly where the same answer unbroken ends: the
mock cuts each stream twice, the client continues it, and the result must equal the mock's
own answer for that max_tokens (text, reasoning and finish_reason)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unbroken import Client, RetryPolicy
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=3)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        MockServer(CONFIG) as mock,
        Client(api_key="sk", base_url=mock.url, retry=RetryPolicy(wait_initial_s=0.01)) as c,
    ):
        yield c


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_resumed_answers_end_at_max_tokens(client: Client, model: str) -> None:
    """Broken twice, each answer equals the unbroken one capped at its max_tokens."""
    wrong = []
    for i in range(16):
        max_tokens = 20 + 3 * i
        messages = [{"role": "user", "content": f"Question {i}: tell me about streams."}]
        reasoning, content = answer_text(model, messages, config=CONFIG, max_tokens=max_tokens)
        done = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            extra_headers={
                "X-Mock-Fault": "reset after=8 times=2",
                "X-Mock-Fault-Key": f"{model}-{i}",
            },
        )
        message = done.choices[0].message
        assert done.unbroken.resumes == 2
        if (message.content or "", message.reasoning_content or "") != (content, reasoning):
            wrong.append((max_tokens, len(message.content or ""), len(content)))
    assert wrong == []
