"""The conversation controls in a real browser: regenerate, edit and resend, copy, the
sessions list (new, rename, delete), the reasoner's collapsible reasoning, errors with a
retry, the gateway-key prompt, keyboard use and accessibility."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser.conftest import (
    ASSISTANT,
    CONTENT,
    MESSAGE,
    MOCK,
    REASONING,
    SEND,
    STOP,
    USER,
    gateway_settings,
    shot,
)
from unbroken.gateway.app import create_app
from unbroken.mock import MockServer, ServerThread, answer_text
from unbroken.settings import KeySettings, hash_key

pytestmark = pytest.mark.browser

DONE = f'{ASSISTANT}[data-state="done"]'


def ask(page: Any, text: str, n_done: int) -> None:
    page.fill(MESSAGE, text)
    page.click(SEND)
    page.wait_for_selector(f"{DONE} >> nth={n_done - 1}", timeout=20_000)


def session(gateway: ServerThread, page: Any) -> dict[str, Any]:
    sid = page.evaluate("() => window.unbrokenChat.sessionId")
    return httpx.get(f"{gateway.url}/v1/sessions/{sid}").json()  # type: ignore[no-any-return]


def test_regenerate_and_edit_replace_the_stored_turns(
    page: Any, gateway: ServerThread, mock: MockServer
) -> None:
    """Regenerate asks again in place; edit and resend replaces the turn and its answer;
    the server's session holds one user turn and one answer throughout."""
    ask(page, "/echo first answer", 1)
    page.click(f'{ASSISTANT} button[aria-label="Regenerate"]')
    page.wait_for_selector(DONE)
    assert page.locator(ASSISTANT).count() == 1
    assert [m["role"] for m in session(gateway, page)["messages"]] == ["user", "assistant"]
    page.click(f'{USER} button[aria-label="Edit"]')
    page.fill('textarea[aria-label="Edit message"]', "/echo edited **answer**")
    page.keyboard.press("Enter")
    page.wait_for_selector(DONE)
    assert page.locator(f"{ASSISTANT} {CONTENT} strong").text_content() == "answer"
    stored = session(gateway, page)["messages"]
    assert [m["content"] for m in stored] == ["/echo edited **answer**", "edited **answer**"]


def test_copy_puts_the_markdown_on_the_clipboard(
    page: Any, context: Any, gateway: ServerThread, mock: MockServer
) -> None:
    """Copy gives the answer's Markdown source, byte for byte."""
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.url)
    ask(page, "/echo a `code` and 中文 🚀", 1)
    page.click(f'{ASSISTANT} button[aria-label="Copy"]')
    assert page.evaluate("() => navigator.clipboard.readText()") == "a `code` and 中文 🚀"


def test_sessions_list_new_rename_delete(
    page: Any, gateway: ServerThread, mock: MockServer
) -> None:
    """New chat starts empty; rename and delete act on the gateway's sessions."""
    ask(page, "/echo one", 1)
    sid = page.evaluate("() => window.unbrokenChat.sessionId")
    item = page.locator(f'li[data-session-id="{sid}"]')
    item.locator('button[aria-label="Rename"]').click()
    page.fill('input[aria-label="Title"]', "Order 4521 问题")
    page.keyboard.press("Enter")
    page.wait_for_selector(f'li[data-session-id="{sid}"] >> text="Order 4521 问题"')
    assert httpx.get(f"{gateway.url}/v1/sessions/{sid}").json()["title"] == "Order 4521 问题"
    page.click('button[aria-label="New chat"]')
    assert page.locator(ASSISTANT).count() == 0
    ask(page, "/echo two", 1)
    assert page.evaluate("() => window.unbrokenChat.sessionId") != sid
    page.locator(f'li[data-session-id="{sid}"] button[aria-label="Delete"]').click()
    page.wait_for_selector(f'li[data-session-id="{sid}"]', state="detached")
    assert httpx.get(f"{gateway.url}/v1/sessions/{sid}").status_code == 404


