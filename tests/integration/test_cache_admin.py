"""The answer cache's admin endpoints on a real gateway and mock DeepSeek over loopback:
invalidation by key, by request, by model and of everything; admin keys only; typed
errors; counted on /metrics, which promtool accepts."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import require_binary
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import CacheSettings, GatewaySettings, KeySettings, Settings, hash_key

pytestmark = pytest.mark.integration

ADMIN = "sk-gw-admin-0123456789abcdef"
USER = "sk-gw-user-0123456789abcdef"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AS_USER = {"Authorization": f"Bearer {USER}"}
MODELS = ("deepseek-chat", "deepseek-reasoner")


def settings(url: str, *, cache: bool = True) -> Settings:
    return Settings(
        api_key="sk-test",
        base_url=url,
        gateway=GatewaySettings(
            keys=(
                KeySettings("ops", hash_key(ADMIN), role="admin"),
                KeySettings("shop", hash_key(USER)),
            ),
            cache=CacheSettings(store="memory" if cache else "", serve_models=MODELS, pace_s=0),
        ),
    )


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=7, answer_tokens=(5, 12))) as server:
        yield server


@pytest.fixture
def api(mock: MockServer) -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(settings(mock.url)), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20.0) as client,
    ):
        yield client


def body(question: str, model: str = "deepseek-chat") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "temperature": 0,
    }


def ask(api: httpx.Client, question: str, model: str = "deepseek-chat") -> str | None:
    """The cache mark of a whole streamed answer (None for a fresh one)."""
    response = api.post("/v1/chat/completions", json=body(question, model), headers=AS_USER)
    assert response.status_code == 200, response.text
    assert response.text.endswith("data: [DONE]\n\n")
    mark: str | None = response.headers.get("x-unbroken-cache")
    return mark


def warm(api: httpx.Client, *questions: tuple[str, str]) -> None:
    for question, model in questions:
        ask(api, question, model)
        assert ask(api, question, model) == "hit"


def test_invalidate_a_request_then_its_key(api: httpx.Client) -> None:
    """POST /v1/cache/invalidate with a chat body forgets that request's entry (only it) and
    names its key; the next ask goes upstream and is stored again, and DELETE of that key
    forgets it again - a second DELETE finds nothing."""
    warm(api, ("When does the pre-sale start?", "deepseek-chat"), ("Refunds?", "deepseek-chat"))
    # Fields that do not shape the answer (stream, user) do not change the key.
    same = {**body("When does the pre-sale start?"), "stream": False, "user": "ops"}
    gone = api.post("/v1/cache/invalidate", json=same, headers=AS_ADMIN)
    assert gone.status_code == 200, gone.text
    result = gone.json()
    assert result["object"] == "cache.invalidation"
    assert (result["scope"], result["deleted"]) == ("request", 1)
    key = result["key"]
    assert key.startswith("v1:")
    assert ask(api, "When does the pre-sale start?") is None
    assert ask(api, "Refunds?") == "hit"
    assert ask(api, "When does the pre-sale start?") == "hit"
    first = api.delete(f"/v1/cache/entries/{key}", headers=AS_ADMIN)
    assert first.json() == {
        "object": "cache.invalidation",
        "scope": "key",
        "key": key,
        "deleted": 1,
    }
    second = api.delete(f"/v1/cache/entries/{key}", headers=AS_ADMIN)
    assert second.json()["deleted"] == 0
    assert ask(api, "When does the pre-sale start?") is None


def test_invalidate_by_model_and_everything(api: httpx.Client) -> None:
    """DELETE /v1/cache?model= forgets that model's entries only; DELETE /v1/cache forgets
    the rest; each says how many."""
    warm(
        api,
        ("Shipping?", "deepseek-chat"),
        ("Returns?", "deepseek-chat"),
        ("Why is the sky blue?", "deepseek-reasoner"),
    )
    by_model = api.delete("/v1/cache", params={"model": "deepseek-chat"}, headers=AS_ADMIN)
    assert by_model.json() == {
        "object": "cache.invalidation",
        "scope": "model",
        "model": "deepseek-chat",
        "deleted": 2,
    }
    assert ask(api, "Why is the sky blue?", "deepseek-reasoner") == "hit"
    assert ask(api, "Shipping?") is None
    everything = api.delete("/v1/cache", headers=AS_ADMIN)
    assert everything.json() == {"object": "cache.invalidation", "scope": "all", "deleted": 2}
    assert ask(api, "Why is the sky blue?", "deepseek-reasoner") is None


def test_user_keys_and_bad_input_get_typed_errors(api: httpx.Client) -> None:
    """A user key gets 403 admin_required on every admin endpoint (and nothing is removed);
    no key is a 401; a malformed key, an unknown parameter, a bad body and a wrong method
    are typed 400s and a 405 with Allow."""
    warm(api, ("Opening hours?", "deepseek-chat"))
    for method, path, payload in (
        ("DELETE", "/v1/cache", None),
        ("DELETE", "/v1/cache/entries/v1:" + "0" * 64, None),
        ("POST", "/v1/cache/invalidate", body("Opening hours?")),
    ):
        refused = api.request(method, path, json=payload, headers=AS_USER)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "admin_required"
        assert "shop" in refused.json()["error"]["message"]
    assert api.delete("/v1/cache").status_code == 401
    assert ask(api, "Opening hours?") == "hit"
    bad_key = api.delete("/v1/cache/entries/not-a-key", headers=AS_ADMIN)
    assert (bad_key.status_code, bad_key.json()["error"]["param"]) == (400, "key")
    bad_param = api.delete("/v1/cache", params={"modle": "x"}, headers=AS_ADMIN)
    assert (bad_param.status_code, bad_param.json()["error"]["code"]) == (400, "invalid_value")
    empty_model = api.delete("/v1/cache", params={"model": ""}, headers=AS_ADMIN)
    assert empty_model.json()["error"]["param"] == "model"
    bad_body = api.post("/v1/cache/invalidate", json={"model": "deepseek-chat"}, headers=AS_ADMIN)
    assert bad_body.status_code == 400
    assert bad_body.json()["error"]["param"] == "messages"
    wrong = api.get("/v1/cache", headers=AS_ADMIN)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "DELETE")
    assert api.delete("/v1/cache/entries/a/b", headers=AS_ADMIN).status_code == 404
    assert ask(api, "Opening hours?") == "hit"


def test_no_cache_is_a_typed_404(mock: MockServer) -> None:
    """A gateway without an answer cache answers its admin endpoints 404 cache_disabled (an
    admin key; a user key still gets 403)."""
    with (
        ServerThread(create_app(settings(mock.url, cache=False)), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20.0) as client,
    ):
        off = client.delete("/v1/cache", headers=AS_ADMIN)
        user = client.delete("/v1/cache", headers=AS_USER)
    assert (off.status_code, off.json()["error"]["code"]) == (404, "cache_disabled")
    assert user.status_code == 403


def test_cache_metrics_are_exported_and_pass_promtool(api: httpx.Client) -> None:
    """Hits, misses, stale serves, stores and invalidations are families on /metrics with
    the counts of what happened, and `promtool check metrics` accepts the exposition."""
    warm(api, ("Gift cards?", "deepseek-chat"))
    api.delete("/v1/cache", params={"model": "deepseek-chat"}, headers=AS_ADMIN)
    api.delete("/v1/cache/entries/v1:" + "0" * 64, headers=AS_ADMIN)
    exposition = api.get("/metrics").text
    lines = exposition.splitlines()
    for family in (
        "unbroken_gateway_cache_lookups_total",
        "unbroken_gateway_cache_stores_total",
        "unbroken_gateway_cache_errors_total",
        "unbroken_gateway_cache_invalidations_total",
        "unbroken_gateway_cache_invalidated_entries_total",
    ):
        assert f"# TYPE {family} counter" in lines, family
    assert 'unbroken_gateway_cache_lookups_total{result="hit"} 1.0' in lines
    assert 'unbroken_gateway_cache_lookups_total{result="miss"} 1.0' in lines
    assert 'unbroken_gateway_cache_lookups_total{result="stale"} 0.0' in lines
    assert 'unbroken_gateway_cache_invalidations_total{scope="all"} 0.0' in lines
    assert 'unbroken_gateway_cache_invalidations_total{scope="model"} 1.0' in lines
    assert 'unbroken_gateway_cache_invalidations_total{scope="key"} 1.0' in lines
    assert "unbroken_gateway_cache_invalidated_entries_total 1.0" in lines
    checked = subprocess.run(
        [require_binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
