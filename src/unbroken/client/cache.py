"""The answer cache of Client and AsyncClient: the gateway's rules, in the SDK.

Keys, what is stored and how a hit is marked are `core.cache` (so a client and a gateway
sharing one SQLite or Redis store read each other's entries); the bytes live in a backend
of `stores.cache`. Two modes: **serve** (a hit is answered without a request, for requests
at or below `serve_max_temperature`) and **degrade** (when every attempt failed before any
output, a cached answer stands in, marked `stale`). Imports core, errors and stores.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Literal, TypeVar

import msgspec

from unbroken.core.cache import (
    CachedAnswer,
    CacheStatus,
    cache_key,
    decode_entry,
    encode_entry,
    is_storable,
    mark_chunk,
)
from unbroken.core.wire import Answer, ChatCompletionChunk
from unbroken.errors import (
    ConfigError,
    InvalidRequestError,
    RateLimited,
    RetriesExhausted,
    StoreError,
    UnbrokenError,
    UpstreamStatusError,
)
from unbroken.stores.cache import DEFAULT_MEMORY_BYTES, AnswerStore, open_answer_store

__all__ = ["AnswerCache", "CacheEvent", "CacheMark", "CachedChunk", "as_cache"]

T = TypeVar("T")

# A day: FAQ answers change with the shop's announcements, not by the minute (the
# gateway's `[gateway.cache] ttl_s` default).
DEFAULT_TTL_S = 86400.0
# One sleep per this many seconds of a paced replay (the gateway's REPLAY_TICK_S).
REPLAY_TICK_S = 0.05
# How long a blocking client waits for its store (a stuck Redis must not hang an answer).
STORE_TIMEOUT_S = 10.0


class CacheMark(msgspec.Struct, frozen=True):
    """The `unbroken` field of a replayed chunk: `{"cache": "hit"}` or `{"cache": "stale"}`."""

    cache: CacheStatus


class CachedChunk(ChatCompletionChunk):
    """A chunk replayed from the answer cache: a `ChatCompletionChunk` whose `unbroken`
    field says `hit` (served from the cache) or `stale` (the upstream is down)."""

    unbroken: CacheMark | None = None


class CacheEvent(msgspec.Struct, frozen=True, gc=False):
    """`chat.stream()` event that opens an answer replayed from the cache.

    Attributes:
        status: `hit` (serve mode) or `stale` (degrade mode: every attempt failed).
        age_s: how old the entry is.
        error: for `stale`, the error the cached answer stands in for.
    """

    status: CacheStatus
    age_s: float
    error: str = ""
    type: Literal["cache"] = "cache"


_CHUNK = msgspec.json.Decoder(CachedChunk)


class AnswerCache:
    """Cached answers for `Client(cache=...)` / `AsyncClient(cache=...)`, with the
    gateway's rules (`docs/cache.md`).

    Args:
        store: a backend of `unbroken.stores.cache` (`MemoryAnswerStore`,
            `SQLiteAnswerStore`, `RedisAnswerStore`), or its spec: `memory`,
            `sqlite:///path/cache.db`, `redis://host:port/0`.
        ttl_s: how long an answer is kept.
        serve: answer hits without a request (for requests at or below
            `serve_max_temperature`; temperature absent counts as the API's 1).
        degrade: when every attempt failed before any output (routes down, retries
            spent), answer from the cache, marked `stale`; a miss raises the error.
        serve_max_temperature: the highest temperature served from the cache.
        pace_s: seconds between replayed chunks of a streamed hit (0: all at once).
        store_tool_calls: also store answers that ended with `tool_calls`.
        max_bytes: the bound of a `memory` store made from a spec.

    A blocking `Client` runs the store's calls on a private event-loop thread; with
    `AsyncClient` they run on the caller's loop (a Redis store belongs to that loop).

    Raises:
        ConfigError: a spec names no backend, or a number is out of range.
    """

    def __init__(
        self,
        store: AnswerStore | str = "memory",
        *,
        ttl_s: float = DEFAULT_TTL_S,
        serve: bool = False,
        degrade: bool = True,
        serve_max_temperature: float = 0.0,
        pace_s: float = 0.0,
        store_tool_calls: bool = False,
        max_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        for name, value, minimum in (("ttl_s", ttl_s, 1e-9), ("pace_s", pace_s, 0.0)):
            number: object = value  # checked at run time: callers are not always type-checked
            if isinstance(number, bool) or not isinstance(number, int | float) or value < minimum:
                raise ConfigError(
                    f"AnswerCache {name} must be a number {'> 0' if minimum else '>= 0'}, "
                    f"got {value!r}"
                )
        given: object = store
        if isinstance(store, str):
            store = open_answer_store(store, max_bytes=max_bytes)
        elif not all(hasattr(given, m) for m in ("get", "put", "delete", "aclose")):
            raise ConfigError(
                f"AnswerCache store must be a backend of unbroken.stores.cache or a spec "
                f"string ('memory', 'sqlite:///path', 'redis://...'), got {type(given).__name__}"
            )
        self.store: AnswerStore = store
        self.ttl_s = float(ttl_s)
        self.serve = serve
        self.degrade = degrade
        self.serve_max_temperature = serve_max_temperature
        self.pace_s = float(pace_s)
        self.store_tool_calls = store_tool_calls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AnswerCache(store={self.store!r}, serve={self.serve}, degrade={self.degrade})"

    # -- decisions (no I/O) ------------------------------------------------------------------

    @staticmethod
    def key(body: Mapping[str, Any]) -> str:
        """The key of a request body (`core.cache.cache_key`, the gateway's too)."""
        return cache_key(body)

    def serves(self, body: Mapping[str, Any]) -> bool:
        """Is this request answered from the cache when there is an entry (serve mode)?"""
        temperature = body.get("temperature", 1.0)
        return (
            self.serve
            and isinstance(temperature, int | float)
            and temperature <= self.serve_max_temperature
        )

    def degrades(self, error: UnbrokenError) -> bool:
        """May a cached answer stand in for `error` (degrade mode)? Yes when the upstream
        is down or overloaded (5xx, 429, resets, timeouts, retries spent); never for a
        request the upstream refused as the caller's to fix (400, 401, 403, 404...)."""
        if not self.degrade:
            return False
        root: BaseException = error
        while isinstance(root, RetriesExhausted) and isinstance(root.__cause__, UnbrokenError):
            root = root.__cause__
        if isinstance(root, UpstreamStatusError):
            status = root.status_code or 500
            return status >= 500 or status in (408, 429)
        return not isinstance(root, InvalidRequestError | ConfigError | RateLimited)

    def storable(self, answer: Answer) -> bool:
        """May this finished answer be stored (`core.cache.is_storable`): every choice
        ended with `stop` (or `tool_calls` when allowed), and no fallback route made it."""
        return is_storable(
            [c.finish_reason for c in answer.choices],
            degraded=answer.unbroken.fallbacks > 0,
            tool_calls_ok=self.store_tool_calls,
        )

    @staticmethod
    def entry(answer: Answer, chunks: Sequence[ChatCompletionChunk], now: float) -> bytes:
        """The stored form of an answer's chunks (`core.cache.CachedAnswer`)."""
        encode = msgspec.json.encode
        return encode_entry(CachedAnswer(answer.model, now, [encode(c) for c in chunks]))

    @staticmethod
    def replay(
        data: bytes, status: CacheStatus, now: float
    ) -> tuple[list[CachedChunk], float] | None:
        """The marked chunks of a stored entry and its age in seconds (None: not an entry)."""
        entry = decode_entry(data)
        if entry is None:
            return None
        chunks = [_CHUNK.decode(mark_chunk(raw, status)) for raw in entry.chunks]
        return chunks, max(0.0, now - entry.created)

    # -- the store, async ----------------------------------------------------------------------

    async def aget(self, key: str) -> bytes | None:
        """The stored value under `key`; a failing backend counts as a miss."""
        try:
            return await self.store.get(key, time.time())
        except StoreError:
            return None

    async def aput(self, key: str, value: bytes) -> bool:
        """Store `value` for `ttl_s`; False when the backend failed (the answer stands)."""
        try:
            await self.store.put(key, value, time.time(), self.ttl_s)
        except StoreError:
            return False
        return True

    async def aclear(self) -> int:
        """Forget every entry; returns how many were removed."""
        return await self.store.delete(None)

    async def aclose(self, *, store: bool = True) -> None:
        """Close the backend (unless `store=False`: a backend someone else owns stays
        open) and the private loop thread."""
        if store:
            await self.store.aclose()
        self._stop_loop()

    # -- the store, blocking ---------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """`aget` for a blocking caller."""
        return self._call(self.aget(key))

    def put(self, key: str, value: bytes) -> bool:
        """`aput` for a blocking caller."""
        return self._call(self.aput(key, value))

    def clear(self) -> int:
        """`aclear` for a blocking caller."""
        return self._call(self.aclear())

    def close(self, *, store: bool = True) -> None:
        """Close the backend (unless `store=False`: a backend someone else owns stays
        open) and the private loop thread."""
        if not store:
            self._stop_loop()
            return
        if self._loop is None:
            # Never used from a blocking client: closing needs no thread of its own.
            asyncio.run(self.store.aclose())
            return
        self._call(self.store.aclose())
        self._stop_loop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        # The stores are async (the gateway's); a blocking client runs them on one private
        # loop, so a Redis pool stays on the loop it was made on.
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="unbroken-answer-cache", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(STORE_TIMEOUT_S)

    def _stop_loop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STORE_TIMEOUT_S)
        loop.close()


def as_cache(value: object) -> AnswerCache | None:
    """The cache for a `cache=` option: an `AnswerCache`, a backend, a spec, or None.

    Raises:
        ConfigError: anything else (the message names what was given).
    """
    if value is None or isinstance(value, AnswerCache):
        return value
    if isinstance(value, str) or all(hasattr(value, m) for m in ("get", "put", "delete")):
        return AnswerCache(value)  # type: ignore[arg-type]  # duck-typed backend, checked above
    raise ConfigError(
        "cache must be an unbroken.AnswerCache, a backend of unbroken.stores.cache or a spec "
        f"('memory', 'sqlite:///path/cache.db', 'redis://...'), got {type(value).__name__}"
    )
