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
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter

from unbroken.client import AsyncStream
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.breaker import CircuitBreaker
from unbroken.core.cache import (
    CachedAnswer,
    CacheStatus,
    RenderedReplay,
    cache_key,
    decode_entry,
    encode_entry,
    frames_due,
    is_storable,
    render_replay,
    replay_comment,
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

__all__ = ["AnswerCache", "CacheHit", "RecordingStream", "ReplayClock"]

logger = logging.getLogger(__name__)

# Paced replays wake together on one shared tick of this many seconds and each writes the
# frames that became due since its last write. A paced hit's cost is its writes, not its
# chunks: one socket write per tick and stream (bench/cache.py, 20 streams at 5 ms a chunk:
# 11-13 us per chunk with a 50 ms timer per stream, 5.7 us with this shared tick at 50 ms,
# 4.0-4.5 us at 100 ms). Ten updates a second still reads as typing: each carries 100 ms
# of text (5 chunks at the default 20 ms pace), not a whole paragraph.
REPLAY_TICK_S = 0.1
# Decoded entries and their rendered replays kept in memory (by bytes of stored entry), so
# a hot FAQ answer is decoded and rendered once, not per hit.
RENDERED_MAX_BYTES = 32 * 1024 * 1024
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


class CacheHit:
    """A looked-up entry, with its replays rendered on first use (see `AnswerCache.get`).

    Attributes:
        entry: the decoded entry.
        raw: the stored bytes it was decoded from (a later lookup that finds the same bytes
            reuses this hit).
    """

    __slots__ = ("_rendered", "entry", "raw")

    def __init__(self, entry: CachedAnswer, raw: bytes) -> None:
        self.entry = entry
        self.raw = raw
        self._rendered: dict[CacheStatus, RenderedReplay] = {}

    def __repr__(self) -> str:
        return f"CacheHit(model={self.entry.model!r}, chunks={len(self.entry.chunks)})"

    def rendered(self, status: CacheStatus) -> RenderedReplay:
        """The SSE events of this entry marked `status`, rendered once."""
        replay = self._rendered.get(status)
        if replay is None:
            replay = self._rendered[status] = render_replay(self.entry, status)
        return replay


class ReplayClock:
    """One shared tick for every paced replay of a process.

    A replay awaits `tick()` between writes; one timer, aligned to multiples of `tick_s`
    on the loop's clock, wakes every waiting replay in the same loop iteration. With a
    timer per stream, N streams cost N timers and up to N separate wake-ups per tick.

    Args:
        tick_s: the tick.
    """

    def __init__(self, tick_s: float = REPLAY_TICK_S) -> None:
        self.tick_s = tick_s
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"ReplayClock(tick_s={self.tick_s}, waiting={self.n_waiting})"

    @property
    def n_waiting(self) -> int:
        """Replays waiting for the next tick."""
        return sum(not w.done() for w in self._waiters)

    async def tick(self) -> None:
        """Return at the next tick."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._timer is None:
            tick_s = self.tick_s
            self._timer = loop.call_at((loop.time() // tick_s + 1) * tick_s, self._fire)
        # A cancelled waiter only cancels its own future: the others still wake.
        await waiter

    def _fire(self) -> None:
        self._timer = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


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
        self.clock = ReplayClock()
        self._hits: OrderedDict[str, CacheHit] = OrderedDict()
        self._hits_bytes = 0
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
        self.invalidations = Counter(
            "unbroken_gateway_cache_invalidations_total",
            "Admin invalidations of the answer cache by scope (key, request, model, all)",
            ["scope"],
            registry=registry,
        )
        self.invalidated = Counter(
            "unbroken_gateway_cache_invalidated_entries_total",
            "Answer-cache entries removed by admin invalidations",
            registry=registry,
        )
        # Every series exists from the start at 0, so a rate() or an alert on one is defined
        # before its first event.
        for result in ("hit", "miss", "stale"):
            self.lookups.labels(result)
        for scope in ("key", "request", "model", "all"):
            self.invalidations.labels(scope)

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

    async def get(self, key: str) -> CacheHit | None:
        """The entry under `key`; a backend failure counts as a miss (and is counted).

        The store is asked every time (it owns expiry and invalidation); when it returns the
        bytes of the last lookup, the entry decoded and rendered then is reused.
        """
        try:
            data = await self.store.get(key, time.time())
        except StoreError as exc:
            self.errors.inc()
            logger.warning("answer cache lookup failed: %s", exc)
            return None
        if data is None:
            self._forget(key)
            return None
        hit = self._hits.get(key)
        if hit is not None and (hit.raw is data or hit.raw == data):
            self._hits.move_to_end(key)
            return hit
        entry = decode_entry(data)
        if entry is None:
            self._forget(key)
            return None
        self._forget(key)
        hit = self._hits[key] = CacheHit(entry, data)
        # Rendered, a replay is about as big as its entry; each status kept is one more.
        self._hits_bytes += 3 * len(data)
        while self._hits_bytes > RENDERED_MAX_BYTES and len(self._hits) > 1:
            self._forget(next(iter(self._hits)))
        return hit

    def _forget(self, key: str) -> None:
        hit = self._hits.pop(key, None)
        if hit is not None:
            self._hits_bytes -= 3 * len(hit.raw)

    async def remember(
        self, key: str, chunks: list[bytes], answer: Answer, model: str | None = None
    ) -> bool:
        """Store a finished answer (its chunks, as relayed) when `core.cache.is_storable`
        allows it, tagged with the model asked for (`model`, default the answer's), so
        `invalidate_model` finds it.

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
            await self.store.put(
                key,
                encode_entry(entry),
                time.time(),
                self.settings.ttl_s,
                model=model or answer.model,
            )
        except StoreError as exc:
            self.errors.inc()
            logger.warning("answer cache store failed: %s", exc)
            return False
        self.stores.inc()
        return True

    # -- invalidation (gateway/cache_admin.py) -------------------------------------------------

    async def invalidate_key(self, key: str, scope: str = "key") -> int:
        """Forget the entry under `key`; returns how many were removed (0 or 1).

        Raises:
            StoreError: the backend failed (nothing is counted).
        """
        self._forget(key)
        return self._invalidated(scope, await self.store.delete(key))

    async def invalidate_model(self, model: str) -> int:
        """Forget every entry stored for requests of `model`; returns how many."""
        self._forget_all()
        return self._invalidated("model", await self.store.delete_model(model))

    async def invalidate_all(self) -> int:
        """Forget every entry; returns how many."""
        self._forget_all()
        return self._invalidated("all", await self.store.delete())

    def _forget_all(self) -> None:
        # Only a memo: a lookup checks it against the store's bytes anyway.
        self._hits.clear()
        self._hits_bytes = 0

    def _invalidated(self, scope: str, n: int) -> int:
        self.invalidations.labels(scope).inc()
        self.invalidated.inc(n)
        return n

    # -- replay ------------------------------------------------------------------------------

    async def replay(
        self, ex: Exchange, hit: CacheHit, status: CacheStatus, *, stream: bool
    ) -> None:
        """Answer from `hit`: SSE paced per `pace_s` (a hit) or at once (stale), or one
        JSON completion when the request did not stream.

        A paced replay writes slices of the replay rendered once per entry (no per-chunk
        work), waking on the shared `ReplayClock` tick: one write per tick per stream.
        """
        self.lookups.labels(status).inc()
        header = [(b"x-unbroken-cache", status.encode())]
        if not stream:
            await ex.respond(200, _folded(hit.entry, status), headers=header)
            return
        rendered = hit.rendered(status)
        comment = replay_comment(hit.entry, status, time.time())
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
        body, ends = rendered.body, rendered.ends
        n_frames = len(ends)
        if pace_s == 0:
            await ex.send({"type": "http.response.body", "body": comment + body})
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = sent_bytes = 0
        # A client that leaves mid-replay ends it (the server's send would otherwise accept
        # and drop every later piece until the whole pace has run out).
        gone: list[bool] = []
        watcher = loop.create_task(_watch_disconnect(ex, gone))
        try:
            while not gone:
                due = frames_due(loop.time() - started, pace_s, n_frames)
                if due > sent:
                    end = ends[due - 1]
                    piece = body[sent_bytes:end]
                    if sent == 0:
                        piece = comment + piece
                    sent, sent_bytes = due, end
                    more = due < n_frames
                    await ex.send({"type": "http.response.body", "body": piece, "more_body": more})
                    if not more:
                        return
                await self.clock.tick()
        finally:
            watcher.cancel()

    @property
    def n_replaying(self) -> int:
        """Paced replays waiting for the next tick."""
        return self.clock.n_waiting

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


async def _watch_disconnect(ex: Exchange, gone: list[bool]) -> None:
    """Append to `gone` when the client has gone. The request body was read, so the only
    message left to receive is `http.disconnect` (at the end of the response too)."""
    try:
        while (await ex.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot tell: the replay runs to its end
        logger.debug("no disconnect notice for a paced replay", exc_info=True)
        return
    gone.append(True)


def _folded(entry: CachedAnswer, status: CacheStatus) -> bytes:
    acc = ChunkAccumulator()
    for raw in entry.chunks:
        acc.feed(decode_chunk(raw))
    completion = msgspec.to_builtins(acc.completion())
    completion["unbroken"] = {"cache": status}
    return msgspec.json.encode(completion)
