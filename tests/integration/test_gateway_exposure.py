"""No-key mode answers only to the machine itself: loopback Host names, the gateway's own
or allowed browser origins, and JSON bodies; encoded bodies and deeply nested JSON are
refused with a 4xx in every mode."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, Settings, hash_key

pytestmark = pytest.mark.integration

BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
KEY = "sk-gw-exposure-0123456789"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer() as server:
        yield server


def running(url: str, **options: Any) -> ServerThread:
    settings = Settings(api_key="sk-up", base_url=url, gateway=GatewaySettings(**options))
    return ServerThread(create_app(settings), lifespan="on")


@pytest.fixture(scope="module")
def open_gateway(upstream: MockServer) -> Iterator[httpx.Client]:
    """A gateway without keys on loopback, allowing one extra origin."""
    with (
        running(upstream.url, cors_origins=("https://app.example",)) as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        yield client


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8788", "10.0.0.1", "[::2]"])
def test_no_key_mode_refuses_foreign_host_names(open_gateway: httpx.Client, host: str) -> None:
    """A DNS-rebound name (any non-loopback Host) gets 403 host_not_allowed."""
    response = open_gateway.post("/v1/chat/completions", json=BODY, headers={"Host": host})
    assert response.status_code == 403
    assert code(response) == "host_not_allowed"


@pytest.mark.parametrize(
    "host", ["localhost:1", "127.0.0.1", "127.1.2.3:80", "[::1]:9", "a.localhost"]
)
def test_no_key_mode_serves_loopback_host_names(open_gateway: httpx.Client, host: str) -> None:
    """Loopback names are served."""
    response = open_gateway.post("/v1/chat/completions", json=BODY, headers={"Host": host})
    assert response.status_code == 200, response.text


def test_no_key_mode_checks_the_browser_origin(open_gateway: httpx.Client) -> None:
    """A foreign Origin is 403; the gateway's own origin and allowed ones are served."""
    own = str(open_gateway.base_url).rstrip("/")
    for origin, status in [
        ("https://evil.example", 403),
        ("null", 403),
        (own, 200),
        ("https://app.example", 200),
    ]:
        response = open_gateway.post("/v1/chat/completions", json=BODY, headers={"Origin": origin})
        assert response.status_code == status, (origin, response.text)
        if status == 403:
            assert code(response) == "origin_not_allowed"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_no_key_mode_requires_a_json_body(
    open_gateway: httpx.Client, content_type: str | None
) -> None:
    """A body sent as a form, as text or undeclared is 415 (what a cross-site page can send
    without a preflight)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    raw = httpx.Request("POST", "http://x", json=BODY).content
    response = open_gateway.post("/v1/chat/completions", content=raw, headers=headers)
    assert response.status_code == 415
    assert code(response) == "unsupported_media_type"


def test_keyed_mode_accepts_any_host(upstream: MockServer) -> None:
    """With keys, the Host and body type are the key holder's business."""
    keys = (KeySettings("k", hash_key(KEY)),)
    with running(upstream.url, keys=keys) as server, httpx.Client(base_url=server.url) as client:
        response = client.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Host": "api.example", "Authorization": f"Bearer {KEY}"},
        )
    assert response.status_code == 200


def test_encoded_bodies_are_refused(open_gateway: httpx.Client) -> None:
    """A gzip-encoded body is 415, not read as JSON."""
    response = open_gateway.post(
        "/v1/chat/completions", json=BODY, headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 415
    assert code(response) == "unsupported_content_encoding"


def test_keyed_mode_refuses_encoded_bodies_too(upstream: MockServer) -> None:
    """With keys as without: a gzip-encoded body is 415; `identity` is no encoding."""
    keys = (KeySettings("k", hash_key(KEY)),)
    auth = {"Authorization": f"Bearer {KEY}"}
    with running(upstream.url, keys=keys) as server, httpx.Client(base_url=server.url) as client:
        refused = client.post(
            "/v1/chat/completions", json=BODY, headers={**auth, "Content-Encoding": "gzip"}
        )
        plain = client.post(
            "/v1/chat/completions", json=BODY, headers={**auth, "Content-Encoding": "identity"}
        )
    assert refused.status_code == 415
    assert code(refused) == "unsupported_content_encoding"
    assert plain.status_code == 200


@pytest.mark.parametrize("depth", [200, 960, 5000, 100_000])
def test_deeply_nested_json_is_a_400(open_gateway: httpx.Client, depth: int) -> None:
    """Nesting past the limit is a 400 invalid_json in chat bodies, never a 500."""
    nested = "[" * depth + "]" * depth
    raw = f'{{"model":"deepseek-chat","messages":[{{"role":"user","content":"hi"}}],"x":{nested}}}'
    response = open_gateway.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert code(response) == "invalid_json"
    assert "deeper than" in response.json()["error"]["message"]
