"""Streamed answers as logs: the writer of each answer (`Producer`), following a log
(`StreamHub.follow`), instance takeover, and the `/v1/streams/{id}` endpoints.

Theory of operation
-------------------
An answer's *producer* task pulls chunks from the SDK's `AsyncStream` and appends each to
the answer's log (memory, or Redis Streams) before anyone sees it: a reader never holds an
event the log lacks, so a reconnect after any cut replays without a gap or a repeat. Every
reader - the original POST's response, a `GET /v1/streams/{id}`, a long-poll - *follows*
the log: read a page after its cursor, write it, wait for more.

A reader on the producer's own instance that has caught up hands itself to the producer
(`Producer.park`): the producer then writes each new event to it from its own task (the
relay's `LiveSink`, gateway/relay.py) right after appending it to the log, until the sink
refuses one (the client is not draining) or the answer ends; the reader then reads on from
the tail or the log as before. Appending first keeps the rule: no reader holds an event the
log lacks. Under the gateway's own server such a reader holds no task meanwhile: it
detaches (gateway/detach.py; `follow_batches(detach=True)` raises `Parked` after the
hand-off) and the producer's hand-back starts the rest of its request in a new task. The
POST that starts an answer hands its reader over before the first event, with the relay's
`HeadSink` (which starts the response with the first events, then goes on as a `LiveSink`).

The producer holds the stream's lease (`core.streamlog`): the hub's ticker renews it about
every second, and the renewal tells it about `DELETE` requests made on other instances and
readers following it from elsewhere. Its readers gone, a producer stops at once unless the
answer opted into detached generation (then it waits `detach_grace_s`). Stopping a producer
on purpose (DELETE) ends the log with a `stop` finish and `[DONE]`; abandoning it releases
the lease with the log left open, and a reconnect later continues it.

Takeover: a reader that finds the log open but its lease dead (the instance died; or the
answer was abandoned) takes the lease - a new epoch, which fences the old writer - rebuilds
the partial answer from the log and continues it upstream with the SDK's resume
(`AsyncClient.chat.completions.resume`), appending to the same log in the same sequence.
The ticker's sweeper does the same for detached answers nobody reconnects to.
Imports client, core, stores and gateway siblings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import msgspec

from unbroken._flag import Flag
from unbroken.client import AsyncStream
from unbroken.core.accumulator import ChunkAccumulator, join_text
from unbroken.core.streamlog import (
    Lease,
    Renewal,
    Retention,
    StreamInfo,
    Verdict,
    answer_digest,
    check_stream_id,
    judge_reconnect,
    new_stream_id,
    parse_event_id,
    should_abandon,
)
from unbroken.core.wire import Answer, ChatCompletion, ChatCompletionChunk
from unbroken.errors import InvalidRequestError, StoreError, UnbrokenError
from unbroken.gateway.asgi import Exchange
from unbroken.gateway.detach import DETACH_EXTENSION, Detached, Parked
from unbroken.gateway.eager import current_tasks, eager_task
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError, from_unbroken
from unbroken.gateway.relay import EventSink, ProducerCore, Waiter
from unbroken.gateway.request import ChatRequest
from unbroken.gateway.scopes import shielded
from unbroken.settings import GatewaySettings
from unbroken.stores.streamlog import (
    FencedError,
    LogFullError,
    MemoryStreamLog,
    StreamLog,
    UnknownStreamError,
)

if TYPE_CHECKING:
    from unbroken.gateway.app import Gateway

__all__ = ["STREAMS_PATH", "Producer", "StreamHub", "open_stream_log"]

logger = logging.getLogger(__name__)

STREAMS_PATH = "/v1/streams"
STREAM_ID_HEADER = b"x-unbroken-stream-id"
# Every response of the gateway says what it is, so the SDK knows it may reconnect.
GATEWAY_HEADER = (b"x-unbroken-gateway", b"1")
DONE = b"[DONE]"
# One page of a replay: bounded in events and bytes, so replaying a long answer holds one
# page in memory, not the answer.
PAGE_EVENTS = 256
PAGE_BYTES = 256 * 1024
# How often the ticker renews leases (the "about every second"), and sweeps.
TICK_S = 1.0
SWEEP_EVERY_S = 30.0
ORPHANS_PER_TICK = 50
# Recent events a producer keeps for the readers on its own instance, so following a live
# answer does not read the log back from the store for every event.
TAIL_EVENTS = 256
# The same with an in-process log (memory), which readers read cheaply.
LOCAL_TAIL_EVENTS = 8
# The longest a long-poll may wait.
MAX_WAIT_S = 60.0
_encode = msgspec.json.encode
# The `_pending` of every producer that does not batch (it stays empty).
_NO_PENDING: list[bytes] = []
# `Producer._sending` while the stream's create is awaited: no append may go out yet.
_AWAITING_CREATE: list[bytes] = []
# `Producer._cancel`: not producing (`stop` does not cancel), producing, cancelled by `stop`.
_IDLE, _LIVE, _CANCELLING = "idle", "live", "cancelling"
# `Producer.first` once set by the first append: shared, set, never cleared (a producer's
# own Flag is only needed until then: 48 bytes a live answer; bench/stream_memory.py).
_FIRST_SET = Flag()
_FIRST_SET.set()


def open_stream_log(g: GatewaySettings) -> StreamLog:
    """The stream log for the gateway's `store` setting (memory, or Redis Streams)."""
    retention = Retention(
        ttl_s=g.stream_ttl_s,
        max_stream_bytes=g.stream_max_bytes,
        max_total_bytes=g.streams_max_bytes,
    )
    if g.store == "memory":
        return MemoryStreamLog(retention)
    from unbroken.stores.redis_streamlog import RedisStreamLog

    return RedisStreamLog.from_url(g.store, retention)


def final_event(completion: ChatCompletion, stream_id: str, takeovers: int) -> bytes:
    """The event before `[DONE]`: no choices, and an `unbroken` field with the SHA-256 of
    choice 0's content and reasoning, so a client can prove it holds the log's bytes."""
    content = reasoning = ""
    finish = None
    if completion.choices:
        message = completion.choices[0].message
        content = message.content or ""
        reasoning = message.reasoning_content or ""
        finish = completion.choices[0].finish_reason
    digest = answer_digest(content, reasoning)
    meta: dict[str, Any] = {
        "stream_id": stream_id,
        "content_sha256": digest.content_sha256,
        "reasoning_sha256": digest.reasoning_sha256,
        "finish_reason": finish,
        "takeovers": takeovers,
    }
    if isinstance(completion, Answer):
        info = completion.unbroken
        meta.update(
            route=info.route,
            attempts=len(info.attempts),
            retries=info.retries,
            resumes=info.resumes,
            fallbacks=info.fallbacks,
        )
    return _encode(
        {
            "id": completion.id,
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model,
            "choices": [],
            "unbroken": meta,
        }
    )


