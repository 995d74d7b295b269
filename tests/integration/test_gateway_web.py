"""The gateway's web side without a browser: the page, widget and static files (CSP,
caching, no path tricks), widget tokens (HS256 and JWKS; expiry, lifetime, issuer,
audience, per-subject callers), and the session endpoints the page uses (rename, keep)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from unbroken.errors import ConfigError
from unbroken.gateway.app import create_app
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.widget_tokens import WidgetTokens
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text
from unbroken.settings import GatewaySettings, LimitSettings, Settings

pytestmark = pytest.mark.integration

SECRET = "s" * 40
MOCK = MockConfig(seed=3)


# Tokens for the parametrized cases are minted at collection: the default lifetime must
# outlast a whole (slow) test run, and stay under the gateway's 3,600 s maximum.
def token(sub: Any = "alice", ttl_s: int = 3000, secret: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": sub, "iat": now, "exp": now + ttl_s, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, "HS256")


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(MOCK) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: MockServer) -> Iterator[ServerThread]:
    settings = Settings(
        api_key="sk-up",
        base_url=upstream.url,
        gateway=GatewaySettings(
            widget_secret=SECRET,
            widget_audience="shop",
            widget_limits=LimitSettings(requests_per_minute=1),
        ),
    )
    with ServerThread(create_app(settings), lifespan="on") as server:
        yield server


def api(gateway: ServerThread, bearer: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=20)


def test_page_widget_and_static_files(gateway: ServerThread) -> None:
    """`/` has the CSP; the widget and vendored files are public JavaScript with ETags;
    unknown files and path tricks are 404."""
    with api(gateway) as client:
        page = client.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        widget = client.get("/widget.js")
        assert widget.headers["content-type"].startswith("text/javascript")
        assert widget.headers["access-control-allow-origin"] == "*"
        again = client.get("/widget.js", headers={"If-None-Match": widget.headers["etag"]})
        assert again.status_code == 304
        assert client.get("/static/vendor/marked.LICENSE").status_code == 200
        for bad in ("/static/../app.py", "/static/%2e%2e/web.py", "/static/nope.js"):
            assert client.get(bad).status_code == 404
        assert client.post("/").status_code == 405
        config = client.get("/ui/config.json").json()
        assert config["auth"] == "token"
        assert config["prices_usd_per_million"]["deepseek-chat"]["output"] > 0


def test_widget_token_is_a_caller_per_subject(gateway: ServerThread) -> None:
    """A valid token answers; each subject has its own limit and its own sessions."""
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    with api(gateway, token(aud="shop")) as alice, api(gateway, token("bob", aud="shop")) as bob:
        assert alice.post("/v1/chat/completions", json=body).status_code == 200
        limited = alice.post("/v1/chat/completions", json=body)
        assert limited.status_code == 429
        assert bob.post("/v1/chat/completions", json=body).status_code == 200
        created = alice.post("/v1/sessions", json={}).json()
        assert bob.get(f"/v1/sessions/{created['id']}").status_code == 404
        assert alice.get(f"/v1/sessions/{created['id']}").status_code == 200


# Minted when the test runs (not at collection: a long suite would expire them first).
BAD_TOKENS = {
    "expired": lambda: token(aud="shop", ttl_s=-120),
    "Signature": lambda: token(aud="shop", secret="x" * 40),
    "Audience": lambda: token(aud="elsewhere"),
    "longer than": lambda: token(aud="shop", ttl_s=7200),
    "sub": lambda: token(sub=None, aud="shop"),
    "algorithm": lambda: jwt.encode({"sub": "a", "exp": 2**31}, "", "none"),
}


@pytest.mark.parametrize("says", list(BAD_TOKENS))
def test_bad_widget_tokens_are_refused(gateway: ServerThread, says: str) -> None:
    """Expired, forged, foreign, too long-lived, subject-less and unsigned tokens: 401."""
    bad = BAD_TOKENS[says]()
    with api(gateway, bad) as client:
        response = client.get("/v1/models")
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_widget_token"
    assert says in error["message"]


def test_jwks_tokens(tmp_path: Path) -> None:
    """RS256 tokens verify against a JWKS file by key id; a wrong key is refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    tokens = WidgetTokens(GatewaySettings(widget_jwks=str(jwks), widget_issuer="https://shop"))
    now = int(time.time())
    claims = {"sub": "carol", "exp": now + 60, "iss": "https://shop"}
    good = jwt.encode(claims, key, "RS256", headers={"kid": "k1"})
    caller = tokens.caller(good)
    assert caller.id.startswith("w:")
    assert caller.name == "widget:carol"
    forged = jwt.encode(claims, other, "RS256", headers={"kid": "k1"})
    with pytest.raises(GatewayError, match="Signature"):
        tokens.caller(forged)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a usable JWKS"):
        WidgetTokens(GatewaySettings(widget_jwks=str(tmp_path / "bad.json")))


def test_short_widget_secret_is_a_config_error() -> None:
    """HS256 secrets shorter than 32 characters are refused at start."""
    with pytest.raises(ConfigError, match="widget_secret"):
        GatewaySettings(widget_secret="short")


def test_session_rename_and_keep(upstream: MockServer) -> None:
    """PATCH renames; `keep` answers after the first N stored messages and replaces the rest."""
    settings = Settings(api_key="sk-up", base_url=upstream.url)
    with ServerThread(create_app(settings), lifespan="on") as server, api(server) as client:
        sid = client.post("/v1/sessions", json={"system": "be kind"}).json()["id"]
        renamed = client.patch(f"/v1/sessions/{sid}", json={"title": "  Order   4521 "})
        assert renamed.json()["title"] == "Order 4521"
        for text in ("one", "two"):
            client.post(f"/v1/sessions/{sid}/messages", json={"content": text, "stream": False})
        assert client.get(f"/v1/sessions/{sid}").json()["n_messages"] == 5
        again = client.post(
            f"/v1/sessions/{sid}/messages",
            json={"content": "two, again", "stream": False, "keep": 3},
        )
        expected = answer_text(
            "deepseek-chat",
            [
                {"role": "system", "content": "be kind"},
                {"role": "user", "content": "one"},
                {
                    "role": "assistant",
                    "content": answer_text(
                        "deepseek-chat",
                        [
                            {"role": "system", "content": "be kind"},
                            {"role": "user", "content": "one"},
                        ],
                        config=MOCK,
                    )[1],
                },
                {"role": "user", "content": "two, again"},
            ],
            config=MOCK,
        )[1]
        assert again.json()["choices"][0]["message"]["content"] == expected
        stored = client.get(f"/v1/sessions/{sid}").json()["messages"]
        assert [m["content"] for m in stored][:4] == [
            "be kind",
            "one",
            stored[2]["content"],
            "two, again",
        ]
        assert len(stored) == 5
        bad = client.post(f"/v1/sessions/{sid}/messages", json={"content": "x", "keep": 9})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "keep"
        assert client.patch(f"/v1/sessions/{sid}", json={"name": "x"}).status_code == 400
