"""gateway/app.py `_http`: a chat request is routed before the other routes' checks; the
chat paths still answer other methods as every route does (405 naming POST, the CORS
preflight), and both paths serve a streamed answer."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServerThread]:
    with MockServer(MockConfig(seed=5)) as upstream:
        settings = Settings(api_key="sk-up", base_url=upstream.url)
        with ServerThread(create_app(settings), lifespan="on") as server:
            yield server


BODY = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_both_chat_paths_stream_an_answer(gateway: ServerThread, path: str) -> None:
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        answer = client.post(path, json=BODY)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_the_chat_path_get_a_405(gateway: ServerThread, method: str) -> None:
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        refused = client.request(method, "/v1/chat/completions")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "POST"
    assert refused.json()["error"]["code"] == "method_not_allowed"


def test_a_preflight_of_the_chat_path_is_answered(gateway: ServerThread) -> None:
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        preflight = client.options("/v1/chat/completions")
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["allow"]
