"""Time from the mock's first token to the first visible character of the chat page.

Runs the mock DeepSeek (paced tokens), the gateway and Debian's chromium (headless, via
Playwright). Each round sends one message and reads, from the page, `performance.now()` when
the read that brought the first token resolved and when the first frame after that token was
in the DOM had been painted (requestAnimationFrame, then a task). Side by side in the same
run, a bare page does the least possible with the same stream (fetch, split lines, parse,
append to `textContent`) and is timed the same way: the floor any page could reach.

Two figures per answer:
  * in page: the first token's arrival in the page -> painted (the page's own cost);
  * end to end: the mock's first token (its arrival wall time + the configured TTFT) ->
    painted, on the browser's wall clock (`performance.timeOrigin`): gateway, loopback and
    page together. Both clocks are this machine's.

    python bench/page.py [--rounds 15] [--token-ms 30] [--ttft-ms 300]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from typing import Any

from playwright.sync_api import sync_playwright

from unbroken.gateway.app import create_app
from unbroken.mock import Latency, MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings

BAR_MS = 50.0
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# The floor: the same session request, the least work per chunk, the same timing.
PEER = """async (text) => {
  const out = document.body.appendChild(document.createElement('pre'));
  const s = await (await fetch('/v1/sessions', {method: 'POST', body: '{}',
    headers: {'Content-Type': 'application/json'}})).json();
  const sentAt = performance.now();
  const res = await fetch(`/v1/sessions/${s.id}/messages`, {method: 'POST',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify({content: text})});
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '', firstTokenAt = null, firstVisibleAt = null, done = false;
  const visible = new Promise((resolve) => {
    window.__markVisible = () => requestAnimationFrame(() => {
      const ch = new MessageChannel();
      ch.port1.onmessage = () => { firstVisibleAt = performance.now(); resolve(); };
      ch.port2.postMessage(null);
    });
  });
  while (!done) {
    const {value, done: end} = await reader.read();
    const at = performance.now();
    if (end) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf('\\n\\n')) >= 0) {
      const block = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of block.split('\\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') { done = true; break; }
        const piece = JSON.parse(data).choices?.[0]?.delta?.content;
        if (piece) {
          out.textContent += piece;
          if (firstTokenAt === null) { firstTokenAt = at; window.__markVisible(); }
        }
      }
    }
  }
  await visible;
  return {sentAt, firstTokenAt, firstVisibleAt, origin: performance.timeOrigin};
}"""

OURS = """async (text) => {
  const chat = window.unbrokenChat;
  const box = document.querySelector('textarea[aria-label="Message"]');
  box.value = text;
  document.querySelector('button[aria-label="Send"]').click();
  await new Promise((resolve) => {
    const check = () => {
      const m = chat.messages().at(-1);
      if (m && m.role === 'assistant' && m.state !== 'streaming' && m.firstVisibleAt !== null)
        resolve();
      else setTimeout(check, 20);
    };
    check();
  });
  const m = chat.messages().at(-1);
  return {state: m.state, firstTokenAt: m.firstTokenAt, firstVisibleAt: m.firstVisibleAt,
          origin: performance.timeOrigin};
}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--token-ms", type=float, default=30.0)
    parser.add_argument("--ttft-ms", type=float, default=300.0)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    config = MockConfig(
        seed=1,
        latency=Latency(ttft_ms=args.ttft_ms, token_ms=args.token_ms),
        answer_tokens=(20, 30),
    )
    with (
        MockServer(config) as mock,
        ServerThread(
            create_app(Settings(api_key="sk-up", base_url=mock.url, gateway=GatewaySettings())),
            lifespan="on",
        ) as gateway,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        ours_page = browser.new_context().new_page()
        ours_page.goto(gateway.url + "/")
        ours_page.wait_for_selector('.ub-app[data-ready="true"]')
        peer_page = browser.new_context().new_page()
        peer_page.goto(gateway.url + "/healthz")
        results: dict[str, list[tuple[float, float]]] = {"page": [], "bare": []}
        for n in range(args.rounds):
            for name, page, script in (("page", ours_page, OURS), ("bare", peer_page, PEER)):
                page.bring_to_front()
                got: dict[str, Any] = page.evaluate(script, f"question {n} for {name}")
                entry = mock.log(1)[-1]
                in_page = got["firstVisibleAt"] - got["firstTokenAt"]
                mock_first_ms = entry["time"] * 1000 + args.ttft_ms
                end_to_end = got["origin"] + got["firstVisibleAt"] - mock_first_ms
                results[name].append((in_page, end_to_end))
        browser.close()
    print(
        f"{args.rounds} answers each, tokens every {args.token_ms:g} ms, TTFT {args.ttft_ms:g} ms"
    )
    print(f"{'':8} {'in page p50':>12} {'max':>8} {'end to end p50':>15} {'max':>8}")
    medians = {}
    for name, rows in results.items():
        in_page = [r[0] for r in rows]
        e2e = [r[1] for r in rows]
        medians[name] = (statistics.median(in_page), statistics.median(e2e))
        print(
            f"{name:8} {medians[name][0]:>10.1f}ms {max(in_page):>6.1f}ms "
            f"{medians[name][1]:>13.1f}ms {max(e2e):>6.1f}ms"
        )
    ratio = medians["page"][0] / medians["bare"][0] if medians["bare"][0] else float("inf")
    print(f"page / bare (in page, medians): {ratio:.2f}x")
    worst = max(r[1] for r in results["page"])
    verdict = "met" if medians["page"][1] <= BAR_MS else "NOT met"
    print(
        f"bar: mock's first token -> first visible character <= {BAR_MS:g} ms: {verdict} "
        f"(median {medians['page'][1]:.1f} ms end to end, worst {worst:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
