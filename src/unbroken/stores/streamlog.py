"""The stream log interface, and its embedded backend (`MemoryStreamLog`).

One interface, two backends: this one (one process, the default) and `RedisStreamLog`
(`stores/redis_streamlog.py`, shared by several gateway instances). One table of behaviour
cases runs against both (`tests/integration/test_streamlog.py`). Ids, leases, epochs and
retention are `core.streamlog` values; time is passed in (Unix seconds). Imports core,
errors, asyncio and unbroken._flag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from unbroken._flag import Flag
from unbroken.core.streamlog import (
    Lease,
    Renewal,
    Retention,
    Room,
    StreamInfo,
    acquire_lease,
    release_lease,
)
from unbroken.errors import StoreError
from unbroken.stores.packed import BLOCK_EVENTS, PackedEvents, TemplateSource

__all__ = [
    "END_SLACK_BYTES",
    "Batch",
    "FencedError",
    "LogFullError",
    "LogHandle",
    "MemoryStreamLog",
    "StreamLog",
    "UnknownStreamError",
]

# Tombstones (expired streams still answered with 410) kept at most, oldest dropped first.
MAX_TOMBSTONES = 100_000
# Logs a sweep looks at between two turns of the loop (~5-10 ms of it).
SWEEP_SLICE = 4096
# The last events of a log (a stop finish, the final event, an error, [DONE]) fit past the
# bounds by this much, so a log that hit them can still end.
END_SLACK_BYTES = 4096
# Ended logs whose last block is sealed later (`MemoryStreamLog.seal_ended`) at most: past it
# they are sealed at once (a log used without a hub ticker stays bounded).
MAX_UNSEALED = 4096
# `append_one` appends an event's length itself below this: every length array (`array("H")`
# or, once widened, "I") takes it (`PackedEvents.add` widens the array for larger ones).
_LENGTH_LIMIT: Final = 1 << 16


class FencedError(StoreError):
    """The writer's epoch is no longer the stream's: another writer took over (or the log
    ended); it must stop at once."""


class LogFullError(StoreError):
    """The append does not fit the retention bounds (per stream or in total)."""


class UnknownStreamError(StoreError):
    """No such stream (never created, or forgotten after its tombstone time)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Events read from a log.

    Attributes:
        events: (sequence number, payload) pairs, in order.
        ended: the log had ended when it was read.
        n_events: how many events the log held then.
    """

    events: list[tuple[int, bytes]]
    ended: bool
    n_events: int


class StreamLog(Protocol):
    """Where streamed answers are logged, event by event (see `core.streamlog`).

    Failures raise `StoreError` (or the subclasses above).
    """

    retention: Retention

    async def create(
        self,
        stream_id: str,
        *,
        caller: str,
        request: bytes,
        resumable: bool,
        owner: str,
        now: float,
        lease_s: float,
    ) -> Lease:
        """Start a stream's log, with `owner` holding its first lease (epoch 1)."""

    async def append(
        self, stream_id: str, epoch: int, payloads: Sequence[bytes], now: float, *, end: bool
    ) -> int:
        """Append `payloads` as the next events; `end` makes the last one the log's last
        (last events of up to `END_SLACK_BYTES` fit past the bounds).

        Returns:
            the sequence number of the last event appended.

        Raises:
            FencedError: `epoch` is not the current one, or the log has ended.
            LogFullError: the payloads do not fit (nothing is appended).
            UnknownStreamError: no such stream.
        """

    async def read(self, stream_id: str, after: int, *, limit: int, max_bytes: int) -> Batch:
        """Events after `after`: at most `limit`, and at most `max_bytes` of payload
        unless one event alone is bigger (it is returned by itself).

        Raises:
            UnknownStreamError: no such stream, or its events expired.
        """

    async def wait(self, stream_id: str, after: int, timeout_s: float) -> None:
        """Return when the log holds an event after `after`, or after `timeout_s`."""

    async def info(self, stream_id: str) -> StreamInfo | None:
        """What is known of the stream (also of an expired one, for a while), or None."""

    async def request(self, stream_id: str) -> bytes | None:
        """The request the stream answers (what a takeover sends upstream again)."""

    async def acquire(self, stream_id: str, owner: str, now: float, lease_s: float) -> Lease | None:
        """Take the writer's lease (`core.streamlog.acquire_lease`); None when another
        owner holds a live one or the log has ended."""

    async def renew(
        self, stream_id: str, owner: str, epoch: int, now: float, lease_s: float
    ) -> StreamInfo | None:
        """Renew the lease; the stream's info (stop requests, readers elsewhere), or None
        when the writer is fenced."""

    async def renew_many(
        self, owner: str, leases: Sequence[tuple[str, int]], now: float, lease_s: float
    ) -> list[Renewal | StoreError | None]:
        """`renew` of each `(stream_id, epoch)` of `owner`, in order, at once (a store
        behind a network sends them in one round trip), answering only what the writer
        acts on: a `Renewal`, None when the writer is fenced, or the `StoreError` of a
        stream the store cannot read (the others are still renewed)."""

    async def release(self, stream_id: str, owner: str, epoch: int) -> None:
        """Give the lease up (a reconnect may take it over at once)."""

    async def request_stop(self, stream_id: str) -> None:
        """Ask the writer to stop (it sees the request when it renews its lease)."""

    async def touch_reader(self, stream_id: str, now: float) -> None:
        """Record that a reader follows the stream (detached writers wait for readers)."""

    async def orphans(self, now: float, limit: int) -> list[str]:
        """Streams whose answer opted into detached generation, whose log has not ended
        and whose writer's lease expired (its instance died): a sweeper takes them over."""

    async def sweep(self, now: float) -> int:
        """Forget expired logs (their events; a tombstone stays); returns how many."""

    async def link_session(self, session_id: str, stream_id: str, now: float) -> None:
        """Record `stream_id` as the answer a session is getting now."""

    async def session_stream(self, session_id: str) -> str | None:
        """The stream last linked to a session, if it is still known."""

    async def aclose(self) -> None:
        """Release connections."""


