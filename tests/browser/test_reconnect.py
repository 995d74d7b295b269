"""Reconnects in a real browser, on the gateway's stream log: a network drop mid-answer and
a reload mid-answer both end with the fault-free answer, with no loss and no repeat."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import ASSISTANT, MESSAGE, MOCK, SEND
from unbroken.mock import MockServer, answer_text

pytestmark = pytest.mark.browser

N_TOKENS = 150  # 3 s at 20 ms a token: time to break it in the middle


def expected() -> str:
    messages = [{"role": "user", "content": "hello"}]
    return answer_text("deepseek-chat", messages, n_tokens=N_TOKENS, config=MOCK)[1]


def start(page: Any, context: Any) -> list[Any]:
    """Send `hello` (a long answer) and wait until part of it is shown; returns the list
    that collects the page's reconnect requests."""
    context.set_extra_http_headers({"X-Mock-Tokens": str(N_TOKENS)})
    resumed: list[Any] = []
    page.on("request", lambda r: resumed.append(r) if "/v1/streams/" in r.url else None)
    page.fill(MESSAGE, "hello")
    page.click(SEND)
    page.wait_for_function("() => window.unbrokenChat.messages().at(-1)?.content.length > 40")
    return resumed


def test_network_drop_mid_answer_resumes_with_the_last_event_id(
    page: Any, context: Any, mock: MockServer
) -> None:
    """Offline mid-answer, then online: the page reconnects after its last event id and
    the final text is the fault-free answer."""
    resumed = start(page, context)
    context.set_offline(True)
    page.wait_for_function("() => !navigator.onLine")
    shown = page.evaluate("() => window.unbrokenChat.messages().at(-1).content")
    context.set_offline(False)
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    final = page.evaluate("() => window.unbrokenChat.messages().at(-1)")
    assert final["content"] == expected()
    assert final["content"].startswith(shown)
    gets = [r for r in resumed if r.method == "GET"]
    assert gets, "the page never reconnected"
    assert gets[0].headers.get("last-event-id")


def test_reload_mid_answer_follows_the_live_stream(
    page: Any, context: Any, mock: MockServer
) -> None:
    """A reload mid-answer finds the live stream through the session and shows the whole
    answer."""
    start(page, context)
    page.reload()
    page.wait_for_selector('.ub-app[data-ready="true"]')
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    final = page.evaluate("() => window.unbrokenChat.messages().at(-1)")
    assert final["role"] == "assistant"
    assert final["content"] == expected()