def test_reasoning_shows_while_thinking_then_collapses(page: Any, mock: MockServer) -> None:
    """The reasoner's reasoning streams into an open block that folds once the answer
    starts; both equal the mock's."""
    page.select_option('select[aria-label="Model"]', "deepseek-reasoner")
    page.fill(MESSAGE, "think first")
    page.click(SEND)
    block = page.locator(f"{ASSISTANT} details")
    page.wait_for_function(
        "() => document.querySelector('[data-part=reasoning]').textContent.length > 0"
    )
    assert block.evaluate("(el) => el.open")
    shot(page, "reasoning-open")
    page.wait_for_selector(DONE, timeout=30_000)
    shot(page, "reasoning-folded")
    assert not block.evaluate("(el) => el.open")
    reasoning, content = answer_text(
        "deepseek-reasoner", [{"role": "user", "content": "think first"}], config=MOCK
    )
    assert page.locator(f"{ASSISTANT} {REASONING}").text_content() == reasoning
    last = page.evaluate("() => window.unbrokenChat.messages().at(-1)")
    assert (last["reasoning"], last["content"]) == (reasoning, content)
    assert "Thought" in (block.locator("summary").text_content() or "")


def test_an_error_shows_inline_and_retry_answers(page: Any, context: Any, mock: MockServer) -> None:
    """A refused request is an error in the conversation with a Retry, never an alert."""
    context.set_extra_http_headers({"X-Mock-Fault": "400 times=1"})
    page.fill(MESSAGE, "hello")
    page.click(SEND)
    failed = page.locator(f'{ASSISTANT}[data-state="error"]')
    failed.wait_for()
    assert failed.locator('[data-part="error"]').is_visible()
    shot(page, "error-inline")
    failed.locator('button[aria-label="Retry"]').click()
    page.wait_for_selector(DONE, timeout=20_000)
    assert page.locator(ASSISTANT).count() == 1


def test_keyboard_enter_shift_enter_and_escape(page: Any, mock: MockServer) -> None:
    """Shift+Enter adds a line, Enter sends, Esc stops."""
    box = page.locator(MESSAGE)
    box.focus()
    page.keyboard.type("/echo line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two " + "word " * 200)
    assert "\n" in box.input_value()
    page.keyboard.press("Enter")
    page.wait_for_selector(STOP)
    page.wait_for_function(
        "() => document.querySelector('[data-role=assistant] [data-part=content]')"
        ".textContent.length > 5"
    )
    page.keyboard.press("Escape")
    page.wait_for_selector(DONE)
    answer = page.evaluate("() => window.unbrokenChat.messages().at(-1)")["content"]
    whole = "line one\nline two " + "word " * 200
    assert answer
    assert whole.startswith(answer)
    assert len(answer) < len(whole)
    assert page.locator(STOP).is_hidden()


def test_accessibility_labels_live_region_and_focus_order(page: Any) -> None:
    """Every control has a label, answers are in a live log, and Tab reaches the model
    picker, then the conversation, then the message box and Send."""
    assert page.locator('[role="log"][aria-live="polite"]').count() == 1
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('button, select, textarea, input')]
             .filter((el) => !el.closest('[hidden]'))
             .filter((el) => !(el.getAttribute('aria-label') || el.textContent.trim()))
             .map((el) => el.outerHTML)"""
    )
    assert unlabeled == []
    order: list[str] = []
    while "Send" not in order and len(order) < 60:
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.getAttribute('aria-label')"))
    wanted = ["Model", "Conversation", "Message", "Send"]
    positions = [order.index(label) for label in wanted]
    assert positions == sorted(positions), order


@pytest.fixture(scope="module")
def keyed_gateway(mock_server: MockServer) -> Iterator[ServerThread]:
    settings = gateway_settings(
        mock_server.url, keys=(KeySettings("web", hash_key("sk-web-key-1")),)
    )
    with ServerThread(create_app(settings), lifespan="on") as server:
        yield server


def test_key_prompt_keeps_the_key_in_session_storage(
    context: Any, keyed_gateway: ServerThread, mock: MockServer
) -> None:
    """With keys configured the page asks for one, keeps it in sessionStorage (never the
    URL), and a wrong one is said so in the page."""
    page = context.new_page()
    page.goto(keyed_gateway.url + "/")
    key_box = page.locator('input[aria-label="Gateway key"]')
    key_box.wait_for()
    shot(page, "key-prompt")
    key_box.fill("sk-wrong")
    page.keyboard.press("Enter")
    page.wait_for_selector("text=invalid gateway API key")
    key_box.fill("sk-web-key-1")
    page.keyboard.press("Enter")
    page.wait_for_selector('.ub-app[data-ready="true"]')
    ask(page, "hello", 1)
    assert page.evaluate("() => sessionStorage.getItem('unbroken.gateway-key')") == "sk-web-key-1"
    assert page.evaluate("() => localStorage.length") == 0 or "sk-web" not in page.evaluate(
        "() => JSON.stringify(localStorage)"
    )
    assert "sk-web" not in page.url
