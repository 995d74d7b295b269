"""Values of the stream log: stream ids, event ids, writer leases with epochs, retention
bounds, reconnect verdicts and answer digests; pure.

Imports the standard library, `unbroken.errors` and nothing else: entropy and time come in
as arguments, and the log backends (`stores/streamlog.py`, `stores/redis_streamlog.py`) are
the only code that touches memory or Redis.

Theory of operation
-------------------
Every streamed answer has a stream id and a log: events 1..n, each one SSE payload (a
chunk's JSON, the final `unbroken` event, an error, or `[DONE]`). Event ids are the decimal
sequence numbers, opaque to clients and strictly increasing within a stream.

One writer at a time appends, the holder of the stream's *lease*. States of a lease:

    (none) --acquire--> held(owner, epoch=1, expires_at)
    held   --renew (same owner and epoch)--> held(expires_at moved on)
    held   --release (same owner and epoch)--> released(owner, epoch, expires_at=0)
    held   --now >= expires_at--> expired (still epoch e)
    expired | released --acquire (anyone)--> held(new owner, epoch e+1)
    held (live) --acquire by another owner--> refused (None)

Invariant (fencing): an append names the epoch it was granted; the log accepts it only if
that is still the current epoch, so a writer whose lease was taken (a new epoch) can never
append again, even if it wakes up from a long pause and does not know it lost the lease.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, replace

from unbroken.core.records import quick_init
from unbroken.errors import ConfigError, InvalidRequestError

__all__ = [
    "STREAM_ID_PREFIX",
    "AnswerDigest",
    "Lease",
    "Renewal",
    "Retention",
    "Room",
    "StreamInfo",
    "Verdict",
    "acquire_lease",
    "answer_digest",
    "check_stream_id",
    "judge_reconnect",
    "new_stream_id",
    "parse_event_id",
    "release_lease",
    "renew_lease",
    "should_abandon",
]

# Stream ids look like "strm_" + 32 hex digits (128 bits of entropy: unguessable, so an id
# in a URL is not a way into someone else's answer even before the key check).
STREAM_ID_PREFIX = "strm_"
_STREAM_ID = re.compile(r"strm_[0-9a-f]{32}")
# Event ids are decimal sequence numbers; 18 digits fit in a signed 64-bit integer (Redis).
_EVENT_ID = re.compile(r"[0-9]{1,18}")


def new_stream_id(entropy: bytes) -> str:
    """A stream id from 16 bytes of entropy (`os.urandom(16)` in the shell).

    Raises:
        ValueError: `entropy` is not 16 bytes long.
    """
    if len(entropy) != 16:
        raise ValueError(f"a stream id needs 16 bytes of entropy, got {len(entropy)}")
    return STREAM_ID_PREFIX + entropy.hex()


def check_stream_id(raw: str) -> str:
    """`raw` if it is a well-formed stream id.

    Raises:
        InvalidRequestError: it is not one (the message shows the expected form).
    """
    if not _STREAM_ID.fullmatch(raw):
        raise InvalidRequestError(
            f"malformed stream id {raw[:60]!r}; expected 'strm_' and 32 hex digits"
        )
    return raw


def parse_event_id(raw: str | None) -> int:
    """The sequence number a reconnect resumes after: 0 (from the start) for None or "".

    Raises:
        InvalidRequestError: `raw` is not an event id of this gateway.
    """
    if raw is None:
        return 0
    text = raw.strip()
    if not text:
        return 0
    if not _EVENT_ID.fullmatch(text):
        raise InvalidRequestError(
            f"malformed event id {text[:40]!r}; send the last `id:` received (Last-Event-ID "
            "or ?after=)"
        )
    return int(text)


# -- leases ----------------------------------------------------------------------------------


@quick_init  # made per answer (its log's lease): ~3x faster to make
@dataclass(frozen=True, slots=True)
class Lease:
    """Who may append to a stream's log, and until when.

    Attributes:
        owner: the writer (a gateway instance id).
        epoch: increases on every acquisition; appends carry it (fencing).
        expires_at: the lease is free from this time on (0 once released).
    """

    owner: str
    epoch: int
    expires_at: float

    def is_live(self, now: float) -> bool:
        """True while nobody else may take the lease."""
        return now < self.expires_at


def acquire_lease(current: Lease | None, owner: str, now: float, ttl_s: float) -> Lease | None:
    """The lease `owner` gets, or None when another owner holds a live one.

    A new lease always has a new epoch (also for the same owner), so whatever wrote under
    the old epoch is fenced off.
    """
    if current is not None and current.is_live(now) and current.owner != owner:
        return None
    epoch = current.epoch + 1 if current is not None else 1
    return Lease(owner, epoch, now + ttl_s)


def renew_lease(
    current: Lease | None, owner: str, epoch: int, now: float, ttl_s: float
) -> Lease | None:
    """The renewed lease, or None when `owner` no longer holds epoch `epoch` (fenced).

    An expired lease that nobody took yet is renewed: no one else wrote in between.
    """
    if current is None or current.epoch != epoch or current.owner != owner:
        return None
    return replace(current, expires_at=now + ttl_s)


def release_lease(current: Lease | None, owner: str, epoch: int) -> Lease | None:
    """The lease after `owner` gives up epoch `epoch` (anyone may take it at once); the
    current lease unchanged when `owner` does not hold it."""
    if current is None or current.epoch != epoch or current.owner != owner:
        return current
    return replace(current, expires_at=0.0)


# -- retention -------------------------------------------------------------------------------


class Room(enum.Enum):
    """Whether an append fits the retention bounds."""

    OK = "ok"
    STREAM_FULL = "stream_full"
    TOTAL_FULL = "total_full"


@dataclass(frozen=True, slots=True)
class Retention:
    """How long and how much of the logs is kept.

    Attributes:
        ttl_s: a log is kept this long after its answer ended (or after its last write,
            for an answer nobody finished).
        max_stream_bytes: the most payload bytes one stream's log holds.
        max_total_bytes: the most payload bytes all logs of a store hold.
        tombstone_s: how long an expired stream is still known (so it reads as 410 Gone,
            not 404).
    """

    ttl_s: float = 600.0
    max_stream_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    tombstone_s: float = 86400.0

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.tombstone_s < 0:
            raise ConfigError(
                f"stream_ttl_s must be > 0 (got {self.ttl_s}) and the tombstone time >= 0"
            )
        if self.max_stream_bytes < 1024 or self.max_total_bytes < self.max_stream_bytes:
            raise ConfigError(
                "stream_max_bytes must be >= 1024 and streams_max_bytes >= stream_max_bytes "
                f"(got {self.max_stream_bytes} and {self.max_total_bytes})"
            )

    def room(self, stream_bytes: int, total_bytes: int, size: int) -> Room:
        """Whether `size` more bytes fit a stream holding `stream_bytes` in a store holding
        `total_bytes`."""
        if stream_bytes + size > self.max_stream_bytes:
            return Room.STREAM_FULL
        if total_bytes + size > self.max_total_bytes:
            return Room.TOTAL_FULL
        return Room.OK


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a writer learns when it renews its lease: whether a `DELETE` asked it to stop,
    and when a reader last said it follows the stream (Unix seconds; 0 for never)."""

    stop_requested: bool
    reader_at: float


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a backend knows about one stream (events aside).

    Attributes:
        id: the stream id.
        caller: the id of the key that asked for the answer (readers must match).
        created_at: when the stream was created (Unix seconds).
        updated_at: the last append.
        n_events: events in the log.
        n_bytes: payload bytes in the log.
        ended: the log holds its last event.
        ended_at: when it ended, else None.
        lease: the writer's lease, if any.
        stop_requested: a `DELETE` asked the writer to stop.
        reader_at: the last time a reader said it follows the stream.
        resumable: the answer keeps generating without a reader (within the grace time).
    """

    id: str
    caller: str
    created_at: float
    updated_at: float
    n_events: int
    n_bytes: int
    ended: bool
    ended_at: float | None
    lease: Lease | None
    stop_requested: bool = False
    reader_at: float = 0.0
    resumable: bool = False

    def expires_at(self, retention: Retention) -> float:
        """When the log stops being readable (a live lease keeps it readable)."""
        if self.ended_at is not None:
            return self.ended_at + retention.ttl_s
        return self.updated_at + retention.ttl_s

    def is_expired(self, retention: Retention, now: float) -> bool:
        """True once the log is past its retention (an unfinished answer whose writer
        still holds a live lease never is)."""
        if not self.ended and self.lease is not None and self.lease.is_live(now):
            return False
        return now >= self.expires_at(retention)


class Verdict(enum.Enum):
    """What to do with a reconnect (`judge_reconnect`)."""

    REPLAY = "replay"  # replay after the cursor, then follow the live writer
    TAKEOVER = "takeover"  # the writer is gone: take the lease and finish the answer
    EXPIRED = "expired"  # 410
    FORBIDDEN = "forbidden"  # 403: the stream of another key
    BAD_CURSOR = "bad_cursor"  # 400: an event id this stream never had


def judge_reconnect(
    info: StreamInfo, caller: str, after: int, retention: Retention, now: float
) -> Verdict:
    """The verdict for `caller` reading `info`'s stream after event `after`."""
    if info.caller != caller:
        return Verdict.FORBIDDEN
    if info.is_expired(retention, now):
        return Verdict.EXPIRED
    if after > info.n_events:
        return Verdict.BAD_CURSOR
    if not info.ended and (info.lease is None or not info.lease.is_live(now)):
        return Verdict.TAKEOVER
    return Verdict.REPLAY


