"""The chat page in a real browser: streaming, stop, controls, sessions, errors, keys."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.browser.conftest import ASSISTANT, CONTENT, MESSAGE, MOCK, SEND, STOP, shot
from unbroken.mock import MockServer, answer_text

pytestmark = pytest.mark.browser

# Records, at every DOM change, the text of the last answer and its state.
WATCH = """() => {
  window.__samples = [];
  const log = document.querySelector('[role="log"]');
  new MutationObserver(() => {
    const answers = log.querySelectorAll('[data-role="assistant"]');
    const last = answers[answers.length - 1];
    if (!last) return;
    const text = last.querySelector('[data-part="content"]').textContent;
    const prev = window.__samples[window.__samples.length - 1];
    if (!prev || prev.text !== text || prev.state !== last.dataset.state)
      window.__samples.push({text, state: last.dataset.state});
  }).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def messages(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("() => window.unbrokenChat.messages()")  # type: ignore[no-any-return]


def rendered(page: Any, markdown: str) -> str:
    """The text the page's own renderer makes of `markdown` (in one go, not streamed)."""
    return page.evaluate(  # type: ignore[no-any-return]
        """async (source) => {
          const m = await import('/static/render.js');
          const div = document.createElement('div');
          div.append(m.renderMarkdown(source));
          return div.textContent;
        }""",
        markdown,
    )


def test_answer_streams_in_and_equals_the_fault_free_answer(page: Any, mock: MockServer) -> None:
    """The text grows over many samples before `done`, and ends as the mock's answer."""
    page.evaluate(WATCH)
    page.fill(MESSAGE, "hello")
    page.click(SEND)
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    expected = answer_text("deepseek-chat", [{"role": "user", "content": "hello"}], config=MOCK)[1]
    samples = page.evaluate("() => window.__samples")
    growing = [s["text"] for s in samples if s["state"] == "streaming" and s["text"]]
    assert len(set(growing)) >= 5
    assert messages(page)[-1]["content"] == expected
    final = page.locator(f"{ASSISTANT} {CONTENT}").last.text_content()
    assert final == rendered(page, expected)
    assert page.locator('[role="status"]').is_hidden()  # no buffering notice on a live stream


def test_stop_cancels_the_upstream_within_a_second(
    page: Any, context: Any, mock: MockServer
) -> None:
    """Stop ends the answer, and the mock sees its stream cancelled within one second."""
    context.set_extra_http_headers({"X-Mock-Tokens": "1000"})
    page.fill(MESSAGE, "a long one")
    page.click(SEND)
    page.wait_for_function(
        "() => (document.querySelector('[data-role=assistant] [data-part=content]')"
        " || {textContent: ''}).textContent.length > 20"
    )
    assert mock.stats()["streams"]["cancelled"] == 0
    shot(page, "streaming")
    clicked = time.monotonic()
    page.click(STOP)
    while mock.stats()["streams"]["cancelled"] < 1:
        assert time.monotonic() - clicked < 1.0, "the upstream was not cancelled within 1 s"
        time.sleep(0.02)  # polling the mock's counters
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]')
    assert len(messages(page)[-1]["content"]) < 1000