def _stop_chunk(completion: ChatCompletion | None) -> bytes:
    head = completion or ChatCompletion()
    return _encode(
        {
            "id": head.id,
            "object": "chat.completion.chunk",
            "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )


OpenStream = Callable[[], Awaitable[AsyncStream]]


class _TextLink:
    """Where a producer's SDK stream reads the answer's text back (`TextSource`, given to
    `AsyncStream.keep_text_in`): the producer, through this link, cut when it has read the
    completion. Why not the producer itself: the finished SDK stream is cyclic garbage
    (stream <-> engine) until a collection, and the producer hung off it with its task,
    booking and request record (~10 objects an answer more for the young generation's
    collections, gc DEBUG_SAVEALL); cut, they go by refcount."""

    __slots__ = ("producer",)

    def __init__(self, producer: Producer) -> None:
        self.producer: Producer | None = producer

    def text_mark(self) -> int:
        """`TextSource.text_mark`."""
        return self._source().n_events

    def text_since(self, mark: int, until: int | None, index: int, reasoning: bool) -> str:
        """`TextSource.text_since`."""
        return self._source().text_since(mark, until, index, reasoning)

    def _source(self) -> Producer:
        producer = self.producer
        if producer is None:
            raise RuntimeError("the answer's producer has ended: its text is in the stream log")
        return producer


class Booking(Protocol):
    """What an answer's producer reports to its request's booking (gateway/app.py
    `_Booking`): held as the object, not as two bound methods (~130 bytes per live answer;
    bench/stream_memory.py)."""

    async def complete(self, completion: ChatCompletion) -> None:
        """The whole answer (before its last events are appended)."""

    async def book(self, completion: ChatCompletion | None) -> None:
        """The producer ended, with what it has of the answer (once)."""


class Producer(ProducerCore):
    """The writer of one answer's log (see the theory of operation).

    Args:
        hub: the hub it belongs to.
        stream_id: the stream.
        epoch: the lease epoch its appends carry.
        n_events: events already in the log (a takeover continues after them).
        resumable: keep generating without readers for `detach_grace_s`.
        takeovers: how many times the stream changed hands before this writer.
        on_complete: runs with the whole answer before its last events are appended
            (instead of `booking.complete`).
        on_end: runs once when the producer ends, with what it has of the answer.
        booking: told of the whole answer (`complete`, unless `on_complete` is given) and,
            after `on_end`, of the end (`book`).
        renew_slot: renews the caller's concurrency slot (called every `slot_every_s`).
    """

    # One per live answer: no instance dict (~1 KB with this many attributes). Those a
    # relayed chunk reads are `ProducerCore`'s.
    __slots__ = (
        "_append_now",
        "_batched",
        "_booking",
        "_cancel",
        "_changed",
        "_created",
        "_error",
        "_flush",
        "_muted",
        "_on_complete",
        "_on_end",
        "_pending",
        "_renew_slot",
        "_sending",
        "_slot_at",
        "_slot_every_s",
        "_waiter",
        "completion",
        "detached_at",
        "failure",
        "finished",
        "first",
        "hub",
        "n_readers",
        "resumable",
        "takeovers",
        "task",
    )

    def __init__(
        self,
        hub: StreamHub,
        stream_id: str,
        epoch: int,
        *,
        n_events: int = 0,
        resumable: bool,
        takeovers: int = 0,
        on_complete: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        on_end: Callable[[ChatCompletion | None], Awaitable[None]] | None = None,
        renew_slot: Callable[[], Awaitable[None]] | None = None,
        slot_every_s: float = 60.0,
        booking: Booking | None = None,
    ) -> None:
        # The memory log appends without a coroutine (one less per chunk), and is read
        # without a round trip: a short tail does (the log packs its events; a tail holding
        # a whole answer's payloads cost ~60 KB per live stream).
        # Bound once per hub, not per producer (two bound methods: 128 bytes a live answer).
        self._append_now, memory, batched, _ = hub.log_appenders()
        # A list trimmed to `_tail_max`, not a deque(maxlen=...): a deque's first block holds
        # 64 slots (~760 bytes) per live answer for the events kept here. None with the
        # memory log, which readers read in place (`tail_events`): its open block holds the
        # same events (a tail of 8 cost ~0.6 KB per live answer; bench/stream_memory.py).
        # The payloads are kept with no (id, payload) tuple per event: readers number them.
        tail_max = TAIL_EVENTS if self._append_now is None else 0
        ProducerCore.__init__(
            self,
            stream_id,
            epoch,
            n_events,
            memory,
            tail_max,
            [] if tail_max else _NO_PENDING,
        )
        self.hub = hub
        self.resumable = resumable
        self.takeovers = takeovers
        self._on_complete = on_complete
        self._on_end = on_end
        self._booking = booking
        self._renew_slot = renew_slot
        self._slot_every_s = slot_every_s
        self._slot_at = time.monotonic()
        # Whether `stop` may cancel the task now (see `stop`).
        self._cancel = _IDLE
        # Made by the first `wait` (a live answer's readers mostly wait as sinks: ~40 bytes).
        self._changed: Flag | None = None
        # Group commit for a remote log (one with `append_then`: Redis): events pushed while
        # an append is in flight go together in the next one, so the upstream is read on
        # meanwhile. An append is a callback (`_sent`), not a task: its reply reaches the
        # readers in the loop turn it arrives in.
        self._batched = batched
        # Only a batching producer appends here: the others share one empty list (56 bytes
        # a live answer).
        self._pending: list[bytes] = [] if self._batched else _NO_PENDING
        self._sending: list[bytes] = _NO_PENDING  # the events of the append in flight
        self._flush: asyncio.Future[None] | None = None  # `_settle` waits for `_sent`
        self._error: UnbrokenError | None = None  # what an append raised, raised by `_push`
        # A new stream's log being created (`StreamHub.start`): awaited before the first
        # append is sent, so the create has run; the upstream is asked meanwhile.
        self._created: asyncio.Future[Lease] | None = None
        # Set at the first append (then the shared `_FIRST_SET`), or when the answer failed.
        self.first = Flag()
        self.failure: GatewayError | None = None
        self.completion: ChatCompletion | None = None  # the whole answer, once complete
        self.finished = False
        self.n_readers = 0
        # Readers handed off to this producer (`park`), each with the future it parks on:
        # the first in `_sink` and `_waiter`, any others in `_sinks` (a dict with one reader
        # held ~220 bytes per live answer, and nearly every answer has one reader).
        self._waiter: Waiter | None = None
        # The waiters of readers fed nothing more since the answer's usage chunk
        # (`_mute_sinks`), released with the others by `_release_sinks`.
        self._muted: list[Waiter] | None = None
        self.detached_at: float | None = time.time()
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Producer({self.stream_id!r}, epoch={self.epoch}, events={self.n_events})"

    # -- readers ---------------------------------------------------------------------------

    def attach(self) -> None:
        """A reader on this instance follows the answer."""
        self.n_readers += 1
        self.detached_at = None

    def detach(self, now: float) -> None:
        """A reader left; without the opt-in, the last one leaving stops the answer."""
        self.n_readers = max(0, self.n_readers - 1)
        if self.n_readers == 0:
            self.detached_at = now
            if not self.resumable and not self.finished:
                self.stop("abandoned")

    async def wait(self, after: int, timeout_s: float) -> None:
        """Return when an event after `after` was appended, the producer ended, or after
        `timeout_s`."""
        if self.n_events > after or self.finished:
            return
        self._n_waiting += 1
        try:
            changed = self._changed
            if changed is None:
                changed = self._changed = Flag()
            async with asyncio.timeout(timeout_s):
                await changed.wait()
        except TimeoutError:
            return
        finally:
            self._n_waiting -= 1

    async def hand_off(self, sink: EventSink, after: int) -> int:
        """`park`, await, `taken_back` in one coroutine: the id of the last event `sink`
        took (`after` when it could take none)."""
        parked = self.park(sink, after)
        if parked is None:
            return after
        try:
            await parked
        finally:
            after = self.taken_back(sink)
        return after

    def park(self, sink: EventSink, after: int) -> asyncio.Future[None] | None:
        """Let `sink` take the events appended after `after` (the last one appended) from
        this producer's task, until it refuses one or the producer ends: the future the
        reader awaits meanwhile; then `taken_back` gives the id of the last event the sink
        took, and the reader goes on from there. None when `after` is not the last event or
        the producer ended: the reader reads on.

        Why a future and not a coroutine: a live answer's reader waits here for most of its
        life, and a coroutine more on its stack held 248 bytes (bench/stream_memory.py)."""
        if after != self.n_events or self.finished:
            return None
        sink.last = after
        parked = asyncio.get_running_loop().create_future()
        self._add_sink(sink, parked)
        return parked

    def park_waiter(self, sink: EventSink, after: int, waiter: Waiter) -> bool:
        """`park` with the reader's own `waiter` in place of a future (a detached reader,
        gateway/detach.py): False, and nothing parked, when `park` would give None."""
        if after != self.n_events or self.finished:
            return False
        sink.last = after
        self._add_sink(sink, waiter)
        return True

    def _add_sink(self, sink: EventSink, waiter: Waiter) -> None:
        if self._sink is None or self._sink is sink:
            self._sink, self._waiter = sink, waiter
        elif self._sinks is None:
            self._sinks = {sink: waiter}
        else:
            self._sinks[sink] = waiter

    def _pop_sink(self, sink: EventSink) -> Waiter | None:
        """`sink`'s waiter, `sink` no longer fed; None when it was not."""
        more = self._sinks
        if self._sink is not sink:
            return more.pop(sink, None) if more else None
        waiter = self._waiter
        if more:  # the next oldest takes the first place
            first = next(iter(more))
            self._sink, self._waiter = first, more.pop(first)
        else:
            self._sink = self._waiter = None
        return waiter

    def _all_sinks(self) -> list[EventSink]:
        first = self._sink
        if first is None:
            return []
        return [first, *self._sinks] if self._sinks else [first]

    def taken_back(self, sink: EventSink) -> int:
        """The reader takes over from `sink` (after its `park` future resolved, or was
        cancelled): the id of the last event the sink took."""
        self._pop_sink(sink)
        return sink.last

    def tail_events(self, after: int) -> list[tuple[int, bytes]] | None:
        """The events after `after` held in the tail (empty when there are none yet), or
        None when the tail does not reach back to `after + 1`. With the memory log, the
        log's own (its last `LOCAL_TAIL_EVENTS` at most)."""
        n_new = self.n_events - after
        if self._append_now is not None and not self.degraded:
            # The memory log: read in place, as far back as a tail reached.
            if n_new > LOCAL_TAIL_EVENTS:
                return None
            return self.hub.log.events_now(self.stream_id, after, self.n_events)  # type: ignore[attr-defined, no-any-return]  # MemoryStreamLog's
        tail = self.tail
        if not tail or n_new > len(tail):
            return None
        return list(enumerate(tail[len(tail) - n_new :], after + 1)) if n_new > 0 else []

    def _feed(self, first: int, payloads: Sequence[bytes]) -> None:
        refused = [sink for sink in self._all_sinks() if not sink.feed(first, payloads)]
        if refused:
            self._refused(refused)

    def _feed_one_more(self, n: int, payload: bytes, taken: bool) -> None:
        """`take_one`'s feed past the first sink (which took event `n`, or not)."""
        refused = [] if taken or self._sink is None else [self._sink]
        refused += [sink for sink in self._sinks or () if not sink.feed_one(n, payload)]
        if refused:
            self._refused(refused)

    def _refused(self, refused: list[EventSink]) -> None:
        for sink in refused:
            parked = self._pop_sink(sink)
            if parked is not None and not parked.done():
                parked.set_result(None)

    def _parked_waiters(self) -> list[Waiter]:
        """The waiters of the parked readers, which are fed nothing from now on."""
        waiters = [] if self._waiter is None else [self._waiter]
        if self._sinks:
            waiters += self._sinks.values()
        self._sink = self._waiter = self._sinks = None
        return waiters

    def _mute_sinks(self) -> None:
        """Feed the parked readers nothing more, but leave them parked until
        `_release_sinks`: they then take the answer's last events from the log together,
        in the write that ends their response (not the usage chunk in one write as soon
        as it comes, and the rest in another when the upstream's body ends)."""
        waiters = self._parked_waiters()
        if waiters:
            self._muted = waiters if self._muted is None else self._muted + waiters

    def _release_sinks(self) -> None:
        waiters = self._parked_waiters()
        if self._muted is not None:
            waiters += self._muted
            self._muted = None
        for parked in waiters:
            if not parked.done():
                parked.set_result(None)

    # -- control ---------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Cancel the upstream now; `stopped` ends the log with a stop finish and [DONE],
        anything else leaves it open for a takeover.

        The task is cancelled once, natively, and only while it produces (`run` takes that
        cancellation back and ends the answer): an anyio CancelScope per producer held ~1 KB
        per live answer (the scope, two sets, anyio's state of the task;
        bench/stream_memory.py). Before the task produces, `run` sees `reason` and does not
        start; after, its clean-up is not cancelled. From the task itself the cancellation
        is sent from the loop, so it always lands at an await of the task (never after
        `run` stopped producing, in its clean-up)."""
        if self.reason is None:
            self.reason = reason
        task = self.task
        if self._cancel is _LIVE and task is not None:
            if task is asyncio.current_task():
                asyncio.get_running_loop().call_soon(self.stop, reason)
                return
            self._cancel = _CANCELLING
            task.cancel()

    def renewed(self, info: Renewal | None, grace_s: float, now: float) -> bool:
        """Act on a lease renewal's answer (`StreamLog.renew_many`): a lost lease, a stop
        request, or no readers stop the stream. True when it goes on."""
        if info is None:
            self.stop("fenced")
            return False
        if info.stop_requested:
            self.stop("stopped")
            return False
        if should_abandon(
            resumable=self.resumable,
            n_local_readers=self.n_readers,
            reader_at=info.reader_at,
            detached_at=self.detached_at,
            grace_s=grace_s,
            now=now,
        ):
            self.stop("abandoned")
            return False
        return True

    async def renew_slot_if_due(self) -> None:
        """Renew the caller's concurrency slot when a third of its lease has passed."""
        if self._renew_slot is not None and time.monotonic() - self._slot_at >= self._slot_every_s:
            self._slot_at = time.monotonic()
            await self._renew_slot()

    # -- writing ---------------------------------------------------------------------------

    async def _push(self, payload: bytes) -> None:
        """Append one event (see `_batched`); raises what an earlier append raised."""
        if not self._batched:
            if self._append_now is not None and not self.degraded:
                payloads = [payload]
                n = self._append_now(self.stream_id, self.epoch, payloads, time.time(), end=False)
                self._appended(payloads, n)
            else:
                await self._append([payload])
            return
        self._pending.append(payload)
        if self._error is not None:
            self._raise_error()
        if self._sending is _NO_PENDING:  # no append in flight
            self._start_sending()
        elif len(self._pending) >= TAIL_EVENTS:
            await self._settle()  # the log is slow: stop reading upstream until it catches up

    async def _await_created(self) -> None:
        """Wait for the stream's create (mostly answered before the upstream's first
        token); its error fails the answer: nothing was logged."""
        created, self._created = self._created, None
        if created is not None:
            try:
                await created
            except StoreError as exc:
                self._pending = []  # never to be logged, nor delivered
                raise _NotCreated(exc.message) from exc

    def _queue_one(self, payload: bytes) -> bool:
        """The SDK stream's `one` sink on a remote log: queue one chunk (its upstream
        bytes) for the next append, from the upstream's data callback (no chunk object,
        no re-encoding, no task wake-up per chunk). False (the rest of the attempt is
        iterated, through `_push`) when the log is behind: `_push` waits for it."""
        if self.reason is not None or self._error is not None:
            return False
        pending = self._pending
        if len(pending) >= TAIL_EVENTS:
            return False
        pending.append(payload)
        if self._sending is _NO_PENDING:
            self._start_sending()
        return True

    def _queue(self, chunks: list[ChatCompletionChunk], payloads: list[bytes] | None) -> bool:
        """`_queue_one` for the chunks of one upstream read."""
        if self.reason is not None or self._error is not None:
            return False
        pending = self._pending
        if len(pending) >= TAIL_EVENTS:
            return False
        pending += payloads if payloads is not None else [_encode(c) for c in chunks]
        if self._sending is _NO_PENDING:
            self._start_sending()
        return True

    def _start_sending(self) -> None:
        """Append the pending events once the stream's create is answered (a remote log:
        the create was sent first, so Redis has run it when the append runs; its reply
        is mostly back before the upstream's first token)."""
        created = self._created
        if created is not None:
            if not created.done():
                self._sending = _AWAITING_CREATE
                created.add_done_callback(self._on_created)
                return
            self._created = None
            if not self._create_ok(created):
                return
        self._send()

    def _on_created(self, created: asyncio.Future[Lease]) -> None:
        self._sending = _NO_PENDING
        self._created = None
        if self._create_ok(created) and self._pending:
            self._send()
        self._wake_settle()

    def _create_ok(self, created: asyncio.Future[Lease]) -> bool:
        """Whether the log was created; if not, the answer fails with `_NotCreated` and
        what was pushed is dropped (never logged, never delivered)."""
        error = StoreError("the stream log closed") if created.cancelled() else created.exception()
        if error is None:
            return True
        self._pending = []
        message = error.message if isinstance(error, StoreError) else repr(error)
        self._error = _NotCreated(message)
        return False

    def _send(self) -> None:
        """Append the pending events (a remote log); `_sent` takes the reply."""
        batch, self._pending = self._pending, []
        if self.degraded:
            self._appended(batch, self.n_events + len(batch))
            return
        self._sending = batch
        self.hub.log.append_then(  # type: ignore[attr-defined]
            self.stream_id, self.epoch, batch, time.time(), end=False, then=self._sent
        )

    def _sent(self, reply: Any) -> None:
        """An append's reply: hand its events on, then append what was pushed meanwhile."""
        batch, self._sending = self._sending, _NO_PENDING
        if isinstance(reply, asyncio.CancelledError):  # the log is closing
            self._error = StoreError("the stream log closed")
        else:
            try:
                n = self.hub.log.append_reply(reply, self.stream_id, self.epoch)  # type: ignore[attr-defined]
            except (FencedError, LogFullError, UnknownStreamError) as exc:
                self._error = exc
            except StoreError as exc:
                self._degrade(exc)
                n = self.n_events + len(batch)
            if self._error is None:
                self._appended(batch, n)
                if self._pending:
                    self._send()
        self._wake_settle()

    def _wake_settle(self) -> None:
        waiter = self._flush
        if waiter is not None and self._sending is _NO_PENDING:
            self._flush = None
            if not waiter.done():
                waiter.set_result(None)

    async def _settle(self) -> None:
        """Wait until every pushed event is in the log (raising what an append raised)."""
        while self._sending is not _NO_PENDING:
            waiter = self._flush
            if waiter is None or waiter.done():
                waiter = self._flush = asyncio.get_running_loop().create_future()
            await waiter
        if self._error is not None:
            self._raise_error()
        if self._pending:
            batch, self._pending = self._pending, []
            await self._append(batch)

    def _raise_error(self) -> None:
        """Raise what an append raised (once); with no log, what was pushed is dropped."""
        error, self._error = self._error, None
        if isinstance(error, _NotCreated):
            self._pending = []
        if error is not None:
            raise error

    async def _settle_quietly(self) -> None:
        try:
            await self._settle()
        except UnbrokenError as exc:
            logger.debug("stream %s: pending events not logged: %s", self.stream_id, exc)
            self._pending = [] if self._batched else _NO_PENDING
            self._error = None

    def _take(self, chunks: list[ChatCompletionChunk], payloads: list[bytes] | None) -> bool:
        """The SDK stream's chunk sink: append `chunks` (those of one upstream read) to the
        (in-process) log now, in one append, and so to a live reader in one write; as
        `payloads`, their upstream bytes, when the stream gives them. False when they are
        not taken here: the stream yields them and `_push` appends them (and raises what the
        log raises)."""
        append = self._append_now
        if append is None or self.degraded or self.reason is not None:
            return False
        if payloads is None:
            payloads = [_encode(c) for c in chunks]
        try:
            n = append(self.stream_id, self.epoch, payloads, time.time(), end=False)
        except UnbrokenError:
            return False
        self._appended(payloads, n)
        return True

    # The producer is the stream's sink itself (`_take`), not a bound method of it held
    # for the answer's life: 64 bytes less per live stream (bench/stream_memory.py).
    __call__ = _take

    def _wake_readers(self) -> None:
        """Readers waiting for events wake; `first` is set by the first append."""
        changed = self._changed
        if self._n_waiting and changed is not None:
            changed.set()
            self._changed = None
        if self._unset:
            self._unset = False
            first, self.first = self.first, _FIRST_SET
            first.set()  # wakes those that waited on the producer's own

    async def _append(self, payloads: list[bytes], *, end: bool = False) -> None:
        if self._created is not None:
            await self._await_created()
        if self.degraded:
            n = self.n_events + len(payloads)
        else:
            try:
                n = await self.hub.log.append(
                    self.stream_id, self.epoch, payloads, time.time(), end=end
                )
            except (FencedError, LogFullError, UnknownStreamError):
                raise
            except StoreError as exc:
                self._degrade(exc)
                n = self.n_events + len(payloads)
        self._appended(payloads, n)

    def _degrade(self, exc: StoreError) -> None:
        # A store outage must not cost the readers here an answer being delivered: the
        # rest is kept in memory for them (a reconnect elsewhere cannot have it).
        logger.warning(
            "stream %s: log unavailable, finishing from memory: %s", self.stream_id, exc.message
        )
        self.degraded = True
        self._tail_max = sys.maxsize  # unbounded: the store cannot page for readers
        if self.tail is _NO_PENDING:
            self.tail = []

    def _appended(self, payloads: list[bytes], n: int) -> None:
        """`payloads` are in the log, the last as event `n`: keep them in the tail, hand
        them to the sinks, wake the waiting readers."""
        if self._tail_max:
            tail = self.tail
            if len(payloads) == 1:
                tail.append(payloads[0])
            else:
                tail.extend(payloads)
            if len(tail) > self._tail_max:
                del tail[: len(tail) - self._tail_max]
        self.n_events = n
        if self._sink is not None:
            self._feed(n - len(payloads) + 1, payloads)
        if self._n_waiting or self._unset:  # rarely: no call per chunk otherwise
            self._wake_readers()

    async def run(self, open_stream: OpenStream) -> None:
        """Produce the answer into the log (the task body)."""
        stream: AsyncStream | None = None
        completion: ChatCompletion | None = None
        text_link: _TextLink | None = None
        task = current_tasks.get(asyncio.get_running_loop())
        assert task is not None  # noqa: S101 - a coroutine run by a task
        cancelling = task.cancelling()
        try:
            # Stopped before it started (`stop`): as a cancellation at the first await.
            stopped = self.reason is not None
            self._cancel = _IDLE if stopped else _LIVE
            try:
                if stopped:
                    raise asyncio.CancelledError
                stream = await open_stream()
                # The opener and what it closes over (the request, its headers) are the
                # SDK's now: not held for the answer's life (~700 bytes a live answer).
                del open_stream
                if type(stream) is AsyncStream and self._append_now is not None:
                    # Chunks go into the log from the upstream's data callback (not through
                    # a wrapper such as the answer cache's recorder, which must see them).
                    stream.set_chunk_sink(self, with_payloads=True, one=self.take_one)
                    if self.n_events == 0:
                        # The log holds the answer's text: the SDK keeps no copy of it
                        # (~0.5 KB per live stream at 100 chunks; bench/stream_memory.py).
                        text_link = _TextLink(self)
                        stream.keep_text_in(text_link)
                    # The log keeps the decoder's template, not an equal copy (~340 bytes
                    # per live stream; bench/stream_memory.py).
                    self._share_template(stream)
                elif type(stream) is AsyncStream and self._batched:
                    # On Redis the same: each read's chunks join the next append from the
                    # data callback (bound methods: 128 bytes a live answer, Redis only).
                    stream.set_chunk_sink(self._queue, with_payloads=True, one=self._queue_one)
                async for chunk in stream:
                    payload = _encode(chunk)
                    if chunk.usage is not None and self._sink is not None:
                        # The usage chunk ends an answer: the live readers take it from the
                        # log with the final event and [DONE], in the write that ends their
                        # response: one write less per answer (5-chunk answers: 7.0 writes
                        # each -> 3.9 with the held first events, strace). Muted, not
                        # released: a reader released now wrote the usage chunk alone when
                        # the upstream's body end came in a later read.
                        if self._created is not None:
                            # Readers released before the first event read the log: on
                            # Redis it must have been created (chunks queued from the data
                            # callback do not wait for the create, this does).
                            await self._await_created()
                        self._mute_sinks()
                    # Neither is held while the next one is awaited: on the direct path
                    # that is the role chunk, kept for the whole answer (~0.6 KB per live
                    # stream each; the log keeps the payload's bytes, not the object).
                    del chunk
                    await self._push(payload)
                    del payload
                await self._settle()
                completion = self.completion = await stream.final()
                if self._on_complete is not None:
                    await self._on_complete(completion)
                elif self._booking is not None:
                    await self._booking.complete(completion)
                final = final_event(completion, self.stream_id, self.takeovers)
                # The live readers take the last events from the tail, so each ends its
                # response in the same write (one write less per answer).
                self._release_sinks()
                await self._append([final, DONE], end=True)
            except asyncio.CancelledError:
                # `stop`'s cancellation (taken back), or another's (raised on).
                ours = self._cancel is not _LIVE
                if self._cancel is _CANCELLING:
                    self._cancel = _IDLE
                    task.uncancel()
                if not ours or task.cancelling() > cancelling:
                    raise
                stopped = True
            finally:
                if self._cancel is _CANCELLING:  # delivered, and swallowed on the way
                    task.uncancel()
                self._cancel = _IDLE
            if stopped:
                completion = _current(stream)
                await self._cancelled(completion)
        except FencedError:
            self.reason = "fenced"
            logger.info("stream %s was taken over; this writer stops", self.stream_id)
        except UnbrokenError as exc:
            with shielded():
                await self._settle_quietly()
            completion = _current(stream)
            error = from_unbroken(exc, self.hub.gateway.scrub)
            if isinstance(exc, LogFullError):
                error = GatewayError(507, exc.message, type="server_error", code="stream_log_full")
            if self.n_events == 0:
                self.failure = error
                # No sink may start the response with the error event: the reader answers
                # with the error's own HTTP status instead.
                self._release_sinks()
            self.reason = "error"
            logger.info("answer on stream %s failed: %s", self.stream_id, error.code)
            if not isinstance(exc, _NotCreated):  # else there is no log to end
                with shielded():
                    await self._end_quietly([error.body()])
        finally:
            self.finished = True
            self.first.set()
            if self._changed is not None:
                self._changed.set()
            self._release_sinks()
            if stream is not None:
                self._share_template(None)  # the log holds no SDK stream past its writer
            created, self._created = self._created, None
            if created is not None:  # never awaited: its error is not to be logged as lost
                created.add_done_callback(_retrieved)
            with shielded():
                await self._settle_quietly()
                if stream is not None:
                    await _close(stream)
                    # The SDK stream's chunk sink is this producer's bound methods, and the
                    # finished stream is cyclic garbage (stream, engine, run), freed by a
                    # rare full collection (gateway/server.py GC_THRESHOLDS): unhooked, the
                    # producer and its tail (a Redis log's last events) go by refcount now.
                    if type(stream) is AsyncStream:  # (a cache's recorder has no sink)
                        stream.set_chunk_sink(None)
                self.hub._forget(self)
                if completion is None:
                    completion = _current(stream)
                if text_link is not None:
                    # The SDK stream's text is read no more (the completion is made).
                    text_link.producer = None
                if self._on_end is not None:
                    await self._on_end(completion)
                if self._booking is not None:
                    await self._booking.book(completion)

    def text_mark(self) -> int:
        """`TextSource.text_mark`: the events in the log."""
        return self.n_events

    def text_since(self, mark: int, until: int | None, index: int, reasoning: bool) -> str:
        """`TextSource.text_since`: read back from the (memory) log."""
        last = self.n_events if until is None else until
        log: Any = self.hub.log  # a MemoryStreamLog (a text source only on it)
        return join_text(log.text_now(self.stream_id, mark, last, index, reasoning) or [])

    def _share_template(self, source: AsyncStream | None) -> None:
        share = getattr(self.hub.log, "share_template", None)  # the memory log's
        if share is not None:
            share(self.stream_id, source)

    async def _cancelled(self, completion: ChatCompletion | None) -> None:
        with shielded():
            await self._settle_quietly()
            if self.reason == "stopped":
                final = final_event(completion or ChatCompletion(), self.stream_id, self.takeovers)
                await self._end_quietly([_stop_chunk(completion), final, DONE])
            elif self.reason != "fenced":
                # Abandoned (no reader) or shutting down: the log stays open and the lease
                # free, so a reconnect (here or on another instance) continues the answer.
                await self.hub.log.release(self.stream_id, self.hub.instance, self.epoch)

    async def _end_quietly(self, payloads: list[bytes]) -> None:
        try:
            await self._append(payloads, end=True)
        except FencedError:
            pass  # another writer owns the log now; it ends it
        except UnbrokenError as exc:
            logger.warning("stream %s: could not end its log: %s", self.stream_id, exc.message)


class _NotCreated(StoreError):
    """The stream's log could not be created: the answer fails, nothing is appended."""


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _current(stream: AsyncStream | None) -> ChatCompletion | None:
    if stream is None:
        return None
    try:
        return stream.current()
    except UnbrokenError:  # the answer may be in any state when it was cut
        return None


async def _close(stream: AsyncStream) -> None:
    try:
        await stream.aclose()
    except (UnbrokenError, OSError) as exc:
        logger.debug("closing an upstream stream failed: %s", type(exc).__name__)


class StreamHub:
    """The stream logs of one gateway instance: its producers, its readers, its ticker.

    Args:
        gateway: the gateway.
        log: the stream log backend.
    """

    def __init__(self, gateway: Gateway, log: StreamLog) -> None:
        self.gateway = gateway
        self.log = log
        self.settings = gateway.settings.gateway
        self.instance = uuid.uuid4().hex
        self._producers: dict[str, Producer] = {}
        self._appenders: tuple[Any, MemoryStreamLog | None, bool, StreamLog] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"StreamHub(log={self.log!r}, live={len(self._producers)})"

    def log_appenders(
        self,
    ) -> tuple[Callable[..., int] | None, MemoryStreamLog | None, bool, StreamLog]:
        """What a producer takes of the log, found once and shared by the producers: its
        `append_now` when it has one (bound once: the memory log), the log itself when a
        producer appends each chunk with its `append_one` (the memory log), whether it
        appends in batches (`append_then`: Redis), and the log."""
        appenders = self._appenders
        if appenders is None or appenders[3] is not self.log:
            log = self.log
            one = getattr(log, "append_one", None) is not None
            appenders = self._appenders = (
                getattr(log, "append_now", None),
                log if one and isinstance(log, MemoryStreamLog) else None,
                hasattr(log, "append_then"),
                log,
            )
        return appenders

    @property
    def producers(self) -> list[Producer]:
        """The answers this instance is writing."""
        return list(self._producers.values())

    def _forget(self, producer: Producer) -> None:
        if self._producers.get(producer.stream_id) is producer:
            del self._producers[producer.stream_id]
            self.gateway.metrics.stream_writers.dec()

    def _spawn(
        self, producer: Producer, open_stream: OpenStream, start_now: bool = False
    ) -> Producer:
        """Start `producer`'s task; `start_now`: its first step runs now, up to its first
        wait (the upstream request written, its response awaited), instead of in the task's
        own loop turn (gateway/eager.py): the first token waits for that write, and the
        reader then sets itself up (and ends its task) while the upstream answers."""
        self._producers[producer.stream_id] = producer
        self.gateway.metrics.stream_writers.inc()
        if producer.takeovers:
            self.gateway.metrics.stream_takeovers.inc()
        producer.task, start = eager_task(asyncio.get_running_loop(), producer.run(open_stream))
        if self._ticker is None:
            self._ensure_ticker()
        if start_now:
            start.step_now()
        return producer

    # -- starting answers ------------------------------------------------------------------

    def is_resumable(self, ex: Exchange, request: ChatRequest) -> bool:
        """The detached-generation opt-in: body `"unbroken": {"resumable": true}` (taken
        out of the upstream body here), header `X-Unbroken-Resumable: 1`, or the default.

        Raises:
            GatewayError: 400 for a malformed `unbroken` field.
        """
        options = request.extra.pop("unbroken", None)
        if options is not None:
            given = options.get("resumable") if isinstance(options, dict) else None
            if not isinstance(options, dict) or not isinstance(given, bool | None):
                raise GatewayError(
                    400,
                    'unbroken must be an object like {"resumable": true}',
                    code="invalid_value",
                    param="unbroken",
                )
            if given is not None:
                return given
        header = ex.header(b"x-unbroken-resumable")
        if header is not None:
            return header.strip() in (b"1", b"true", b"yes")
        return self.settings.resumable

    async def start(
        self,
        caller: Caller,
        request: ChatRequest,
        headers: dict[str, str],
        *,
        resumable: bool,
        on_complete: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        on_end: Callable[[ChatCompletion | None], Awaitable[None]] | None = None,
        renew_slot: Callable[[], Awaitable[None]] | None,
        wrap: Callable[[AsyncStream], AsyncStream] | None = None,
        booking: Booking | None = None,
        start_now: bool = False,
    ) -> Producer:
        """Create the stream's log and start producing `request` into it (`wrap` wraps the
        SDK stream, as the answer cache's recorder does); `start_now`: the producer's first
        step (to its upstream write) runs before this returns (`_spawn`)."""
        stream_id = new_stream_id(os.urandom(16))
        g = self.settings
        log = self.log
        # The memory log's create, after the upstream write when the producer starts now:
        # it waits for nothing, so it is done before any of the upstream's bytes can be
        # read (a later turn of the loop), and the first token does not wait for it (the
        # request's JSON, the log's records: ~200 bytecodes; bench/answer_cost.py).
        # Until then the producer's appends wait for it (`_await_created`): one its first
        # step makes (an answer that fails at once ends its log with the error).
        later = start_now and isinstance(log, MemoryStreamLog)
        created: asyncio.Future[Lease] | None = None
        if later:
            created, epoch = asyncio.get_running_loop().create_future(), 1
        else:
            making = self._create(log, stream_id, caller, request, headers, resumable)
            if isinstance(making, asyncio.Future):
                created, epoch = making, 1
            else:
                epoch = (await making).epoch
        producer = Producer(
            self,
            stream_id,
            epoch,
            resumable=resumable,
            on_complete=on_complete,
            on_end=on_end,
            renew_slot=renew_slot,
            slot_every_s=g.slot_lease_s / 3,
            booking=booking,
        )
        producer._created = created
        client = self.gateway.client
        router = self.gateway.router
        opened: AsyncStream | None = None  # what `open_stream` returned (until this returns)

        async def open_stream() -> AsyncStream:
            nonlocal opened
            # The request is parsed and checked (gateway/request.py): the SDK takes it as
            # it is, without the public call's checks (`stream_checked`).
            stream = client.stream_checked(
                request.model,
                request.messages,
                extra_body=request.extra or None,
                extra_headers=headers,
                fallbacks=router.fallback_routes(request.fallbacks) or None,
                routes=router.routes_for(request.model),
                # Each key recovers from its own share of the retry budgets.
                budget_key=caller.id,
            )
            opened = stream if wrap is None else wrap(stream)
            return opened

        self._spawn(producer, open_stream, start_now)
        if created is not None and later:
            try:
                lease = await self._create(log, stream_id, caller, request, headers, resumable)
            except Exception as exc:
                created.set_exception(exc)
                # No log was made: nothing to end or release (as a fenced writer), and the
                # upstream request already sent is given up.
                producer.stop("fenced")
                raise
            created.set_result(lease)
            # Nothing waits for it now (the log is there): not held for the answer's life.
            producer._created = None
            # As `Producer.run` did in its first step, when there was no log to take it:
            # the log keeps the decoder's template, not a copy of it (~340 bytes a stream).
            if (
                type(opened) is AsyncStream
                and producer._append_now is not None
                and not producer.finished
            ):
                producer._share_template(opened)
        return producer

    def _create(
        self,
        log: StreamLog,
        stream_id: str,
        caller: Caller,
        request: ChatRequest,
        headers: dict[str, str],
        resumable: bool,
    ) -> Awaitable[Lease]:
        """Create the log of a new stream (its lease), the request kept in it.

        A remote log (`create_soon`): the create goes out with this turn's writes and the
        upstream is asked meanwhile (one Redis round trip less before the first token); the
        producer waits for it before its first append, so an event is never logged (nor
        delivered) on a log that failed to be made. A new log's epoch is 1."""
        # Copied to its exact size: msgspec returns its growth buffer (up to 1.5x the JSON),
        # and the log keeps this for the answer's lifetime and after (an 8 KB request held
        # 12 KB; bench/stream_memory.py --prompt-bytes 8000).
        saved = bytes(
            memoryview(
                _encode(
                    {
                        "model": request.model,
                        "messages": request.messages,
                        "extra": request.extra,
                        "fallbacks": request.fallbacks,
                        "headers": headers,
                    }
                )
            )
        )
        create = getattr(log, "create_soon", None) or log.create
        making: Awaitable[Lease] = create(
            stream_id,
            caller=caller.id,
            request=saved,
            resumable=resumable,
            owner=self.instance,
            now=time.time(),
            lease_s=self.settings.stream_lease_s,
        )
        return making

    async def takeover(self, stream_id: str) -> Producer | None:
        """Take over an answer whose writer is gone and continue it upstream; None when
        another instance got there first (or the log ended meanwhile)."""
        local = self._producers.get(stream_id)
        if local is not None:
            return local
        g = self.settings
        lease = await self.log.acquire(stream_id, self.instance, time.time(), g.stream_lease_s)
        if lease is None:
            return None
        info = await self.log.info(stream_id)
        raw = await self.log.request(stream_id)
        if info is None or raw is None:
            return None
        saved = msgspec.json.decode(raw)
        partial, n_events = await self._partial(stream_id)
        producer = Producer(
            self,
            stream_id,
            lease.epoch,
            n_events=n_events,
            resumable=info.resumable,
            takeovers=lease.epoch - 1,
        )
        logger.info(
            "taking over stream %s at event %d (epoch %d)", stream_id, n_events, lease.epoch
        )
        client = self.gateway.client
        router = self.gateway.router

        async def open_stream() -> AsyncStream:
            common: dict[str, Any] = {
                "model": saved["model"],
                "messages": saved["messages"],
                "extra_body": saved["extra"] or None,
                "extra_headers": saved["headers"],
                "fallbacks": router.fallback_routes(saved["fallbacks"]) or None,
                "routes": router.routes_for(saved["model"]),
            }
            if partial is None:
                return await client.chat.completions.create(stream=True, **common)
            return await client.chat.completions.resume(partial=partial, **common)

        return self._spawn(producer, open_stream)

    async def _partial(self, stream_id: str) -> tuple[ChatCompletion | None, int]:
        """The answer as far as the log holds it (read page by page), and the event count."""
        acc = ChunkAccumulator()
        after = 0
        while True:
            batch = await self.log.read(stream_id, after, limit=PAGE_EVENTS, max_bytes=PAGE_BYTES)
            for seq, payload in batch.events:
                after = seq
                if payload.startswith(b'{"id"'):
                    acc.feed(msgspec.json.decode(payload, type=ChatCompletionChunk))
            if not batch.events:
                return (acc.completion() if acc.has_output else None), after

    async def chunks(self, stream_id: str) -> list[bytes]:
        """The answer's chunks as logged (page by page), without the final `unbroken` event
        and `[DONE]`: what the answer cache stores."""
        chunks: list[bytes] = []
        after = 0
        while True:
            batch = await self.log.read(stream_id, after, limit=PAGE_EVENTS, max_bytes=PAGE_BYTES)
            if not batch.events:
                return chunks
            for seq, payload in batch.events:
                after = seq
                if payload.startswith(b'{"id"') and b'"unbroken":' not in payload:
                    chunks.append(payload)

    # -- reading ---------------------------------------------------------------------------

    async def _check(self, ex: Exchange, stream_id: str, after: int) -> tuple[Caller, StreamInfo]:
        caller = await self.gateway.keys.identify(_authorization(ex))
        return caller, await self.check(caller, stream_id, after)

    async def check(self, caller: Caller, stream_id: str, after: int) -> StreamInfo:
        """May `caller` read `stream_id` after event `after`?

        Raises:
            GatewayError: 404 unknown, 403 another key's, 410 expired, 400 a cursor past
                the end.
        """
        info = await self.log.info(stream_id)
        if info is None:
            raise GatewayError(
                404, f"no stream {stream_id!r}", type="not_found_error", code="stream_not_found"
            )
        verdict = judge_reconnect(info, caller.id, after, self.log.retention, time.time())
        if verdict is Verdict.FORBIDDEN:
            raise GatewayError(
                403,
                f"stream {stream_id!r} belongs to another key",
                type="permission_error",
                code="stream_forbidden",
            )
        if verdict is Verdict.EXPIRED:
            raise GatewayError(
                410,
                f"stream {stream_id!r} expired (kept {self.log.retention.ttl_s:g} s after it "
                "ended, gateway.stream_ttl_s); send the request again",
                type="not_found_error",
                code="stream_expired",
            )
        if verdict is Verdict.BAD_CURSOR:
            raise GatewayError(
                400,
                f"event id {after} is past the end of stream {stream_id!r} ({info.n_events} "
                "events)",
                code="invalid_event_id",
                param="Last-Event-ID",
            )
        return info

    async def _writer(self, stream_id: str) -> Producer | None:
        """The local producer, after taking the stream over if its writer is gone."""
        local = self._producers.get(stream_id)
        if local is not None and not local.finished:
            return local
        info = await self.log.info(stream_id)
        if info is None or info.ended:
            return None
        if info.lease is None or not info.lease.is_live(time.time()):
            return await self.takeover(stream_id)
        return None

    async def follow(
        self,
        stream_id: str,
        after: int,
        producer: Producer | None = None,
        sink: EventSink | None = None,
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """The events after `after`, then live ones, until the log ends (one at a time; see
        `follow_batches`)."""
        async with contextlib.aclosing(
            self.follow_batches(stream_id, after, producer, sink)
        ) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def follow_batches(
        self,
        stream_id: str,
        after: int,
        producer: Producer | None = None,
        sink: EventSink | None = None,
        head: EventSink | None = None,
        *,
        detach: bool = False,
        resumed: bool = False,
    ) -> AsyncGenerator[list[tuple[int, bytes]], None]:
        """The events after `after`, then live ones, until the log ends, as lists of the
        consecutive events available at once (a relay writes each list in one write).

        With a `producer` (the POST that started the answer), a failure before the first
        event raises its `GatewayError` instead, so the client gets a real HTTP status.
        With a `sink`, live events of a producer on this instance go to the sink instead,
        whenever it is ready (see the theory of operation); the rest are yielded. With a
        `head` too (and `after` 0), the producer's first events go to it (it starts the
        response) before any wake-up of this reader. With `detach`, handing itself to the
        producer raises `Parked` instead of awaiting (gateway/detach.py); `resumed` goes on
        after such a hand-off (the producer's first events were seen then).
        """
        log = self.log
        if resumed and sink is not None and not sink.ready():
            # Woken because the relay stopped (or the client is not draining): a reader
            # awaiting the hand-off is cancelled there, so this one is too, before it reads
            # on (a stopped reader must not take over a log its producer just released).
            await asyncio.sleep(0)
        if resumed and producer is not None and after == 0 and producer.failure is not None:
            raise producer.failure  # detached before the first event, which never came
        if producer is not None and not resumed:
            ready = head is not None and after == 0 and head.ready()
            if ready and detach and head is not None:
                # Handed to the producer before the first token, the reader's task ends
                # now: the head sink writes the response from the first event on, and
                # the reader resumes when it refuses one or the answer ends (one task
                # wake-up and one `send` less per answer).
                waiter = Detached(producer, head)
                if producer.park_waiter(head, 0, waiter):
                    raise Parked(waiter)
            parked = producer.park(head, 0) if ready and head is not None else None
            if parked is not None and head is not None:
                try:
                    await parked
                finally:
                    after = producer.taken_back(head)
            else:
                await producer.first.wait()
            if producer.failure is not None and after == 0:
                raise producer.failure
        touched = 0.0
        while True:
            local = self._producers.get(stream_id) or producer
            fresh = local.tail_events(after) if local is not None else None
            if local is not None and fresh is not None:
                # Live on this instance: serve from the producer's tail, not the store.
                if fresh:
                    after = fresh[-1][0]
                    yield fresh
                    continue
                if not local.finished:
                    if detach and sink is not None and sink.ready():
                        waiter = Detached(local, sink)
                        if local.park_waiter(sink, after, waiter):
                            # The reader's task ends here; it resumes in a new one.
                            raise Parked(waiter)
                    parked = local.park(sink, after) if sink is not None and sink.ready() else None
                    if parked is not None and sink is not None:
                        # No list of the last events held while parked (~160 bytes).
                        fresh = None
                        try:
                            await parked
                        finally:
                            after = local.taken_back(sink)
                    else:
                        await local.wait(after, TICK_S)
                    continue
            if local is not None and local.degraded and local.finished:
                return  # the store failed during the answer: its tail was all of it
            try:
                batch = await log.read(stream_id, after, limit=PAGE_EVENTS, max_bytes=PAGE_BYTES)
            except UnknownStreamError:
                raise GatewayError(
                    410, f"stream {stream_id!r} expired", code="stream_expired"
                ) from None
            if batch.events:
                after = batch.events[-1][0]
                yield batch.events
            if batch.ended and after >= batch.n_events:
                return
            if batch.events:
                continue
            writer = self._producers.get(stream_id)
            if writer is None or writer.finished:
                writer = None
                now = time.time()
                if now - touched >= TICK_S:
                    # Once a second: say a reader follows, and look for a dead writer.
                    touched = now
                    await log.touch_reader(stream_id, now)
                    writer = await self._writer(stream_id)
            if writer is not None:
                await writer.wait(after, TICK_S)
            else:
                await log.wait(stream_id, after, TICK_S)

    # -- endpoints -------------------------------------------------------------------------

    async def handle(self, ex: Exchange, method: str, path: str) -> None:
        """`GET /v1/streams/{id}` (SSE or long-poll JSON) and `DELETE /v1/streams/{id}`."""
        # /v1/streams/{id}, or /streams/{id} for clients whose base URL lacks the /v1
        raw_id = path.removeprefix(STREAMS_PATH).removeprefix("/streams")[1:]
        try:
            stream_id = check_stream_id(raw_id)
        except InvalidRequestError as exc:
            raise GatewayError(
                404, exc.message, type="not_found_error", code="stream_not_found"
            ) from None
        query = parse_qs(ex.scope.get("query_string", b"").decode("latin-1"))
        if method == "DELETE":
            await self._stop(ex, stream_id)
            return
        if method != "GET":
            raise GatewayError(
                405,
                f"method {method} is not allowed on {path[:200]}; use GET or DELETE",
                code="method_not_allowed",
                headers=[(b"allow", b"GET, DELETE")],
            )
        last = ex.header(b"last-event-id")
        try:
            # EventSource resends the original URL with the newest id in the header: the
            # header wins over ?after=.
            after = parse_event_id(
                last.decode("latin-1") if last is not None else _first(query, "after")
            )
        except InvalidRequestError as exc:
            raise GatewayError(400, exc.message, code="invalid_event_id", param="after") from None
        _, info = await self._check(ex, stream_id, after)
        accept = ex.header(b"accept") or b""
        if b"application/json" in accept and b"text/event-stream" not in accept:
            await self._long_poll(ex, stream_id, after, _first(query, "wait"))
            return
        if info.ended and after >= info.n_events:
            # Nothing more will ever come: 204 tells EventSource to stop reconnecting
            # (WHATWG SSE: a 204 fails the connection without a retry).
            await ex.start(204, [(STREAM_ID_HEADER, stream_id.encode())])
            await ex.send({"type": "http.response.body", "body": b""})
            return
        await self._sse(ex, stream_id, after)

    async def _sse(self, ex: Exchange, stream_id: str, after: int) -> None:
        g = self.settings
        gateway = self.gateway
        from unbroken.gateway.relay import StreamRelay

        relay = StreamRelay(
            ex,
            gateway.scrub,
            keepalive_s=g.keepalive_s,
            send_timeout_s=g.send_timeout_s,
            headers=[(STREAM_ID_HEADER, stream_id.encode())],
        )
        writer = await self._writer(stream_id)
        if writer is not None:
            writer.attach()
        gateway._relays.add(relay)
        # A caught-up reader may detach, as a POST's does (gateway/detach.py).
        detach = ex.scope.get("extensions", {}).get(DETACH_EXTENSION) is True
        parked = False
        try:
            await relay.events(
                self.follow_batches(
                    stream_id, after, sink=relay.sink(), detach=detach and ex.hooks() is not None
                )
            )
        except Parked as exc:
            parked = True
            detached = exc.detached
            detached.gateway, detached.stream_id, detached.streamed = gateway, stream_id, writer
            raise
        finally:
            if not parked:
                self._sse_done(relay, writer)

    async def sse_resume(self, detached: Detached) -> None:
        """The rest of `_sse` for a detached reader (gateway/detach.py)."""
        relay = detached.relay
        writer: Producer | None = detached.streamed
        after = detached.producer.taken_back(detached.sink)
        parked = False
        try:
            await relay.events(
                self.follow_batches(
                    detached.stream_id, after, sink=detached.sink, detach=True, resumed=True
                ),
                resumed=True,
            )
        except Parked as exc:
            parked = True
            exc.detached.carry(detached)
            raise
        finally:
            if not parked:
                self._sse_done(relay, writer)

    def _sse_done(self, relay: Any, writer: Producer | None) -> None:
        gateway = self.gateway
        gateway._relays.discard(relay)
        if relay.result is not None:  # a reconnect relays chunks too
            gateway.metrics.chunks.inc(relay.result.n_chunks)
            gateway.metrics.chunks_direct.inc(relay.result.n_direct)
        if writer is not None:
            writer.detach(time.time())

    async def _long_poll(self, ex: Exchange, stream_id: str, after: int, wait: str | None) -> None:
        try:
            wait_s = min(MAX_WAIT_S, max(0.0, float(wait))) if wait else 0.0
        except ValueError:
            raise GatewayError(
                400, f"wait must be a number of seconds, got {str(wait)[:20]!r}", param="wait"
            ) from None
        deadline = time.monotonic() + wait_s
        while True:
            batch = await self.log.read(stream_id, after, limit=PAGE_EVENTS, max_bytes=PAGE_BYTES)
            left = deadline - time.monotonic()
            if batch.events or batch.ended or left <= 0:
                break
            writer = await self._writer(stream_id)
            if writer is not None:
                await writer.wait(after, min(left, TICK_S))
            else:
                await self.log.touch_reader(stream_id, time.time())
                await self.log.wait(stream_id, after, min(left, TICK_S))
        chunks = [p for _, p in batch.events if p != DONE]
        last = batch.events[-1][0] if batch.events else after
        done = batch.ended and last >= batch.n_events
        body = (
            b'{"events":['
            + b",".join(chunks)
            + b'],"next":"'
            + str(last).encode()
            + b'","done":'
            + (b"true" if done else b"false")
            + b"}"
        )
        await ex.respond(200, body, headers=[(STREAM_ID_HEADER, stream_id.encode())])

    async def _stop(self, ex: Exchange, stream_id: str) -> None:
        caller = await self.gateway.keys.identify(_authorization(ex))
        stopped = await self.stop_stream(caller, stream_id)
        await ex.respond_json(200, {"id": stream_id, "object": "stream", "stopped": stopped})

    async def writer(self, stream_id: str) -> Producer | None:
        """The local producer of a live stream, taking it over if its writer is gone."""
        return await self._writer(stream_id)

    async def stop_stream(self, caller: Caller, stream_id: str) -> bool:
        """Stop a stream's generation (wherever its writer runs); False when it had ended.

        Raises:
            GatewayError: as `check`.
        """
        info = await self.check(caller, stream_id, 0)
        stopped = not info.ended
        local = self._producers.get(stream_id)
        if local is not None and not local.finished:
            local.stop("stopped")
            if local.task is not None:
                await asyncio.shield(local.task)
        elif stopped:
            await self.log.request_stop(stream_id)
            # No live writer anywhere: end the log here, under a lease of our own.
            lease = await self.log.acquire(
                stream_id, self.instance, time.time(), self.settings.stream_lease_s
            )
            if lease is not None:
                final = final_event(ChatCompletion(), stream_id, lease.epoch - 1)
                with contextlib.suppress(FencedError):
                    await self.log.append(
                        stream_id,
                        lease.epoch,
                        [_stop_chunk(None), final, DONE],
                        time.time(),
                        end=True,
                    )
        return stopped

    # -- the ticker ------------------------------------------------------------------------

    def start_ticker(self) -> None:
        """Start renewing leases, sweeping for orphans and expired logs (at startup; a
        producer starts it too, for apps run without lifespan events)."""
        self._ensure_ticker()

    def _ensure_ticker(self) -> None:
        if self._ticker is None and not self._closing:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        g = self.settings
        swept = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.time()
            live = [p for p in self.producers if not p.finished]
            # Every lease in one call: on Redis one pipeline a tick, not one round trip per
            # live stream in sequence (10,000 streams made 10,000 calls a second).
            try:
                infos = await self.log.renew_many(
                    self.instance, [(p.stream_id, p.epoch) for p in live], now, g.stream_lease_s
                )
            except UnbrokenError as exc:
                # A store hiccup: the lease lives a few seconds; the next tick retries.
                logger.warning("renewing %d streams failed: %s", len(live), exc)
                infos = []
            for producer, info in zip(live, infos, strict=False):
                if isinstance(info, UnbrokenError):
                    logger.warning("renewing stream %s failed: %s", producer.stream_id, info)
                elif not producer.finished and producer.renewed(info, g.detach_grace_s, now):
                    try:
                        await producer.renew_slot_if_due()
                    except UnbrokenError as exc:
                        logger.warning("renewing stream %s failed: %s", producer.stream_id, exc)
            # The memory log's ended logs are compressed here, in a row (not each at its
            # answer's end).
            seal_ended = getattr(self.log, "seal_ended", None)
            if seal_ended is not None:
                seal_ended()
            try:
                for stream_id in await self.log.orphans(now, ORPHANS_PER_TICK):
                    await self.takeover(stream_id)
                if time.monotonic() - swept >= SWEEP_EVERY_S:
                    swept = time.monotonic()
                    await self.log.sweep(now)
            except UnbrokenError as exc:
                logger.warning("stream sweeper: %s", exc)

    async def live_stream(self, session_id: str) -> str | None:
        """The id of the answer a session is getting now, if one is still being written."""
        stream_id = await self.log.session_stream(session_id)
        if stream_id is None:
            return None
        info = await self.log.info(stream_id)
        return stream_id if info is not None and not info.ended else None

    def abort(self) -> None:
        """Stop every answer this instance writes, leaving their logs open for a takeover
        (the drain deadline of a shutdown)."""
        for producer in self.producers:
            producer.stop("shutdown")

    async def aclose(self) -> None:
        """Stop the ticker and the producers (their leases are released), close the log."""
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        tasks = [p.task for p in self.producers if p.task is not None]
        self.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self.log.aclose()


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _authorization(ex: Exchange) -> bytes | None:
    """The Authorization header, or the RFC 6750 `access_token` query parameter (the
    browser's EventSource cannot send headers)."""
    header = ex.header(b"authorization")
    if header is not None:
        return header
    token = _first(parse_qs(ex.scope.get("query_string", b"").decode("latin-1")), "access_token")
    return None if token is None else b"Bearer " + token.encode("latin-1")