def should_abandon(
    *,
    resumable: bool,
    n_local_readers: int,
    reader_at: float,
    detached_at: float | None,
    grace_s: float,
    now: float,
) -> bool:
    """True when a writer with no reader left should cancel its upstream.

    Without the opt-in (`resumable`), the answer stops as soon as its readers are gone
    (`detached_at` set). With it, the writer waits `grace_s` after the last sign of a
    reader, here (`detached_at`) or on another instance (`reader_at`).
    """
    if n_local_readers > 0 or detached_at is None:
        return False
    if not resumable:
        return True
    return now - max(detached_at, reader_at) >= grace_s


# -- digests ---------------------------------------------------------------------------------


@quick_init  # made per answer
@dataclass(frozen=True, slots=True)
class AnswerDigest:
    """SHA-256 (hex) of an answer's UTF-8 text, content and reasoning separately, so a
    client can prove it holds the same bytes as the log."""

    content_sha256: str
    reasoning_sha256: str


# The digest of an empty text (most answers have no reasoning): not hashed per answer.
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest() if text else _EMPTY_SHA256


def answer_digest(content: str, reasoning: str) -> AnswerDigest:
    """The digests of `content` and `reasoning` (UTF-8)."""
    return AnswerDigest(_sha256(content), _sha256(reasoning))
