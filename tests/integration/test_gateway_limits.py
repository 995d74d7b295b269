"""Gateway keys and per-key limits, with the memory and the Redis store: missing or wrong
keys are 401, each limit (requests/min, tokens/min, concurrency, daily tokens, daily cost)
is a 429 with Retry-After and a body naming it, keys may be restricted to models, and keys
can live in the store."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, LimitSettings, Settings, hash_key
from unbroken.stores import MemoryStore, open_store

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]
KEYS = {
    "plain": LimitSettings(),
    "rpm": LimitSettings(requests_per_minute=2),
    "tpm": LimitSettings(tokens_per_minute=100),
    "conc": LimitSettings(concurrent_streams=1),
    "daily": LimitSettings(daily_tokens=1),
    "cost": LimitSettings(daily_cost_usd=1e-9),
    "both": LimitSettings(requests_per_minute=3, tokens_per_minute=100),
}


def secret(name: str) -> str:
    return f"sk-gw-{name}-0123456789abcdef"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=9, answer_tokens=(3, 5))) as server:
        yield server


@pytest.fixture(scope="module", params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Every test runs on both stores."""
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture(scope="module")
def gateway(upstream: MockServer, store_url: str) -> Iterator[ServerThread]:
    keys = tuple(KeySettings(n, hash_key(secret(n)), limits) for n, limits in KEYS.items())
    keys += (KeySettings("chat-only", hash_key(secret("chat-only")), models=("deepseek-chat",)),)
    store = open_store(store_url)
    stored = KeySettings("stored", hash_key(secret("stored")), LimitSettings(requests_per_minute=1))

    async def prepare() -> None:
        if store_url != "memory":
            from unbroken.stores.redis import RedisStore

            assert isinstance(store, RedisStore)
            await store._redis.flushdb()
        await store.put_key(stored)
        await store.aclose()

    anyio.run(prepare)
    if store_url != "memory":
        store = open_store(store_url)  # a fresh client for the server's event loop
    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(
            keys=keys, keys_in_store=True, store=store_url, forward_headers=("x-mock-*",)
        ),
    )
    # lifespan on: the gateway closes its store and client in the server's own loop.
    with ServerThread(create_app(settings, store=store), lifespan="on") as server:
        yield server


@pytest.fixture
def http(gateway: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=20) as client:
        yield client


def chat(http: httpx.Client, key: str | None, **body: Any) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {secret(key)}"}
    return http.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES, **body},
        headers=headers,
    )


