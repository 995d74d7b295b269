"""Helpers for tests (importable as tests.support)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from unbroken.core.stream import ChatStreamDecoder
from unbroken.core.wire import ChatCompletionChunk, ChunkChoice, Delta
from unbroken.gateway.direct import DirectBody
from unbroken.instrumentation import AnswerRecord, AttemptRecord
from unbroken.mock import ServerThread


def require_binary(name: str) -> str:
    """The path of a system binary, or skip the test with a clear reason.

    With UNBROKEN_REQUIRE_BINARIES=1 (set by .ci/run) a missing binary fails instead, so
    CI always runs everything.
    """
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install {name}); .ci/run installs it"
        if os.environ.get("UNBROKEN_REQUIRE_BINARIES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real redis-server on a free loopback port (no persistence, files in `workdir`):
    its process and URL, once it listens. Skips when redis-server is not installed."""
    binary = require_binary("redis-server")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *args, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)  # waiting for the server to listen
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.send_signal(signal.SIGCONT)  # a test may have frozen it
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def gateway_thread(url: str, **options: Any) -> Iterator[ServerThread]:
    """An in-process gateway in front of `url` (a mock), served as `unbroken serve` serves
    it (the guarded protocol, so the live direct-write path is on), forwarding the mock's
    `x-mock-*` control headers; `options` are GatewaySettings fields."""
    from unbroken.gateway.app import create_app
    from unbroken.gateway.guard import guarded_protocol
    from unbroken.settings import GatewaySettings, Settings

    settings = Settings(
        api_key="sk-up",
        base_url=url,
        gateway=GatewaySettings(forward_headers=("x-mock-*",), **options),
    )
    app = create_app(settings)
    with ServerThread(app, lifespan="on", http=guarded_protocol(app.guard)) as server:
        yield server


def held_text_bytes(root: object, *, stop: tuple[type, ...] = (), skip: object = None) -> int:
    """Bytes of the str, bytes and bytearray objects reachable from `root`, not through
    `skip` nor objects of the `stop` types (what holds the text on purpose, e.g. a log)."""
    seen = {id(skip)}
    todo = [root]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, *stop)):
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes | bytearray):
            total += len(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return total


def text_payload(
    text: str, *, role: bool = False, index: int = 0, reasoning: bool = False
) -> bytes:
    """A chunk's JSON as an upstream sends it: one choice whose delta holds `text` (as
    reasoning with `reasoning`; with the assistant's role with `role`)."""
    if reasoning:
        delta = Delta(reasoning_content=text)
    else:
        delta = Delta(role="assistant", content=text) if role else Delta(content=text)
    return msgspec.json.encode(
        ChatCompletionChunk(
            id="chatcmpl-0123456789abcdef",
            model="deepseek-chat",
            created=1733400000,
            system_fingerprint="fp_0123",
            choices=[ChunkChoice(index=index, delta=delta)],
        )
    )


def streaming_cycle(transport: object) -> Any:
    """What a `DirectBody` reads of uvicorn's request cycle, for a streaming POST response
    whose transport is `transport`."""
    return SimpleNamespace(
        response_started=True,
        chunked_encoding=True,
        response_complete=False,
        disconnected=False,
        flow=SimpleNamespace(write_paused=False),
        transport=transport,
        scope={"method": "POST"},
    )


def direct_body(transport: object) -> DirectBody:
    """A `DirectBody` on a streaming response whose transport is `transport`."""
    return DirectBody(streaming_cycle(transport))


def answer_record(
    outcome: str = "complete", ttft_s: float | None = 0.2, model: str = "m"
) -> AnswerRecord:
    """One answer's record of route "r" (1 attempt, 10 + 4 tokens, $0.25, 1.5 s)."""
    return AnswerRecord(
        route="r",
        model=model,
        outcome=outcome,
        attempts=1,
        resumes=0,
        fallbacks=0,
        ttft_s=ttft_s,
        duration_s=1.5,
        prompt_tokens=10,
        completion_tokens=4,
        cost_usd=0.25,
    )


class Wire:
    """A stand-in stream transport: records each write; `closing` and `aborted` are what a
    test sets or reads."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class DecodedSource:
    """The template source of a relayed answer's log, as the gateway's: the SDK stream's
    decoder of the same events (`feed` each event's payload; FINAL-like events the SDK
    never sees are for the caller to skip)."""

    def __init__(self) -> None:
        self.decoder = ChatStreamDecoder()

    def text_template(self) -> tuple[bytes, bytes] | None:
        return self.decoder.text_template

    def feed(self, payload: bytes) -> None:
        """Decode `payload`'s event as a relay does."""
        event = b"data: " + payload + b"\n\n"
        if self.decoder.feed_one(event) is None:
            assert self.decoder.feed(event)


def on_loop(name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on a new event loop: asyncio's ("asyncio") or uvloop's ("uvloop", skipped
    where uvloop is missing)."""
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class Watched(asyncio.Protocol):
    """A protocol as the loop sees it: hands every event to `inner` (the transport's own
    connection), and calls `before_made` before and `after_made` after the connection's
    `connection_made`."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        *,
        before_made: Callable[[], None] | None = None,
        after_made: Callable[[], None] | None = None,
    ) -> None:
        self.inner = inner
        self.before_made = before_made
        self.after_made = after_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.before_made is not None:
            self.before_made()
        self.inner.connection_made(transport)
        if self.after_made is not None:
            self.after_made()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class RecordingHook:
    """An SDK hook that keeps the attempt and answer records it was given."""

    def __init__(self) -> None:
        self.attempts: list[AttemptRecord] = []
        self.answers: list[AnswerRecord] = []

    def on_stream_start(self) -> None:
        pass

    def on_attempt(self, record: AttemptRecord) -> None:
        self.attempts.append(record)

    def on_answer(self, record: AnswerRecord) -> None:
        self.answers.append(record)

    def on_breaker(self, route: str, state: Any) -> None:
        pass
