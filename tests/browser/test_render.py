"""What answers look like and what they cannot do: Markdown, code, Chinese and emoji
rendered (screenshots at 1280 and 375 px, light and dark, kept as artefacts), an XSS payload
in an answer left inert, and the page's Content-Security-Policy."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.browser.conftest import ASSISTANT, CONTENT, MESSAGE, SEND, shot
from unbroken.mock import MockServer, ServerThread

pytestmark = pytest.mark.browser

RICH = """/echo ## 配送与退货 Shipping & returns 📦

Your order **#4521** ships *today*. 你的订单今天发货 🚚✨ — track it with `track(4521)`.

1. Pack the item 📦
2. Print the label 🏷️
3. Drop it off — 退货免费

| 项目 Item | Price |
|---|---|
| 运费 Shipping | $0 |
| 退货 Returns | 免费 free 🎉 |

> 提示: a receipt is not needed 👍🏽

```python
def refund(order_id: int, reason: str = "不合适 / does not fit") -> dict[str, object]:
    return {"order": order_id, "reason": reason, "status": "approved", "note": "a very long line that must scroll inside its block instead of widening the page"}
```

👩‍💻 Questions? [Contact us](https://shop.example/contact) 🇨🇳🇫🇷"""

XSS = """/echo Hello <img src=x onerror="window.__xss='img'"> there.

<script>window.__xss='script'</script>

[click me](javascript:window.__xss='link') and <a href="javascript:window.__xss='a'">this</a>

<svg onload="window.__xss='svg'"><circle r=5 /></svg>
<iframe srcdoc="<script>parent.__xss='iframe'</script>"></iframe>
<details open ontoggle="window.__xss='details'">x</details>
<form action="javascript:window.__xss='form'"><button>go</button></form>
<a href="data:text/html,<script>alert(1)</script>">data</a>
<p style="background:url(javascript:window.__xss='style')">styled</p>"""


def ask(page: Any, text: str) -> Any:
    page.fill(MESSAGE, text)
    page.click(SEND)
    answer = page.locator(ASSISTANT).last
    page.wait_for_selector(f'{ASSISTANT}[data-state="done"]', timeout=20_000)
    return answer


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_markdown_code_chinese_and_emoji_render(page: Any, mock: MockServer, scheme: str) -> None:
    """Headings, lists, tables, highlighted code, Chinese and emoji; no sideways scrolling
    at 375 px; screenshots at 1280 and 375 px."""
    page.emulate_media(color_scheme=scheme)
    answer = ask(page, RICH)
    content = answer.locator(CONTENT)
    assert content.locator("h2").text_content() == "配送与退货 Shipping & returns 📦"
    assert content.locator("ol > li").count() == 3
    assert content.locator("table td").count() == 4
    assert content.locator("pre code .hljs-keyword").count() >= 2  # highlighted
    assert "你的订单今天发货 🚚✨" in (content.text_content() or "")
    link = content.locator("a")
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    shot(page, f"answer-1280-{scheme}")
    page.set_viewport_size({"width": 375, "height": 740})
    shot(page, f"answer-375-{scheme}")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 375
    code = content.locator("pre code")
    assert code.evaluate("(el) => el.scrollWidth > el.clientWidth")  # the long line scrolls


def test_xss_in_an_answer_stays_inert(page: Any, mock: MockServer) -> None:
    """Event handlers, scripts, javascript: links, SVG, iframes and forms from the model
    never run; the text around them still shows."""
    answer = ask(page, XSS)
    content = answer.locator(CONTENT)
    assert "Hello" in (content.text_content() or "")
    html = content.inner_html()
    for bad in ("onerror", "onload", "ontoggle", "<script", "<iframe", "<svg", "<form"):
        assert bad not in html.lower()
    assert content.locator("a[href^='javascript:'], a[href^='data:']").count() == 0
    for link in content.locator("a").all():
        link.click()
    page.wait_for_timeout(300)  # give any payload a chance to fire before checking
    assert page.evaluate("() => window.__xss") is None
    shot(page, "xss")


def test_page_has_a_content_security_policy(gateway: ServerThread) -> None:
    """`/` is sent with a CSP that allows scripts from this origin only."""
    response = httpx.get(gateway.url + "/")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


def test_sse_decoder_in_the_page(page: Any) -> None:
    """The page's SSE decoder: any split of the bytes, LF / CR / CRLF, comments, ids and
    multi-line data give the same events (WHATWG "interpreting an event stream")."""
    stream = (
        ': keep-alive\r\nid: 1\r\ndata: {"a":1}\r\n\r\n'
        "id: 2\rdata: line one\rdata: line two\r\r"
        "event: note\nid: 3\ndata:no space\u2028still data\n\n"
        "data: [DONE]\n\n"
    )
    events = page.evaluate(
        """async (text) => {
          const {SSEDecoder} = await import('/static/stream.js');
          const results = [];
          for (let size = 1; size <= text.length; size += 7) {
            const d = new SSEDecoder();
            const got = [];
            for (let i = 0; i < text.length; i += size) got.push(...d.feed(text.slice(i, i + size)));
            results.push(JSON.stringify(got));
          }
          return results;
        }""",
        stream,
    )
    assert len(set(events)) == 1
    assert json.loads(events[0]) == [
        {"id": "1", "event": "message", "data": '{"a":1}'},
        {"id": "2", "event": "message", "data": "line one\nline two"},
        {"id": "3", "event": "note", "data": "no space\u2028still data"},
        {"id": "3", "event": "message", "data": "[DONE]"},
    ]