@dataclass(slots=True)
class _Stream:
    # `StreamInfo`'s fields, kept here (not as a frozen StreamInfo replaced on every lease
    # renewal: ~130 bytes less per live stream, and no StreamInfo made a renewal);
    # `info` is built when asked for.
    id: str
    caller: str
    created_at: float
    resumable: bool
    request: bytes
    # The lease, as its fields (`lease` builds it): a renewal sets `lease_until` in place
    # to the one float of its tick, instead of replacing a Lease and its expiry float
    # (~80 bytes per held stream; bench/stream_memory.py).
    owner: str
    epoch: int
    lease_until: float
    stop_requested: bool = False
    reader_at: float = 0.0
    events: PackedEvents = field(default_factory=PackedEvents)
    n_events: int = 0
    n_bytes: int = 0
    updated_at: float = 0.0
    ended_at: float | None = None
    changed: Flag | None = None  # made by the first `wait` (~40 bytes a live stream)
    gone: bool = False  # events forgotten (a tombstone)
    # The epoch that may append: the lease's while the log is open, -1 once it ended or
    # was forgotten (`append_one` checks this one field per relayed chunk, not three).
    writer: int = 1

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def lease(self) -> Lease:
        return Lease(self.owner, self.epoch, self.lease_until)

    def hold(self, lease: Lease) -> None:
        self.owner, self.epoch, self.lease_until = lease.owner, lease.epoch, lease.expires_at
        if self.writer >= 0:
            self.writer = lease.epoch

    def close(self) -> None:
        """No more appends (the log ended, or was forgotten)."""
        self.writer = -1

    @property
    def info(self) -> StreamInfo:
        return StreamInfo(
            id=self.id,
            caller=self.caller,
            created_at=self.created_at,
            updated_at=self.updated_at,
            n_events=self.n_events,
            n_bytes=self.n_bytes,
            ended=self.ended_at is not None,
            ended_at=self.ended_at,
            lease=self.lease,
            stop_requested=self.stop_requested,
            reader_at=self.reader_at,
            resumable=self.resumable,
        )


# A log as `MemoryStreamLog.handle` gives it to its writer (`append_to`).
LogHandle = _Stream


