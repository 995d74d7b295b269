"""Keys and spend end to end: `unbroken keys create|list|rotate|revoke` against a real Redis
store, a gateway on the same store accepting (and then refusing) the keys, OpenAI's
x-ratelimit-* headers, and `GET /v1/usage` agreeing with the mock's own counters, for
the key itself and for an admin, also priced at another model's prices."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from unbroken.cli.commands import app as cli
from unbroken.core.pricing import DEFAULT_PRICES
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import Settings

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Count my tokens."}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=11, answer_tokens=(5, 9))) as server:
        yield server


@pytest.fixture
def config(tmp_path: Path, redis_url: str, mock: MockServer) -> Path:
    import anyio

    from unbroken.stores.redis import RedisStore

    async def flush() -> None:
        store = RedisStore.from_url(redis_url)
        await store._redis.flushdb()
        await store.aclose()

    anyio.run(flush)
    path = tmp_path / "unbroken.toml"
    path.write_text(
        f"""
base_url = "{mock.url}"
api_key = "sk-upstream-secret"

[gateway]
store = "{redis_url}"
keys_in_store = true
key_cache_s = 0
""",
        encoding="utf-8",
    )
    return path


def keys(config: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["keys", *args, "--config", str(config)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def gateway(config: Path) -> Iterator[httpx.Client]:
    settings = Settings.load(config, environ={})
    with (
        ServerThread(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=10.0) as client,
    ):
        yield client


def chat(client: httpx.Client, secret: str, stream: bool = False) -> httpx.Response:
    body = {"model": "deepseek-chat", "messages": MESSAGES, "stream": stream}
    return client.post("/v1/chat/completions", json=body, headers=bearer(secret))


def test_create_use_rotate_revoke_through_the_cli(config: Path, gateway: httpx.Client) -> None:
    """A key created by the CLI works at once, is listed without its secret, stops working
    when rotated (the new one works), and the new one stops when revoked."""
    created = json.loads(keys(config, "create", "alice", "--rpm", "50", "--json"))
    first = created["key"]
    assert first.startswith("sk-ub-")
    assert created["limits"] == {"requests_per_minute": 50}
    assert chat(gateway, first).status_code == 200
    listing = keys(config, "list", "--json")
    assert [row["name"] for row in json.loads(listing)] == ["alice"]
    assert first not in listing
    text_listing = keys(config, "list")
    assert "alice" in text_listing
    assert created["id"] in text_listing
    assert first not in text_listing

    rotated = json.loads(keys(config, "rotate", "alice", "--json"))
    second = rotated["key"]
    assert second != first
    assert rotated["name"] == "alice"
    assert rotated["limits"] == created["limits"]
    assert chat(gateway, first).status_code == 401
    assert chat(gateway, second).status_code == 200

    assert "Revoked key alice" in keys(config, "revoke", rotated["id"])
    assert chat(gateway, second).status_code == 401
    assert json.loads(keys(config, "list", "--json")) == []


def test_cli_refuses_a_memory_store_and_duplicate_names(config: Path, tmp_path: Path) -> None:
    """Keys need a shared store; a second key of the same name is refused."""
    memory = tmp_path / "memory.toml"
    memory.write_text("[gateway]\nstore = 'memory'\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["keys", "list", "--config", str(memory)])
    assert result.exit_code != 0
    assert "redis://" in str(result.exception)
    keys(config, "create", "bob")
    again = CliRunner().invoke(cli, ["keys", "create", "bob", "--config", str(config)])
    assert again.exit_code != 0
    assert "a key named 'bob' exists" in str(again.exception)


def test_usage_agrees_with_the_mock_and_prices_at_another_model(
    config: Path, gateway: httpx.Client, mock: MockServer
) -> None:
    """/v1/usage counts what the mock counted (requests and tokens); a key reads only its
    own, an admin reads every key's, priced at another model's prices on request."""
    # Each request reserves its prompt and `reserve_tokens` (4,096) against tokens/min until
    # its usage is known: three must fit in the bucket.
    alice = json.loads(keys(config, "create", "alice", "--rpm", "6", "--tpm", "20000", "--json"))
    carol = json.loads(keys(config, "create", "carol", "--json"))
    admin = json.loads(keys(config, "create", "ops", "--admin", "--json"))
    mock.reset()
    responses = [chat(gateway, alice["key"], stream=i % 2 == 0) for i in range(3)]
    responses.append(chat(gateway, carol["key"]))
    assert [r.status_code for r in responses] == [200] * 4
    last = responses[2].headers
    assert last["x-ratelimit-limit-requests"] == "6"
    assert last["x-ratelimit-remaining-requests"] == "3"  # refills one per 10 s
    assert last["x-ratelimit-limit-tokens"] == "20000"
    assert int(last["x-ratelimit-remaining-tokens"]) < 20000  # settled to real usage since
    assert last["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-requests" not in responses[3].headers  # carol has no limits

    chats = [e for e in mock.log() if e["path"].endswith("/chat/completions")]
    assert len(chats) == 4
    mine = gateway.get("/v1/usage", headers=bearer(alice["key"])).json()
    everyone = gateway.get(
        "/v1/usage",
        params={"key": "*", "price_at": "deepseek-v4-pro"},
        headers=bearer(admin["key"]),
    ).json()
    forbidden = gateway.get("/v1/usage", params={"key": "carol"}, headers=bearer(alice["key"]))

    listed = gateway.get("/v1/models", headers=bearer(alice["key"]))
    assert listed.headers["x-ratelimit-limit-requests"] == "6"
    assert mine["key"] == "alice"
    assert mine["total"]["requests"] == 3
    assert everyone["total"]["requests"] == 4
    served = mock.stats()["requests"]["POST /chat/completions"]
    assert sum(served.values()) == everyone["total"]["requests"]
    mock_prompt = sum(e["prompt_tokens"] for e in chats)
    mock_completion = sum(e["completion_tokens"] for e in chats)
    assert everyone["total"]["prompt_tokens"] == mock_prompt
    assert everyone["total"]["completion_tokens"] == mock_completion
    assert {(row["key"], row["model"], row["requests"]) for row in everyone["data"]} == {
        ("alice", "deepseek-chat", 3),
        ("carol", "deepseek-chat", 1),
    }
    price = DEFAULT_PRICES["deepseek-v4-pro"]
    cached = everyone["total"]["cached_tokens"]
    at_price = (
        cached * price.cache_hit
        + (mock_prompt - cached) * price.cache_miss
        + mock_completion * price.output
    ) / 1e6
    assert everyone["total"]["cost_usd_at_price"] == pytest.approx(at_price, rel=1e-6)
    assert everyone["total"]["cost_usd"] != pytest.approx(at_price)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "admin_required"
