"""The mock's FIM (`/beta/completions`), `GET /models/{id}` and OpenAI-shaped usage chunk."""

from __future__ import annotations

import json

import httpx
import pytest

from unbroken.mock import MockConfig, MockServer

pytestmark = pytest.mark.integration

FIM = {"model": "deepseek-chat", "prompt": "def add(a, b):", "suffix": "    return c"}


def _events(body: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


def test_fim_stream_and_json_agree(api: httpx.Client) -> None:
    """The streamed text_completion chunks join to the non-streamed text."""
    whole = api.post("/beta/completions", json=FIM).json()
    assert whole["object"] == "text_completion"
    text = whole["choices"][0]["text"]
    assert text
    assert whole["usage"]["completion_tokens"] > 0
    events = _events(api.post("/beta/completions", json={**FIM, "stream": True}).text)
    assert {e["object"] for e in events} == {"text_completion"}
    assert "".join(str(e["choices"][0]["text"]) for e in events) == text  # type: ignore[index]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]


def test_fim_continues_a_prompt_that_ends_in_part_of_its_answer(api: httpx.Client) -> None:
    """prompt + the first k characters of the answer -> the rest of the answer."""
    text = api.post("/beta/completions", json=FIM).json()["choices"][0]["text"]
    for k in (1, len(text) // 2, len(text) - 1):
        rest = api.post("/beta/completions", json={**FIM, "prompt": FIM["prompt"] + text[:k]})
        assert rest.json()["choices"][0]["text"] == text[k:]


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"model": "deepseek-reasoner"}, 400),
        ({"model": "gpt-4"}, 400),
        ({"prompt": ["a", "b"]}, 422),
        ({"suffix": 3}, 422),
        ({"max_tokens": 5000}, 422),
        ({"messages": []}, 400),
    ],
)
def test_fim_rejects_what_deepseek_rejects(
    api: httpx.Client, change: dict[str, object], status: int
) -> None:
    """A FIM request DeepSeek would refuse gets the same status."""
    response = api.post("/beta/completions", json={**FIM, **change})
    assert response.status_code == status
    assert "error" in response.json()


def test_fim_is_beta_only(api: httpx.Client) -> None:
    """As on DeepSeek, /completions without /beta does not exist."""
    assert api.post("/completions", json=FIM).status_code == 404


def test_models_retrieve(api: httpx.Client) -> None:
    """GET /models/{id} returns the model, or 404 for an unknown one."""
    assert api.get("/models/deepseek-reasoner").json()["id"] == "deepseek-reasoner"
    assert api.get("/v1/models/deepseek-chat").json()["object"] == "model"
    missing = api.get("/models/gpt-4")
    assert missing.status_code == 404
    assert "gpt-4" in missing.json()["error"]["message"]


def test_usage_chunk_option() -> None:
    """With usage_chunk and include_usage, the usage comes alone in a last chunk with no
    choices; without include_usage nothing changes."""
    body = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "u"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    auth = {"Authorization": "Bearer sk"}
    with MockServer(MockConfig(usage_chunk=True)) as mock:
        events = _events(httpx.post(f"{mock.url}/chat/completions", json=body, headers=auth).text)
        plain = _events(
            httpx.post(
                f"{mock.url}/chat/completions", json={**body, "stream_options": None}, headers=auth
            ).text
        )
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] > 0  # type: ignore[index]
    assert all(e["usage"] is None for e in events[:-1])
    assert plain[-1]["choices"] != []
    assert plain[-1]["usage"] is not None