class MemoryStreamLog:
    """The embedded `StreamLog`: dicts in this process (one event loop, so every method
    is atomic), each log's events packed (stores/packed.py). Readers wait on an
    asyncio.Event-like `Flag` (unbroken._flag) per stream, set on every append.

    Args:
        retention: how long and how much is kept.
    """

    def __init__(self, retention: Retention | None = None) -> None:
        self._retention = retention or Retention()
        # Its bounds as this log's own ints: compiled, `append_one` reads them natively, not
        # as two attribute lookups on the dataclass per relayed chunk.
        self._max_stream_bytes = self._retention.max_stream_bytes
        self._max_total_bytes = self._retention.max_total_bytes
        # In the order they were made (evictions take the oldest first): a dict, not an
        # OrderedDict (its links cost ~50 bytes a log held, and compiled, a dict's `get`
        # is a native call, once per relayed chunk).
        self._streams: dict[str, _Stream] = {}
        self._sessions: dict[str, str] = {}
        self._total = 0
        # Ended logs whose open block is not sealed yet (`seal_ended`).
        self._unsealed: list[_Stream] = []
        # The resumable logs neither ended nor forgotten, in the order they were made: the
        # only ones `orphans` looks at (once a tick). Why: it looked at every log held, and
        # a gateway holds every answer of the retention window (thousands), nearly all
        # ended; the scan grew with the answers per second times the retention.
        self._open_resumable: dict[str, _Stream] = {}

    def __repr__(self) -> str:
        return f"MemoryStreamLog(streams={len(self._streams)}, bytes={self._total})"

    @property
    def retention(self) -> Retention:
        """How long and how much of the logs is kept."""
        return self._retention

    @retention.setter
    def retention(self, retention: Retention) -> None:
        self._retention = retention
        self._max_stream_bytes = retention.max_stream_bytes
        self._max_total_bytes = retention.max_total_bytes

    @property
    def total_bytes(self) -> int:
        """Payload bytes held by all logs."""
        return self._total

    def _get(self, stream_id: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise UnknownStreamError(f"no stream {stream_id[:60]!r}")
        return stream

    async def create(
        self,
        stream_id: str,
        *,
        caller: str,
        request: bytes,
        resumable: bool,
        owner: str,
        now: float,
        lease_s: float,
    ) -> Lease:
        """See `StreamLog.create`."""
        if stream_id in self._streams:
            raise StoreError(f"stream {stream_id[:60]!r} exists already")
        until = now + lease_s
        stream = self._streams[stream_id] = _Stream(
            stream_id, caller, now, resumable, request, owner, 1, until, updated_at=now
        )
        if resumable:
            self._open_resumable[stream_id] = stream
        return Lease(owner, 1, until)

    def _evict_for(self, size: int, keep: str) -> bool:
        # Oldest ended logs go first; an unfinished answer is never evicted for another.
        for sid, stream in list(self._streams.items()):
            if self.retention.room(0, self._total, size) is Room.OK:
                return True
            if sid != keep and stream.ended and not stream.gone:
                self._forget(stream)
        return self.retention.room(0, self._total, size) is Room.OK

    def _forget(self, stream: _Stream) -> None:
        self._total -= stream.n_bytes
        stream.n_bytes = 0
        stream.events = PackedEvents()
        stream.gone = True
        stream.close()
        stream.request = b""
        if stream.resumable:
            self._open_resumable.pop(stream.id, None)

    async def append(
        self, stream_id: str, epoch: int, payloads: Sequence[bytes], now: float, *, end: bool
    ) -> int:
        """See `StreamLog.append`."""
        if not end and len(payloads) == 1:
            return self.append_one(stream_id, epoch, payloads[0], now)
        return self._append(stream_id, epoch, payloads, now, end)

    def append_now(
        self, stream_id: str, epoch: int, payloads: Sequence[bytes], now: float, *, end: bool
    ) -> int:
        """`append` without a coroutine: a producer on this process calls it for what it
        appends outside the relayed chunks' `append_one` (an answer's usage chunk, its
        last events; gateway/streams.py). One event that does not end the log is
        `append_one`'s."""
        if not end and len(payloads) == 1:
            return self.append_one(stream_id, epoch, payloads[0], now)
        return self._append(stream_id, epoch, payloads, now, end)

    def _append(
        self, stream_id: str, epoch: int, payloads: Sequence[bytes], now: float, end: bool
    ) -> int:
        """`append_now` of several events, of the last ones (`end`), or past the common
        case of `append_one` (fenced, unknown, full: it says why, or makes room)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._get(stream_id)  # raises
        if stream.gone or stream.ended_at is not None or stream.epoch != epoch:
            raise FencedError(f"stream {stream_id!r}: epoch {epoch} may not append")
        size = sum(map(len, payloads))
        n_bytes = stream.n_bytes + size
        total = self._total + size
        # The common case without a call: room in the stream and in the store.
        if n_bytes > self._max_stream_bytes or total > self._max_total_bytes:
            retention = self._retention
            room = retention.room(stream.n_bytes, self._total, size)
            if end and size <= END_SLACK_BYTES:
                room = Room.OK
            if room is Room.TOTAL_FULL and self._evict_for(size, stream_id):
                room = Room.OK
            if room is not Room.OK:
                raise LogFullError(_full_message(stream_id, room, retention))
            total = self._total + size
        events = stream.events
        events.extend(payloads)
        self._total = total
        stream.n_bytes = n_bytes
        n = stream.n_events = stream.n_events + len(payloads)
        stream.updated_at = now
        if end:
            # The last block is sealed (deflated) later, with those of the other answers
            # that ended meanwhile (`seal_ended`, the hub's tick): deflating it cost
            # ~35 us of an answer's end among the relay's reads, ~10 us in a row with
            # others (bench/hotpath.py). Reads do not depend on it.
            events.source = None
            stream.ended_at = now
            stream.close()
            unsealed = self._unsealed
            unsealed.append(stream)
            if len(unsealed) > MAX_UNSEALED:
                self.seal_ended()
            if stream.resumable:
                self._open_resumable.pop(stream_id, None)
        # (`changed` is made by a `wait`; set with nobody waiting any more, it is harmless.)
        changed = stream.changed
        if changed is not None:
            changed.set()
            stream.changed = None
        return n

    def append_one(self, stream_id: str, epoch: int, payload: bytes, now: float) -> int:
        """`append_now` of one event that does not end the log: a producer on this process
        calls it for each chunk relayed as its upstream bytes (no sequence built per chunk;
        bench/hotpath.py). Raises what `append_now` raises."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return self._append(stream_id, epoch, (payload,), now, False)  # raises
        return self.append_to(stream, epoch, payload, now)

    def handle(self, stream_id: str) -> LogHandle:
        """The log of `stream_id` as `append_to` takes it: a producer holds it for its
        answer's life, so that its chunks' appends look nothing up by id. The handle
        fences nothing: `append_to` checks the epoch as `append_one` does.

        Raises:
            UnknownStreamError: no such stream.
        """
        return self._get(stream_id)

    def append_to(self, stream: LogHandle, epoch: int, payload: bytes, now: float) -> int:
        """`append_one` into the log `handle` gave (the relayed chunk's path: no lookup of
        the stream by id, ~1 dict probe and its cold lines per chunk). Raises what
        `append_now` raises: fenced (the writer's epoch is not `epoch`, or the log ended or
        was forgotten), or full."""
        size = len(payload)
        # The sums are checked and then stored as they are (fewer bytecodes per chunk).
        if (
            stream.writer != epoch  # (fenced, ended, forgotten)
            or (n_bytes := stream.n_bytes + size) > self._max_stream_bytes
            or (total := self._total + size) > self._max_total_bytes
        ):
            # Not the common case (fenced, forgotten, full): `_append` says why, or makes
            # room (by id: the same answer as `append_one`'s for a forgotten log).
            return self._append(stream.id, epoch, (payload,), now, False)
        events = stream.events
        cut = events._cut
        # `PackedEvents.add` of an event on the template, spelt out (a call and its loads
        # less per relayed chunk; bench/hotpath.py --bytecodes); else the call.
        if (
            cut
            and cut <= size < _LENGTH_LIMIT
            and payload.startswith(events._head)
            and payload.endswith(events._tail)
        ):
            lengths = events._lengths
            lengths.append(size)
            at = events._at
            packed = events._packed
            packed += payload[at : at + size - cut]
            if not len(lengths) % BLOCK_EVENTS:
                events._seal()
        else:
            events.add_other(payload)
        self._total = total
        stream.n_bytes = n_bytes
        n = stream.n_events = stream.n_events + 1
        stream.updated_at = now
        changed = stream.changed
        if changed is not None:
            changed.set()
            stream.changed = None
        return n

    def seal_ended(self) -> int:
        """Seal the last block of the logs that ended since the last call (their events
        compressed, for memory; `PackedEvents.seal`); returns how many. The hub calls it
        once a tick."""
        unsealed, self._unsealed = self._unsealed, []
        for stream in unsealed:
            if not stream.gone:
                stream.events.seal()
        return len(unsealed)

    async def read(self, stream_id: str, after: int, *, limit: int, max_bytes: int) -> Batch:
        """See `StreamLog.read`."""
        stream = self._get(stream_id)
        if stream.gone:
            raise UnknownStreamError(f"stream {stream_id!r} expired")
        packed = stream.events
        last = after
        size = 0
        for seq in range(after + 1, min(stream.n_events, after + limit) + 1):
            length = packed.length(seq)
            if last > after and size + length > max_bytes:
                break
            last = seq
            size += length
        payloads = packed.get(after + 1, last) if last > after else []
        return Batch(list(enumerate(payloads, after + 1)), stream.ended, stream.n_events)

    def share_template(self, stream_id: str, source: TemplateSource | None) -> None:
        """Templates the log of `stream_id` learns are taken from `source` when it holds the
        same bytes (`PackedEvents.source`); None stops asking it (the writer is done)."""
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.gone:
            stream.events.source = source

    def text_now(
        self, stream_id: str, after: int, last: int, index: int, reasoning: bool
    ) -> list[str] | None:
        """The pieces of choice `index`'s content (its reasoning with `reasoning`) in events
        `after + 1` to `last` (`PackedEvents.text`), read without a coroutine; None when
        the log does not hold them (unknown, forgotten, or shorter)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.gone or last > stream.n_events or after > last:
            return None
        return stream.events.text(after + 1, last, index, reasoning) if after < last else []

    def events_now(self, stream_id: str, after: int, last: int) -> list[tuple[int, bytes]] | None:
        """Events `after + 1` to `last` read without a coroutine (a producer on this process
        serves its readers from here: gateway/streams.py `Producer.tail_events`); None when
        the log does not hold them (unknown, forgotten, or shorter)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.gone or last > stream.n_events or after > last:
            return None
        if after == last:
            return []
        return list(enumerate(stream.events.get(after + 1, last), after + 1))

    async def wait(self, stream_id: str, after: int, timeout_s: float) -> None:
        """See `StreamLog.wait`."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.n_events > after or stream.ended:
            return
        changed = stream.changed
        if changed is None:
            changed = stream.changed = Flag()
        try:
            async with asyncio.timeout(timeout_s):
                await changed.wait()
        except TimeoutError:
            return

    async def info(self, stream_id: str) -> StreamInfo | None:
        """See `StreamLog.info`."""
        stream = self._streams.get(stream_id)
        return None if stream is None else stream.info

    async def request(self, stream_id: str) -> bytes | None:
        """See `StreamLog.request`."""
        stream = self._streams.get(stream_id)
        return None if stream is None or stream.gone else stream.request

    async def acquire(self, stream_id: str, owner: str, now: float, lease_s: float) -> Lease | None:
        """See `StreamLog.acquire`."""
        stream = self._get(stream_id)
        if stream.ended or stream.gone:
            return None
        lease = acquire_lease(stream.lease, owner, now, lease_s)
        if lease is not None:
            stream.hold(lease)
            stream.updated_at = now
        return lease

    async def renew(
        self, stream_id: str, owner: str, epoch: int, now: float, lease_s: float
    ) -> StreamInfo | None:
        """See `StreamLog.renew`."""
        stream = self._renew(stream_id, owner, epoch, now, now + lease_s)
        return None if stream is None else stream.info

    def _renew(
        self, stream_id: str, owner: str, epoch: int, now: float, until: float
    ) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.gone:
            return None
        # `renew_lease` in place: the holder of the epoch renews (an expired lease too).
        if stream.epoch != epoch or stream.owner != owner:
            return None
        stream.lease_until = until
        stream.updated_at = now
        return stream

    async def renew_many(
        self, owner: str, leases: Sequence[tuple[str, int]], now: float, lease_s: float
    ) -> list[Renewal | StoreError | None]:
        """See `StreamLog.renew_many`."""
        out: list[Renewal | StoreError | None] = []
        until = now + lease_s  # one float for every lease renewed in this call
        for stream_id, epoch in leases:
            stream = self._renew(stream_id, owner, epoch, now, until)
            out.append(None if stream is None else Renewal(stream.stop_requested, stream.reader_at))
        return out

    async def release(self, stream_id: str, owner: str, epoch: int) -> None:
        """See `StreamLog.release`."""
        stream = self._streams.get(stream_id)
        if stream is not None and (lease := release_lease(stream.lease, owner, epoch)):
            stream.hold(lease)

    async def request_stop(self, stream_id: str) -> None:
        """See `StreamLog.request_stop`."""
        stream = self._get(stream_id)
        stream.stop_requested = True

    async def touch_reader(self, stream_id: str, now: float) -> None:
        """See `StreamLog.touch_reader`."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.reader_at = now

    async def orphans(self, now: float, limit: int) -> list[str]:
        """See `StreamLog.orphans`."""
        found = []
        for sid, stream in self._open_resumable.items():
            if (
                stream.resumable
                and not stream.ended
                and not stream.gone
                and stream.lease_until > 0  # released on purpose: not an orphan
                and not now < stream.lease_until  # `Lease.is_live`
            ):
                found.append(sid)
                if len(found) >= limit:
                    break
        return found

    async def sweep(self, now: float) -> int:
        """See `StreamLog.sweep`."""
        n = 0
        retention = self.retention
        ttl_s, tombstone_s = retention.ttl_s, retention.tombstone_s
        tombstones = 0
        # `StreamInfo.expires_at` and `is_expired` read off the fields, not through a
        # StreamInfo made per log: a sweep of the 60,000 logs 100 answers/s keep held the
        # loop ~0.5 s every SWEEP_EVERY_S with one.
        # The loop runs others' callbacks between slices (the relays' reads): a sweep of
        # 60,000 logs took ~0.1 s. Each log is read as it is when its slice comes.
        # The logs themselves, not (id, log) pairs: no tuple made per held log (60,000
        # of them set off a full collection).
        for i, stream in enumerate(list(self._streams.values())):
            if i and not i % SWEEP_SLICE:
                await asyncio.sleep(0)
            ended_at = stream.ended_at
            expires_at = (ended_at if ended_at is not None else stream.updated_at) + ttl_s
            if stream.gone:
                tombstones += 1
                if now >= expires_at + tombstone_s:
                    self._streams.pop(stream.id, None)
                    tombstones -= 1
            elif now >= expires_at and (ended_at is not None or not now < stream.lease_until):
                # (an unfinished answer whose writer holds a live lease never expires)
                self._forget(stream)
                tombstones += 1
                n += 1
        if tombstones > MAX_TOMBSTONES:
            for sid, stream in list(self._streams.items()):
                if tombstones <= MAX_TOMBSTONES:
                    break
                if stream.gone:
                    del self._streams[sid]
                    tombstones -= 1
        for session_id, sid in list(self._sessions.items()):
            if sid not in self._streams:
                del self._sessions[session_id]
        return n

    async def link_session(self, session_id: str, stream_id: str, now: float) -> None:
        """See `StreamLog.link_session`."""
        self._sessions[session_id] = stream_id

    async def session_stream(self, session_id: str) -> str | None:
        """See `StreamLog.session_stream`."""
        return self._sessions.get(session_id)

    async def aclose(self) -> None:
        """Nothing to release."""


def _full_message(stream_id: str, room: Room, retention: Retention) -> str:
    if room is Room.STREAM_FULL:
        return (
            f"stream {stream_id!r} outgrew its log's bound of {retention.max_stream_bytes} "
            "bytes (gateway.stream_max_bytes)"
        )
    return (
        f"the stream logs are full ({retention.max_total_bytes} bytes, "
        f"gateway.streams_max_bytes); stream {stream_id!r} cannot be logged"
    )
