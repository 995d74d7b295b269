"""core.streamlog: ids, leases with epoch fencing, retention, reconnect verdicts, digests."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.streamlog import (
    Lease,
    Retention,
    Room,
    StreamInfo,
    Verdict,
    acquire_lease,
    answer_digest,
    check_stream_id,
    judge_reconnect,
    new_stream_id,
    parse_event_id,
    release_lease,
    renew_lease,
    should_abandon,
)
from unbroken.errors import ConfigError, InvalidRequestError


def test_stream_ids_are_checked() -> None:
    """A new id passes the check; other strings and short entropy are refused."""
    sid = new_stream_id(bytes(range(16)))
    assert sid == "strm_000102030405060708090a0b0c0d0e0f"
    assert check_stream_id(sid) == sid
    for bad in ("", "strm_", "strm_XYZ", sid + "0", "../etc"):
        with pytest.raises(InvalidRequestError, match="malformed stream id"):
            check_stream_id(bad)
    with pytest.raises(ValueError, match="16 bytes"):
        new_stream_id(b"short")


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 0), ("", 0), ("  ", 0), ("0", 0), ("17", 17), (" 42 ", 42)]
)
def test_event_ids_parse(raw: str | None, expected: int) -> None:
    """Missing or blank ids mean 'from the start'; decimal ids parse."""
    assert parse_event_id(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "1.5", "abc", "9" * 19, "1 2"])
def test_bad_event_ids_are_refused(raw: str) -> None:
    """Anything but a decimal sequence number is a clear error."""
    with pytest.raises(InvalidRequestError, match="malformed event id"):
        parse_event_id(raw)


def test_lease_lifecycle_and_fencing() -> None:
    """Acquire, renew, expire, take over with a new epoch; the old owner is fenced."""
    a = acquire_lease(None, "A", 0.0, 3.0)
    assert a == Lease("A", 1, 3.0)
    assert a.is_live(2.9)
    assert not a.is_live(3.0)
    assert acquire_lease(a, "B", 1.0, 3.0) is None  # live, another owner
    renewed = renew_lease(a, "A", 1, 2.0, 3.0)
    assert renewed == Lease("A", 1, 5.0)
    b = acquire_lease(renewed, "B", 5.0, 3.0)  # expired: B takes it
    assert b == Lease("B", 2, 8.0)
    assert renew_lease(b, "A", 1, 6.0, 3.0) is None  # A is fenced
    assert renew_lease(b, "A", 2, 6.0, 3.0) is None  # the epoch is B's, not A's
    assert renew_lease(None, "A", 1, 6.0, 3.0) is None
    assert release_lease(b, "A", 1) == b  # not A's to release
    assert release_lease(None, "A", 1) is None
    released = release_lease(b, "B", 2)
    assert released == Lease("B", 2, 0.0)
    assert acquire_lease(released, "C", 6.0, 3.0) == Lease("C", 3, 9.0)
    assert acquire_lease(b, "B", 6.0, 3.0) == Lease("B", 3, 9.0)  # same owner: new epoch


@given(st.lists(st.tuples(st.sampled_from("ABC"), st.floats(0, 100)), max_size=30))
def test_epochs_only_grow(steps: list[tuple[str, float]]) -> None:
    """Whatever the order of acquisitions, epochs never repeat or go down."""
    current: Lease | None = None
    seen: list[int] = []
    now = 0.0
    for owner, dt in steps:
        now += dt
        new = acquire_lease(current, owner, now, 3.0)
        if new is not None:
            assert not seen or new.epoch == seen[-1] + 1
            seen.append(new.epoch)
            current = new


def test_retention_room_and_validation() -> None:
    """Appends fit per stream and in total; bad bounds are config errors."""
    r = Retention(ttl_s=10, max_stream_bytes=2048, max_total_bytes=4096)
    assert r.room(0, 0, 2048) is Room.OK
    assert r.room(1, 0, 2048) is Room.STREAM_FULL
    assert r.room(0, 3000, 2000) is Room.TOTAL_FULL
    with pytest.raises(ConfigError, match="stream_ttl_s"):
        Retention(ttl_s=0)
    with pytest.raises(ConfigError, match="stream_ttl_s"):
        Retention(tombstone_s=-1)
    with pytest.raises(ConfigError, match="stream_max_bytes"):
        Retention(max_stream_bytes=10)
    with pytest.raises(ConfigError, match="streams_max_bytes"):
        Retention(max_stream_bytes=4096, max_total_bytes=2048)


def info(**changes: object) -> StreamInfo:
    base: dict[str, object] = {
        "id": "strm_" + "0" * 32,
        "caller": "k1",
        "created_at": 0.0,
        "updated_at": 5.0,
        "n_events": 4,
        "n_bytes": 100,
        "ended": False,
        "ended_at": None,
        "lease": Lease("A", 1, 10.0),
    }
    base.update(changes)
    return StreamInfo(**base)  # type: ignore[arg-type]  # test data


def test_expiry_counts_from_the_end_or_the_last_write() -> None:
    """Ended logs expire ttl after the end; unfinished ones ttl after the last write, but
    never while a writer holds a live lease."""
    r = Retention(ttl_s=10)
    assert info(ended=True, ended_at=20.0).expires_at(r) == 30.0
    assert info().expires_at(r) == 15.0
    assert not info().is_expired(r, 9.0)  # lease live until 10
    assert info().is_expired(r, 15.0)
    assert not info(lease=None).is_expired(r, 14.0)
    assert info(ended=True, ended_at=1.0).is_expired(r, 11.0)  # lease still live at 10


@pytest.mark.parametrize(
    ("changes", "caller", "after", "now", "verdict"),
    [
        ({}, "k2", 0, 1.0, Verdict.FORBIDDEN),
        ({"ended": True, "ended_at": 2.0}, "k1", 0, 700.0, Verdict.EXPIRED),
        ({}, "k1", 5, 1.0, Verdict.BAD_CURSOR),
        ({}, "k1", 4, 1.0, Verdict.REPLAY),
        ({}, "k1", 2, 11.0, Verdict.TAKEOVER),
        ({"lease": None}, "k1", 2, 11.0, Verdict.TAKEOVER),
        ({"ended": True, "ended_at": 9.0, "lease": None}, "k1", 2, 11.0, Verdict.REPLAY),
    ],
)
def test_reconnect_verdicts(
    changes: dict[str, object], caller: str, after: int, now: float, verdict: Verdict
) -> None:
    """Forbidden before expired before a bad cursor; a dead writer means takeover."""
    assert judge_reconnect(info(**changes), caller, after, Retention(), now) is verdict


@pytest.mark.parametrize(
    ("resumable", "readers", "reader_at", "detached_at", "now", "abandon"),
    [
        (False, 1, 0.0, 1.0, 2.0, False),  # a reader is attached
        (False, 0, 0.0, None, 2.0, False),  # never detached
        (False, 0, 0.0, 1.0, 1.0, True),  # no opt-in: at once
        (True, 0, 0.0, 1.0, 30.0, False),  # within the grace
        (True, 0, 0.0, 1.0, 31.0, True),
        (True, 0, 20.0, 1.0, 31.0, False),  # a reader elsewhere renewed the grace
    ],
)
def test_abandoning_a_detached_answer(
    resumable: bool,
    readers: int,
    reader_at: float,
    detached_at: float | None,
    now: float,
    abandon: bool,
) -> None:
    """The upstream is cancelled at once without the opt-in, after the grace with it."""
    assert (
        should_abandon(
            resumable=resumable,
            n_local_readers=readers,
            reader_at=reader_at,
            detached_at=detached_at,
            grace_s=30.0,
            now=now,
        )
        is abandon
    )


def test_answer_digest_is_sha256_of_utf8() -> None:
    """Content and reasoning are hashed separately, as UTF-8."""
    digest = answer_digest("héllo 🚀", "")
    assert digest.content_sha256 == hashlib.sha256("héllo 🚀".encode()).hexdigest()
    assert digest.reasoning_sha256 == hashlib.sha256(b"").hexdigest()
    # Either text empty or not, in either place.
    swapped = answer_digest("", "héllo 🚀")
    assert swapped.content_sha256 == digest.reasoning_sha256
    assert swapped.reasoning_sha256 == digest.content_sha256
