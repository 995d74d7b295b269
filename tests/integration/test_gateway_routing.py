"""Model routing through the real gateway: public names (and aliases) to different upstream
models, a wildcard passing vLLM-style names through, discovery from the upstream's
/models, pass-through (and the upstream's own 404) without one, and prices and context
sizes from TOML."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import read_stream
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.modelconf import ModelSettings, ModelTarget, PriceSettings
from unbroken.settings import GatewaySettings, RouteSettings, Settings

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Which model are you?"}]
QWEN = "Qwen/Qwen2.5-7B-Instruct"


class FakeVLLM:
    """A vLLM-like upstream: serves `models` (its /models lists them, or 404 when
    `has_list` is False), answers with the model it was asked for, and 404s other names
    the way vLLM does. Records the model and headers of every chat request."""

    def __init__(self, models: tuple[str, ...], *, has_list: bool = True) -> None:
        self.models = models
        self.has_list = has_list
        self.asked: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.model_lists = 0

    async def _send(self, send: Any, status: int, body: bytes, kind: bytes) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"].endswith("/models") and scope["method"] == "GET":
            self.model_lists += 1
            if not self.has_list:
                await self._send(send, 404, b'{"detail":"Not Found"}', b"application/json")
                return
            data = {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
            await self._send(send, 200, json.dumps(data).encode(), b"application/json")
            return
        request = json.loads(body)
        model = request["model"]
        self.asked.append(model)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        if model not in self.models:
            error = {
                "object": "error",
                "message": f"The model `{model}` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
            await self._send(send, 404, json.dumps(error).encode(), b"application/json")
            return
        chunks: list[dict[str, Any]] = [
            {
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": f"I am {model}."}}
                ]
            },
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
            },
        ]
        head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        events = b"".join(b"data: " + json.dumps({**head, **c}).encode() + b"\n\n" for c in chunks)
        await self._send(send, 200, events + b"data: [DONE]\n\n", b"text/event-stream")


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=3, answer_tokens=(3, 6))) as server:
        yield server


@contextmanager
def gateway(settings: Settings) -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        yield client


def chat(client: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, **extra})


def test_two_public_names_route_to_two_upstream_models_and_a_wildcard_passes_through(
    mock: MockServer,
) -> None:
    """`fast` and its alias reach deepseek-chat, `think` reaches deepseek-reasoner, a
    `Qwen/*` wildcard sends the vLLM-style name itself to the vLLM route; other names 404."""
    vllm = FakeVLLM((QWEN,))
    with ServerThread(vllm) as vllm_server:
        settings = Settings(
            api_key="sk-up",
            gateway=GatewaySettings(
                routes=(
                    RouteSettings("deepseek", mock.url, "sk-up"),
                    RouteSettings("vllm", vllm_server.url + "/v1", "sk-vllm", dialect="vllm"),
                ),
                model_list=(
                    ModelSettings(
                        "fast", (ModelTarget("deepseek", "deepseek-chat"),), aliases=("quick",)
                    ),
                    ModelSettings("think", (ModelTarget("deepseek", "deepseek-reasoner"),)),
                    ModelSettings("Qwen/*", (ModelTarget("vllm"),)),
                ),
            ),
        )
        mock.reset()
        with gateway(settings) as client:
            for public in ("fast", "think", "quick"):
                response = chat(client, public)
                assert response.status_code == 200, response.text
            stream = read_stream(
                client,
                {"model": QWEN, "messages": MESSAGES, "stream": True},
                path="/v1/chat/completions",
            )
            unknown = chat(client, "gpt-4o")
            listed = client.get("/v1/models").json()
    asked = [entry["model"] for entry in mock.log() if entry["path"].endswith("/completions")]
    assert sorted(asked) == ["deepseek-chat", "deepseek-chat", "deepseek-reasoner"]
    assert asked[:2] in (
        ["deepseek-chat", "deepseek-reasoner"],
        ["deepseek-reasoner", "deepseek-chat"],
    )
    assert vllm.asked == [QWEN]
    assert stream.status == 200
    assert stream.content == f"I am {QWEN}."
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in listed["data"]] == ["fast", "quick", "think"]


def test_models_are_discovered_from_the_upstream(mock: MockServer) -> None:
    """With no model list, the gateway serves what the upstream's /models lists: a vLLM
    server's own names work, others are refused by the gateway before any chat call."""
    vllm = FakeVLLM((QWEN, "meta-llama/Llama-3.1-8B-Instruct"))
    with ServerThread(vllm) as vllm_server:
        settings = Settings(api_key="sk-vllm", base_url=vllm_server.url + "/v1")
        with gateway(settings) as client:
            listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
            ok = chat(client, "meta-llama/Llama-3.1-8B-Instruct")
            refused = chat(client, "deepseek-chat")
    assert listed == sorted([QWEN, "meta-llama/Llama-3.1-8B-Instruct"])
    assert ok.status_code == 200, ok.text
    assert ok.json()["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert vllm.asked == ["meta-llama/Llama-3.1-8B-Instruct"]
    assert vllm.model_lists == 1  # fetched once, then refreshed only after model_refresh_s


def test_without_a_models_endpoint_names_pass_through(mock: MockServer) -> None:
    """An upstream without /models: every name goes upstream as is, and the upstream's own
    404 for a name it does not serve reaches the client."""
    vllm = FakeVLLM((QWEN,), has_list=False)
    with ServerThread(vllm) as vllm_server:
        settings = Settings(api_key="sk-vllm", base_url=vllm_server.url + "/v1")
        with gateway(settings) as client:
            ok = chat(client, QWEN)
            missing = chat(client, "no-such-model")
    assert ok.status_code == 200, ok.text
    assert missing.status_code == 404
    assert "The model `no-such-model` does not exist." in missing.json()["error"]["message"]
    assert vllm.asked == [QWEN, "no-such-model"]


def test_prices_and_context_sizes_come_from_toml(mock: MockServer, tmp_path: Path) -> None:
    """A model list in TOML with a price: the answer's cost is its usage at that price, and
    the route carries the configured context size."""
    config = tmp_path / "unbroken.toml"
    config.write_text(
        f"""
base_url = "{mock.url}"
api_key = "sk-up"

[[gateway.model_list]]
name = "house"
routes = [{{ route = "default", model = "deepseek-chat" }}]
price = {{ input = 2.0, cached_input = 0.5, output = 8.0 }}
context_tokens = 65536
""",
        encoding="utf-8",
    )
    settings = Settings.load(config, environ={})
    entry = settings.gateway.model_list[0]
    assert entry.price == PriceSettings(input=2.0, output=8.0, cached_input=0.5)
    app = create_app(settings)
    routes = app.router.routes_for("house")
    assert routes is not None
    assert [(r.model, r.context_tokens) for r in routes] == [("deepseek-chat", 65536)]
    with gateway(settings) as client:
        body = chat(client, "house").json()
    usage = body["usage"]
    hit = usage.get("prompt_cache_hit_tokens") or 0
    miss = usage["prompt_tokens"] - hit
    expected = (hit * 0.5 + miss * 2.0 + usage["completion_tokens"] * 8.0) / 1e6
    assert body["unbroken"]["cost_usd"] == pytest.approx(expected)
    assert expected > 0


def test_context_sizes_from_the_model_list_drive_context_fallbacks(tmp_path: Path) -> None:
    """A target whose model has a small window (per the TOML) answers short requests; a
    request too long for it moves on to the target with the larger window."""
    with (
        MockServer(MockConfig(seed=3, answer_tokens=(3, 6), context_tokens=2048)) as small,
        MockServer(MockConfig(seed=3, answer_tokens=(3, 6))) as large,
    ):
        config = tmp_path / "unbroken.toml"
        config.write_text(
            f"""
[[gateway.routes]]
name = "small"
base_url = "{small.url}"
api_key = "sk-up"

[[gateway.routes]]
name = "large"
base_url = "{large.url}"
api_key = "sk-up"

[[gateway.model_list]]
name = "house"
routes = [
  {{ route = "small", model = "deepseek-chat", context_tokens = 2048 }},
  {{ route = "large", model = "deepseek-chat", context_tokens = 131072 }},
]
""",
            encoding="utf-8",
        )
        settings = Settings.load(config, environ={})
        long_prompt = [{"role": "user", "content": "word " * 4000}]
        with gateway(settings) as client:
            short = chat(client, "house")
            long = client.post(
                "/v1/chat/completions", json={"model": "house", "messages": long_prompt}
            )
    assert short.status_code == 200, short.text
    assert short.json()["unbroken"]["route"] == "small:deepseek-chat"
    assert long.status_code == 200, long.text
    meta = long.json()["unbroken"]
    assert meta["route"] == "large:deepseek-chat"
    assert [(a["route"], a["outcome"]) for a in meta["attempts"]] == [
        ("small:deepseek-chat", "context_length_exceeded"),
        ("large:deepseek-chat", "complete"),
    ]
