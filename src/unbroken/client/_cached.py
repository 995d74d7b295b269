"""An answer through the answer cache, for Client (`cached`) and AsyncClient (`acached`):
serve a hit, or run the answer, store it when it qualifies, and stand in with a stale
entry when it fails before any output. The rules are `client.cache.AnswerCache`'s; here is
only the order of things and the (paced) replay. Imports core, errors and client siblings.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import anyio

from unbroken.client._common import AnswerRun
from unbroken.client._engine import Items
from unbroken.client.cache import REPLAY_TICK_S, AnswerCache, CachedChunk, CacheEvent
from unbroken.core.cache import CacheStatus, replay_batches
from unbroken.core.events import ControlEvent
from unbroken.core.wire import ChatCompletionChunk
from unbroken.errors import UnbrokenError

__all__ = ["acached", "cached"]

Item = ChatCompletionChunk | ControlEvent | CacheEvent
Replay = tuple[list[CachedChunk], float]


def _batches(
    cache: AnswerCache, replay: Replay, status: CacheStatus, *, paced: bool
) -> list[tuple[float, int]]:
    pace_s = cache.pace_s if paced and status == "hit" else 0.0
    return replay_batches(len(replay[0]), pace_s, REPLAY_TICK_S)


def _opening(
    run: AnswerRun, replay: Replay, status: CacheStatus, events: bool, error: UnbrokenError | None
) -> list[CacheEvent]:
    run.from_cache(status, time.monotonic())
    if not events:
        return []
    return [CacheEvent(status, replay[1], "" if error is None else error.message)]


def cached(
    cache: AnswerCache, run: AnswerRun, items: Iterator[Item], *, paced: bool, events: bool
) -> Iterator[Item]:
    """The items of `run` through `cache` (blocking); `paced`: a streamed answer."""
    key = cache.key(run.body)
    if cache.serves(run.body):
        data = cache.get(key)
        hit = None if data is None else cache.replay(data, "hit", time.time())
        if hit is not None:
            yield from _replay(cache, run, hit, "hit", paced=paced, events=events)
            return
    shown: list[ChatCompletionChunk] = []
    try:
        for item in items:
            if isinstance(item, ChatCompletionChunk):
                shown.append(item)
            yield item
    except UnbrokenError as exc:
        # Only before any output: a stand-in after part of an answer would repeat it.
        if shown or not cache.degrades(exc):
            raise
        data = cache.get(key)
        stale = None if data is None else cache.replay(data, "stale", time.time())
        if stale is None:
            raise
        yield from _replay(cache, run, stale, "stale", paced=False, events=events, error=exc)
        return
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # stopped early: the answer's own cleanup runs now, not at collection
    answer = run.completion(time.monotonic())
    if cache.storable(answer):
        cache.put(key, cache.entry(answer, shown, time.time()))


def _replay(
    cache: AnswerCache,
    run: AnswerRun,
    replay: Replay,
    status: CacheStatus,
    *,
    paced: bool,
    events: bool,
    error: UnbrokenError | None = None,
) -> Iterator[Item]:
    yield from _opening(run, replay, status, events, error)
    chunks = replay[0]
    started = time.monotonic()
    sent = 0
    for offset, end in _batches(cache, replay, status, paced=paced):
        delay = started + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the typing effect of a paced hit
        for chunk in chunks[sent:end]:
            run.answer.feed(chunk)
            yield chunk
        sent = end


async def acached(
    cache: AnswerCache,
    run: AnswerRun,
    items: Items,
    *,
    paced: bool,
    events: bool,
) -> AsyncGenerator[Item, None]:
    """The items of `run` through `cache` (async); `paced`: a streamed answer."""
    key = cache.key(run.body)
    if cache.serves(run.body):
        data = await cache.aget(key)
        hit = None if data is None else cache.replay(data, "hit", time.time())
        if hit is not None:
            await items.aclose()  # never started: nothing to stop
            async for item in _areplay(cache, run, hit, "hit", paced=paced, events=events):
                yield item
            return
    shown: list[ChatCompletionChunk] = []
    try:
        async for item in items:
            if isinstance(item, ChatCompletionChunk):
                shown.append(item)
            yield item
    except UnbrokenError as exc:
        if shown or not cache.degrades(exc):
            raise
        data = await cache.aget(key)
        stale = None if data is None else cache.replay(data, "stale", time.time())
        if stale is None:
            raise
        async for item in _areplay(
            cache, run, stale, "stale", paced=False, events=events, error=exc
        ):
            yield item
        return
    finally:
        await items.aclose()  # stopped early: the answer's own cleanup runs now
    answer = run.completion(time.monotonic())
    if cache.storable(answer):
        await cache.aput(key, cache.entry(answer, shown, time.time()))


async def _areplay(
    cache: AnswerCache,
    run: AnswerRun,
    replay: Replay,
    status: CacheStatus,
    *,
    paced: bool,
    events: bool,
    error: UnbrokenError | None = None,
) -> AsyncIterator[Item]:
    for event in _opening(run, replay, status, events, error):
        yield event
    chunks = replay[0]
    started = time.monotonic()
    sent = 0
    for offset, end in _batches(cache, replay, status, paced=paced):
        delay = started + offset - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)  # the typing effect of a paced hit
        for chunk in chunks[sent:end]:
            run.answer.feed(chunk)
            yield chunk
        sent = end