def refusal(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


def test_missing_and_wrong_keys_are_401(http: httpx.Client) -> None:
    """No key and an unknown key are refused; health stays open."""
    assert refusal(chat(http, None), 401, "missing_api_key")["type"] == "authentication_error"
    response = http.post(
        "/v1/chat/completions",
        json={"model": "deepseek-chat", "messages": MESSAGES},
        headers={"Authorization": "Bearer sk-nope"},
    )
    error = refusal(response, 401, "invalid_api_key")
    assert "sk-nope" not in error["message"]
    assert http.get("/v1/models").status_code == 401
    assert http.get("/healthz").status_code == 200
    assert chat(http, "plain").status_code == 200


def test_requests_per_minute(http: httpx.Client) -> None:
    """The third request in a minute on a 2/min key is a 429 with Retry-After."""
    assert chat(http, "rpm").status_code == 200
    assert chat(http, "rpm").status_code == 200
    response = chat(http, "rpm")
    error = refusal(response, 429, "requests_per_minute_exceeded")
    assert error["type"] == "rate_limit_error"
    assert "2 requests per minute" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 30


def test_tokens_per_minute(http: httpx.Client) -> None:
    """A request may reserve the whole bucket; its real usage (9 tokens) is booked after
    it, so a request needing the whole bucket waits while a smaller one runs."""
    assert chat(http, "tpm", max_tokens=500).status_code == 200
    response = chat(http, "tpm", max_tokens=95)
    refusal(response, 429, "tokens_per_minute_exceeded")
    assert int(response.headers["retry-after"]) >= 1
    assert chat(http, "tpm", max_tokens=50).status_code == 200


def test_rate_limit_headers_and_refusals_with_both_buckets(http: httpx.Client) -> None:
    """rpm and tpm together: the headers count each admitted request; a request refused by
    tpm takes nothing from rpm (its 429 shows the same requests left), and rpm refuses
    first once it is empty."""
    first = chat(http, "both", max_tokens=500)  # reserves the whole tpm bucket
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"
    refused = chat(http, "both", max_tokens=95)
    refusal(refused, 429, "tokens_per_minute_exceeded")
    assert refused.headers["x-ratelimit-remaining-requests"] == "2"
    streamed = chat(http, "both", max_tokens=1, stream=True)
    assert streamed.status_code == 200
    assert streamed.headers["x-ratelimit-remaining-requests"] == "1"
    assert chat(http, "both", max_tokens=1).status_code == 200
    refusal(chat(http, "both", max_tokens=1), 429, "requests_per_minute_exceeded")


class CountingStore(MemoryStore):
    """A memory store that counts its bucket calls (what a remote store's round trips
    would be)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def take(self, *args: Any) -> float:
        self.calls.append("take")
        return await super().take(*args)

    async def take_all(self, *args: Any) -> Any:
        self.calls.append("take_all")
        return await super().take_all(*args)

    async def level(self, *args: Any) -> float:
        self.calls.append("level")
        return await super().level(*args)


def test_an_admitted_request_is_one_bucket_call(upstream: MockServer) -> None:
    """rpm and tpm are taken in one store call and the headers come from its levels: no
    per-bucket take, no level read, streamed or not."""
    key = KeySettings("both", hash_key(secret("both")), KEYS["both"])
    store = CountingStore()
    settings = Settings(
        api_key="sk-up", base_url=upstream.url, gateway=GatewaySettings(keys=(key,))
    )
    with (
        ServerThread(create_app(settings, store=store), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20) as http,
    ):
        for stream in (False, True):
            store.calls.clear()
            response = chat(http, "both", max_tokens=10, stream=stream)
            assert response.status_code == 200
            assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100
            assert store.calls == ["take_all"]


def test_concurrent_streams(http: httpx.Client, gateway: ServerThread) -> None:
    """With one slot, a second request while a stream is open is refused; the slot frees
    when the stream ends."""
    opened = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with (
            httpx.Client(base_url=gateway.url, timeout=20) as other,
            other.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "deepseek-chat", "messages": MESSAGES, "stream": True},
                headers={
                    "Authorization": f"Bearer {secret('conc')}",
                    "X-Mock-Token-Ms": "500",
                },
            ) as response,
        ):
            assert response.status_code == 200
            opened.set()
            release.wait(10)
            response.read()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert opened.wait(10)
        refusal(chat(http, "conc"), 429, "concurrency_limit_exceeded")
    finally:
        release.set()
        holder.join(20)
    assert chat(http, "conc").status_code == 200


def test_daily_token_and_cost_budgets(http: httpx.Client) -> None:
    """Once a key spent its daily budget it is refused until the next UTC day."""
    assert chat(http, "daily").status_code == 200
    response = chat(http, "daily")
    refusal(response, 429, "daily_token_budget_exceeded")
    assert 1 <= int(response.headers["retry-after"]) <= 86400
    assert chat(http, "cost").status_code == 200
    refusal(chat(http, "cost"), 429, "daily_cost_budget_exceeded")


def test_key_restricted_to_models(http: httpx.Client) -> None:
    """A key limited to deepseek-chat cannot use the reasoner, even as a fallback."""
    assert chat(http, "chat-only").status_code == 200
    refusal(chat(http, "chat-only", model="deepseek-reasoner"), 403, "model_not_allowed")
    refusal(chat(http, "chat-only", fallbacks=["deepseek-reasoner"]), 403, "model_not_allowed")
    models = http.get("/v1/models", headers={"Authorization": f"Bearer {secret('chat-only')}"})
    assert [m["id"] for m in models.json()["data"]] == ["deepseek-chat"]


def test_keys_kept_in_the_store(http: httpx.Client) -> None:
    """A key found only in the store authenticates and carries its own limits."""
    assert chat(http, "stored").status_code == 200
    refusal(chat(http, "stored"), 429, "requests_per_minute_exceeded")


def test_limit_refusals_are_counted(http: httpx.Client) -> None:
    """/metrics counts refusals by reason."""
    chat(http, None)
    text = http.get("/metrics").text
    assert 'unbroken_gateway_rejections_total{reason="missing_api_key"}' in text


def test_store_outage_is_a_503_not_a_crash(upstream: MockServer) -> None:
    """With Redis down, limited requests get 503 store_unavailable and /readyz says so;
    the gateway itself stays up."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(
            store=dead, limits=LimitSettings(requests_per_minute=10), retry_attempts=1
        ),
    )
    with (
        ServerThread(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        refusal(chat(client, None), 503, "store_unavailable")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "store unavailable"}
        assert client.get("/healthz").status_code == 200
