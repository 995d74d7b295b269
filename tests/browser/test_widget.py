"""The embeddable widget on a shop's page (another origin), signed in with the shop's
short-lived JWTs: one script tag, a corner panel, per-subject limits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.browser.conftest import ASSISTANT, CONTENT, MESSAGE, MOCK, SEND, gateway_settings, shot
from unbroken.gateway.app import create_app
from unbroken.mock import MockServer, ServerThread, answer_text
from unbroken.settings import LimitSettings

pytestmark = pytest.mark.browser

SECRET = "shop-secret-0123456789abcdef0123456789abcdef"


def mint(subject: str, ttl_s: float = 300, secret: str = SECRET) -> str:
    """What the shop's backend does (docs/web.md)."""
    now = int(time.time())
    return jwt.encode({"sub": subject, "iat": now, "exp": now + int(ttl_s)}, secret, "HS256")


class Shop:
    """A shop's site: a page with the widget's script tag, and the token endpoint."""

    def __init__(self) -> None:
        self.gateway_url = ""
        self.subject = "shopper-1"
        self.tokens_minted = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/token":
            self.tokens_minted += 1
            body = json.dumps({"token": mint(self.subject)}).encode()
            kind = b"application/json"
        else:
            body = (
                "<!doctype html><html><head><meta charset=utf-8><title>Shop</title>"
                '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
                "<body><h1>Tea shop</h1><p>Green tea, 绿茶, 🍵</p>"
                f'<script src="{self.gateway_url}/widget.js" data-token-url="/token" '
                'data-title="Tea shop help" async></script></body></html>'
            ).encode()
            kind = b"text/html; charset=utf-8"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def shop() -> Iterator[tuple[Shop, ServerThread]]:
    app = Shop()
    with ServerThread(app, "127.0.0.1", 0) as server:
        yield app, server


@pytest.fixture(scope="module")
def widget_gateway(
    mock_server: MockServer, shop: tuple[Shop, ServerThread]
) -> Iterator[ServerThread]:
    """A gateway that only accepts widget tokens, 2 chat requests a minute per shopper."""
    app, server = shop
    settings = gateway_settings(
        mock_server.url,
        widget_secret=SECRET,
        widget_limits=LimitSettings(requests_per_minute=2),
        cors_origins=(server.url,),
    )
    with ServerThread(create_app(settings), lifespan="on") as gateway:
        app.gateway_url = gateway.url
        yield gateway


def test_widget_chats_with_a_shop_token_and_limits_each_shopper(
    context: Any, shop: tuple[Shop, ServerThread], widget_gateway: ServerThread, mock: MockServer
) -> None:
    """One script tag opens a panel; answers stream; a shopper's third request in a minute
    is refused inline (429) while another shopper still gets answers."""
    app, server = shop
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.click('button[aria-label="Open chat"]')
    page.wait_for_selector('.ub-app[data-ready="true"]')  # inside the shadow root
    for n, text in enumerate(["hello", "more"], start=1):
        page.fill(MESSAGE, text)
        page.click(SEND)
        page.wait_for_selector(f'{ASSISTANT}[data-state="done"] >> nth={n - 1}', timeout=20_000)
    first = page.locator(f"{ASSISTANT} {CONTENT}").first.text_content()
    expected = answer_text("deepseek-chat", [{"role": "user", "content": "hello"}], config=MOCK)[1]
    assert first
    assert first.split()[0] in expected
    assert app.tokens_minted >= 1
    shot(page, "widget-1280")
    page.fill(MESSAGE, "one more")
    page.click(SEND)
    refused = page.locator(f'{ASSISTANT}[data-state="error"]')
    refused.wait_for(timeout=10_000)
    assert "limit" in (refused.text_content() or "").lower()
    assert page.locator('[data-role="assistant"] button[aria-label="Retry"]').count() == 1
    # Another shopper is not affected.
    other = httpx.post(
        widget_gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {mint('shopper-2')}"},
        json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]},
        timeout=20,
    )
    assert other.status_code == 200
    page.set_viewport_size({"width": 375, "height": 740})
    shot(page, "widget-375")
    assert errors == []
