"""The gateway's answer cache: serve FAQ traffic from it, and stand in for a dead upstream.

Two modes, both off until `[gateway.cache] store` is set:

* **degrade** (on with the cache): when the upstream is down - the cache's own breaker is
  open after `degrade_after_failures` answers in a row failed before any output, or this
  answer's upstream call failed - a cached answer is replayed, marked `stale`; a request
  with no entry gets a clean 503 with Retry-After. While the breaker is open no request
  waits for the upstream's retries to run out; one probe at a time checks for recovery.
* **serve** (opt-in per model or key name, for requests at or below
  `serve_max_temperature`): a hit is replayed as a stream at `pace_s` per chunk (0: at
  once), marked `hit`, without an upstream call.

Marks are in three places: the `X-Unbroken-Cache` header, each chunk's `unbroken` field and
an SSE comment. Only whole `stop` answers are stored (`core.cache.is_storable`). Imports
core, client, stores, settings and gateway siblings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter

from unbroken.client import AsyncStream
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.breaker import CircuitBreaker
from unbroken.core.cache import (
    CachedAnswer,
    CacheStatus,
    cache_key,
    decode_entry,
    encode_entry,
    is_storable,
    replay_batches,
    replay_frames,
)
from unbroken.core.wire import Answer, ChatCompletionChunk, decode_chunk
from unbroken.errors import StoreError
from unbroken.gateway.asgi import Exchange
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import ChatRequest
from unbroken.stores.cache import AnswerStore, open_answer_store

if TYPE_CHECKING:
    from unbroken.settings import CacheSettings

__all__ = ["AnswerCache", "RecordingStream"]

logger = logging.getLogger(__name__)

# One timer and one write per this many seconds of a paced replay (frames due together go
# together): 20 updates a second still reads as typing, and bench/cache.py measured each
# tick at 50-90 us of CPU, so a shorter tick would cost more than the chunks themselves.
REPLAY_TICK_S = 0.05
_SSE = b"text/event-stream; charset=utf-8"


class RecordingStream(AsyncStream):
    """An `AsyncStream` that keeps every chunk it hands out, for the cache to store.

    Delegates to `inner`; the chunks are kept as objects and encoded once, when stored.
    """

    def __init__(self, inner: AsyncStream) -> None:  # a pure proxy: no super().__init__
        self._inner = inner
        self.chunks: list[ChatCompletionChunk] = []

    async def __anext__(self) -> ChatCompletionChunk:
        chunk = await self._inner.__anext__()
        self.chunks.append(chunk)
        return chunk

    async def final(self) -> Answer:
        """See `AsyncStream.final`."""
        async for _ in self:
            pass
        return await self._inner.final()

    def current(self) -> Answer:
        """See `AsyncStream.current`."""
        return self._inner.current()

    async def aclose(self) -> None:
        """See `AsyncStream.aclose`."""
        await self._inner.aclose()

    def encoded(self) -> list[bytes]:
        """The chunks kept, as the JSON the gateway relays."""
        encode = msgspec.json.encode
        return [encode(c) for c in self.chunks]


class AnswerCache:
    """Lookups, storing and replays of cached answers (see the module docstring).

    Args:
        settings: `[gateway.cache]`.
        registry: where the cache's metrics go.
        store: the backend; default `open_answer_store(settings.store)`.
    """

    def __init__(
        self,
        settings: CacheSettings,
        registry: CollectorRegistry,
        store: AnswerStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or open_answer_store(settings.store, max_bytes=settings.max_bytes)
        self.breaker = CircuitBreaker(
            failure_threshold=settings.degrade_after_failures, cooldown_s=settings.probe_after_s
        )
        self._serve_models = frozenset(settings.serve_models)
        self._serve_keys = frozenset(settings.serve_keys)
        self.lookups = Counter(
            "unbroken_gateway_cache_lookups_total",
            "Answer-cache lookups by result (hit, miss, stale)",
            ["result"],
            registry=registry,
        )
        self.stores = Counter(
            "unbroken_gateway_cache_stores_total",
            "Answers stored in the answer cache",
            registry=registry,
        )
        self.errors = Counter(
            "unbroken_gateway_cache_errors_total",
            "Answer-cache backend failures (the request goes on without the cache)",
            registry=registry,
        )

    def __repr__(self) -> str:
        return f"AnswerCache(store={self.store!r})"

    # -- decisions ---------------------------------------------------------------------------

    @staticmethod
    def key(request: ChatRequest) -> str:
        """The cache key of a checked request (`core.cache.cache_key`)."""
        return cache_key({**request.extra, "model": request.model, "messages": request.messages})

    def serves(self, caller: Caller, request: ChatRequest) -> bool:
        """Is this request opted in to serve mode (a hit is answered without the upstream)?"""
        if request.model not in self._serve_models and caller.name not in self._serve_keys:
            return False
        temperature = request.extra.get("temperature", 1.0)
        return (
            isinstance(temperature, int | float)
            and temperature <= self.settings.serve_max_temperature
        )

    def upstream_down(self) -> bool:
        """True while the degrade breaker is open (no probe is due)."""
        return self.settings.degrade and not self.breaker.allow(time.monotonic())

    def record(self, *, failed_before_output: bool) -> None:
        """Tell the degrade breaker how an upstream call ended."""
        now = time.monotonic()
        if failed_before_output:
            self.breaker.record_failure(now)
        else:
            self.breaker.record_success(now)

    # -- the store ---------------------------------------------------------------------------

    async def get(self, key: str) -> CachedAnswer | None:
        """The entry under `key`; a backend failure counts as a miss (and is counted)."""
        try:
            data = await self.store.get(key, time.time())
        except StoreError as exc:
            self.errors.inc()
            logger.warning("answer cache lookup failed: %s", exc)
            return None
        return decode_entry(data) if data is not None else None

    async def remember(self, key: str, chunks: list[bytes], answer: Answer) -> bool:
        """Store a finished answer (its chunks, as relayed) when `core.cache.is_storable`
        allows it.

        Returns:
            True when it was stored.
        """
        if not is_storable(
            [c.finish_reason for c in answer.choices],
            # An answer that needed a fallback route is another route's (maybe another
            # model's) stand-in: never what later askers of this request should get.
            degraded=answer.unbroken.fallbacks > 0,
            tool_calls_ok=self.settings.store_tool_calls,
        ):
            return False
        entry = CachedAnswer(answer.model, time.time(), chunks)
        try:
            await self.store.put(key, encode_entry(entry), time.time(), self.settings.ttl_s)
        except StoreError as exc:
            self.errors.inc()
            logger.warning("answer cache store failed: %s", exc)
            return False
        self.stores.inc()
        return True

    # -- replay ------------------------------------------------------------------------------

    async def replay(
        self, ex: Exchange, entry: CachedAnswer, status: CacheStatus, *, stream: bool
    ) -> None:
        """Answer from `entry`: SSE paced per `pace_s` (a hit) or at once (stale), or one
        JSON completion when the request did not stream."""
        self.lookups.labels(status).inc()
        header = [(b"x-unbroken-cache", status.encode())]
        if not stream:
            await ex.respond(200, _folded(entry, status), headers=header)
            return
        frames = replay_frames(entry, status, time.time())
        await ex.start(
            200,
            [
                (b"content-type", _SSE),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *header,
            ],
        )
        pace_s = self.settings.pace_s if status == "hit" else 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        for offset, end in replay_batches(len(frames), pace_s, REPLAY_TICK_S):
            delay = started + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            body = b"".join(frames[sent:end])
            sent = end
            more = end < len(frames)
            await ex.send({"type": "http.response.body", "body": body, "more_body": more})

    def miss(self) -> None:
        """Count a lookup that found nothing."""
        self.lookups.labels("miss").inc()

    def unavailable(self) -> GatewayError:
        """The 503 for a request with no entry while the upstream is down."""
        return GatewayError(
            503,
            "the upstream is unavailable and this request has no cached answer; retry later",
            type="server_error",
            code="upstream_unavailable",
            retry_after_s=self.settings.probe_after_s,
        )

    async def aclose(self) -> None:
        """Close the backend."""
        await self.store.aclose()


def _folded(entry: CachedAnswer, status: CacheStatus) -> bytes:
    acc = ChunkAccumulator()
    for raw in entry.chunks:
        acc.feed(decode_chunk(raw))
    completion = msgspec.to_builtins(acc.completion())
    completion["unbroken"] = {"cache": status}
    return msgspec.json.encode(completion)
