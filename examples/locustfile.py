"""Locust load test for an OpenAI-compatible chat endpoint (an unbroken gateway, the mock
DeepSeek, or any provider): streaming chat completions with the SSE parsed.

Besides Locust's own row for the request (time to the response headers), each answer
reports two custom rows:
  * `TTFT`   - time to the first token of answer text (ms);
  * `STREAM` - time to the end of the answer (ms), with the completion tokens as its
    "size", so Locust's average size column is the mean tokens per answer.
A stream that ends without `data: [DONE]`, or carries an error event, is a failure.

    UNBROKEN_BENCH_API_KEY=sk-... locust -f examples/locustfile.py \
        --host http://127.0.0.1:8788 --headless -u 20 -r 5 -t 1m

Environment: UNBROKEN_BENCH_API_KEY (or OPENAI_API_KEY) - the Bearer key, if the endpoint
needs one; UNBROKEN_BENCH_MODEL (deepseek-chat); UNBROKEN_BENCH_PATH
(/v1/chat/completions); UNBROKEN_BENCH_MAX_TOKENS (unset: not sent).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator

from locust import HttpUser, between, task

API_KEY = os.environ.get("UNBROKEN_BENCH_API_KEY") or os.environ.get("OPENAI_API_KEY")
MODEL = os.environ.get("UNBROKEN_BENCH_MODEL", "deepseek-chat")
PATH = os.environ.get("UNBROKEN_BENCH_PATH", "/v1/chat/completions")
MAX_TOKENS = os.environ.get("UNBROKEN_BENCH_MAX_TOKENS")
PROMPTS = (
    "When will my order arrive?",
    "How do I return a jacket that does not fit?",
    "Is the discount code valid on sale items?",
    "Explain the warranty in two sentences.",
)
_numbers = itertools.count()


def _sse_lines(reads: Iterator[bytes]) -> Iterator[str]:
    """The lines of an event stream. Split on LF (CRLF and CR too) only, as the SSE spec
    says: `str.splitlines()` (what `iter_lines` uses) also splits on U+2028 and U+0085,
    which may appear inside the JSON of a chunk."""
    pending = b""
    for data in reads:
        pending += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8")
    if pending:
        yield pending.decode("utf-8")


class ChatUser(HttpUser):
    """One shopper asking the assistant, a second or so between questions."""

    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        self.client.headers["Content-Type"] = "application/json"
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def _report(self, kind: str, started: float, tokens: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=PATH,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=tokens,
            exception=error,
            context={},
        )

    @task
    def chat(self) -> None:
        n = next(_numbers)
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"{PROMPTS[n % len(PROMPTS)]} (#{n})"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if MAX_TOKENS:
            body["max_tokens"] = int(MAX_TOKENS)
        started = time.perf_counter()
        with self.client.post(
            PATH, data=json.dumps(body), stream=True, catch_response=True, name=PATH
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            first = False
            done = False
            tokens = 0
            pieces = 0
            error: Exception | None = None
            try:
                for line in _sse_lines(response.iter_content(chunk_size=None)):
                    if not line or line.startswith(":") or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = RuntimeError(f"stream error: {chunk['error'].get('message')}")
                        break
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("content") or delta.get("reasoning_content"):
                            pieces += 1
                            if not first:
                                first = True
                                self._report("TTFT", started, 0, None)
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"].get("completion_tokens") or 0)
            except Exception as exc:  # a cut connection or bad JSON fails this answer
                error = exc
            if error is None and not done:
                error = RuntimeError("the stream ended without [DONE]")
            self._report("STREAM", started, tokens or pieces, error)
            if error is None:
                response.success()
            else:
                response.failure(str(error))
