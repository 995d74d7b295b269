"""Fixtures of the browser tests: Debian's chromium driven by Playwright, against a real
gateway and a real mock DeepSeek with paced tokens on loopback (never mocked routes:
Playwright cannot stream a mocked body).

Screenshots go to `artifacts/browser/` (or `$UNBROKEN_ARTIFACTS/browser/`), kept for review.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_binary
from unbroken.gateway.app import create_app
from unbroken.mock import Latency, MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings

# Paced like a real model: 20 ms between tokens, so a test can watch an answer grow.
MOCK = MockConfig(seed=12, latency=Latency(ttft_ms=150, token_ms=20), answer_tokens=(40, 60))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("UNBROKEN_ARTIFACTS", "artifacts")) / "browser"

# The selector contract (docs/web.md).
MESSAGE = 'textarea[aria-label="Message"]'
SEND = 'button[aria-label="Send"]'
STOP = 'button[aria-label="Stop"]'
ASSISTANT = '[data-role="assistant"]'
USER = '[data-role="user"]'
CONTENT = '[data-part="content"]'
REASONING = '[data-part="reasoning"]'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium (skips with a reason when it is not installed). Per module:
    Playwright's sync API keeps an event loop running in this thread while it lives, which
    the anyio tests of other directories must not find."""
    executable = require_binary("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockServer]:
    """The mock DeepSeek with paced tokens."""
    with MockServer(MOCK) as server:
        yield server


@pytest.fixture
def mock(mock_server: MockServer) -> MockServer:
    """The module's mock, counters reset."""
    mock_server.reset()
    return mock_server


def gateway_settings(mock_url: str, **options: Any) -> Settings:
    """Gateway settings over the mock; `x-mock-*` headers pass through (tests set them)."""
    return Settings(
        api_key="sk-up",
        base_url=mock_url,
        gateway=GatewaySettings(
            forward_headers=("x-mock-*",),
            retry_wait_initial_s=0.01,
            retry_wait_max_s=0.02,
            **options,
        ),
    )


@pytest.fixture(scope="module")
def gateway(mock_server: MockServer) -> Iterator[ServerThread]:
    """A gateway without keys (loopback), sessions in memory."""
    with ServerThread(create_app(gateway_settings(mock_server.url)), lifespan="on") as server:
        yield server


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context (1280 x 800, light) per test; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context: Any, gateway: ServerThread) -> Iterator[Any]:
    """The chat page, loaded and ready; uncaught page errors and dialogs fail the test."""
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    page.goto(gateway.url + "/")
    page.wait_for_selector('.ub-app[data-ready="true"]')
    yield page
    assert errors == []


def shot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as an artefact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
