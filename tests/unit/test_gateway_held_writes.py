"""An upstream read that brings several events reaches each live client in one write
(gateway/upstream.py `_Connection.data_received` holds the direct writes, gateway/direct.py
`hold_writes`/`release_writes`); a read of one event is written at once; the framing and
the order are those of one write per event."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import Wire, direct_body
from unbroken.gateway.direct import hold_writes, release_writes
from unbroken.gateway.upstream import _Connection

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


client = direct_body  # a DirectBody on a streaming response to the wire


def frame(event: bytes) -> bytes:
    """`event` as one chunked frame of the upstream's body."""
    return b"%x\r\n%b\r\n" % (len(event), event)


def expected(seq: int, event: bytes) -> bytes:
    """What a client gets for event `seq` whose upstream event is `event`."""
    data = event.removeprefix(b"data: ").removesuffix(b"\n\n")
    body = b"id: %d\ndata: %b\n\n" % (seq, data)
    return b"%x\r\n%b\r\n" % (len(body), body)


EVENTS = [b'data: {"n":%d,"text":"token %d"}\n\n' % (i, i) for i in range(1, 6)]


@pytest.fixture
def upstream() -> Iterator[tuple[_Connection, list[Wire]]]:
    """An upstream connection past its response head, tapped by a relay that writes each
    event to two clients (as two live readers of one answer)."""
    loop = asyncio.new_event_loop()
    conn = _Connection(loop, ("http", "upstream", 80), 1 << 20)
    conn.connection_made(Wire())  # type: ignore[arg-type]  # a stand-in stream transport
    conn.begin()
    conn.data_received(HEAD)
    assert conn.headers_done
    wires = [Wire(), Wire()]
    bodies = [client(wire) for wire in wires]
    seqs = iter(range(1, 100))
    partial = [b""]  # an event's bytes so far (a frame may span reads)

    def relay(data: bytes) -> None:
        *events, partial[0] = (partial[0] + data).split(b"\n\n")
        for event in events:
            seq = next(seqs)
            for body in bodies:
                assert body.write_event(seq, event.removeprefix(b"data: "))

    assert conn.tap(relay, None)
    yield conn, wires
    loop.close()


def test_a_read_of_one_event_is_written_at_once(upstream: tuple[_Connection, Any]) -> None:
    conn, wires = upstream
    conn.data_received(frame(EVENTS[0]))
    conn.data_received(frame(EVENTS[1]))
    for wire in wires:
        assert wire.writes == [expected(1, EVENTS[0]), expected(2, EVENTS[1])]


def _three_then_one(wires: list[Wire]) -> None:
    """Each client got events 1-3 in one write, then event 4 in another."""
    for wire in wires:
        assert wire.writes == [
            b"".join(expected(i, e) for i, e in enumerate(EVENTS[:3], 1)),
            expected(4, EVENTS[3]),
        ]


def test_a_read_of_several_events_is_one_write_per_client(
    upstream: tuple[_Connection, Any],
) -> None:
    conn, wires = upstream
    conn.data_received(b"".join(frame(e) for e in EVENTS[:3]))
    conn.data_received(frame(EVENTS[3]))
    _three_then_one(wires)


def test_a_frame_of_several_events_is_one_write_per_client(
    upstream: tuple[_Connection, Any],
) -> None:
    conn, wires = upstream
    conn.data_received(frame(b"".join(EVENTS[:3])))
    for wire in wires:
        assert wire.writes == [b"".join(expected(i, e) for i, e in enumerate(EVENTS[:3], 1))]


def test_a_read_ending_in_part_of_a_frame_writes_its_whole_events(
    upstream: tuple[_Connection, Any],
) -> None:
    conn, wires = upstream
    rest = frame(EVENTS[2])
    conn.data_received(frame(EVENTS[0]) + frame(EVENTS[1]) + rest[:7])
    conn.data_received(rest[7:])
    for wire in wires:
        assert wire.writes == [
            expected(1, EVENTS[0]) + expected(2, EVENTS[1]),
            expected(3, EVENTS[2]),
        ]


def test_held_writes_are_written_when_the_read_turns_out_malformed(
    upstream: tuple[_Connection, Any],
) -> None:
    """The events before a framing error still reach the clients, and the next writes are
    not held any more."""
    conn, wires = upstream
    conn.data_received(frame(EVENTS[0]) + frame(EVENTS[1]) + b"zz\r\nnot a chunk\r\n")
    assert conn.error is not None
    for wire in wires:
        assert wire.writes == [expected(1, EVENTS[0]) + expected(2, EVENTS[1])]
    wire = Wire()
    assert client(wire).write_event(7, b"{}")
    assert wire.writes == [expected(7, b"data: {}\n\n")]


def test_a_client_closed_while_held_gets_nothing_more() -> None:
    open_wire, closed_wire = Wire(), Wire()
    bodies = [client(open_wire), client(closed_wire)]
    hold_writes()
    try:
        for body in bodies:
            assert body.write(b"one")
            assert body.write(b"two")
        assert open_wire.writes == closed_wire.writes == []
        closed_wire.closing = True
    finally:
        release_writes()
    assert open_wire.writes == [b"3\r\none\r\n3\r\ntwo\r\n"]
    assert closed_wire.writes == []


def test_a_hold_is_the_holding_threads_only() -> None:
    """Another thread's event loop (an embedded gateway, a test's) writes at once while
    this one holds, and holds and releases its own writes without touching these."""
    here, there = Wire(), Wire()
    mine, theirs = client(here), client(there)
    seen: list[list[bytes]] = []

    def other_thread() -> None:
        assert theirs.write(b"now")
        seen.append(list(there.writes))
        hold_writes()
        try:
            assert theirs.write(b"a")
            assert theirs.write(b"b")
            seen.append(list(there.writes))
        finally:
            release_writes()

    hold_writes()
    try:
        assert mine.write(b"one")
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert mine.write(b"two")
        assert here.writes == []
    finally:
        release_writes()
    assert seen == [[b"3\r\nnow\r\n"], [b"3\r\nnow\r\n"]]
    assert there.writes == [b"3\r\nnow\r\n", b"1\r\na\r\n1\r\nb\r\n"]
    assert here.writes == [b"3\r\none\r\n3\r\ntwo\r\n"]


@pytest.fixture
def untapped() -> Iterator[tuple[_Connection, list[Wire], Any, asyncio.AbstractEventLoop]]:
    """An upstream connection past its response head, not tapped yet, and a relay (as the
    `upstream` fixture's) to tap it with."""
    loop = asyncio.new_event_loop()
    conn = _Connection(loop, ("http", "upstream", 80), 1 << 20)
    conn.connection_made(Wire())  # type: ignore[arg-type]  # a stand-in stream transport
    conn.begin()
    conn.data_received(HEAD)
    wires = [Wire(), Wire()]
    bodies = [client(wire) for wire in wires]
    seqs = iter(range(1, 100))

    def relay(data: bytes) -> None:
        for event in data.split(b"\n\n")[:-1]:
            seq = next(seqs)
            for body in bodies:
                assert body.write_event(seq, event.removeprefix(b"data: "))

    yield conn, wires, relay, loop
    loop.close()


def test_events_buffered_before_the_tap_are_one_write_per_client(untapped: Any) -> None:
    """The first events often arrive with the response's head, before the reader taps:
    tapping relays them at once, in one write per client, not one per event."""
    conn, wires, relay, _loop = untapped
    conn.data_received(b"".join(frame(e) for e in EVENTS[:3]))
    assert conn.body
    assert not wires[0].writes
    assert conn.tap(relay, None)
    assert not conn.body
    conn.data_received(frame(EVENTS[3]))
    _three_then_one(wires)


def test_a_complete_response_buffered_before_the_tap_is_relayed_and_its_waiter_woken(
    untapped: Any,
) -> None:
    conn, wires, relay, loop = untapped
    conn.data_received(b"".join(frame(e) for e in EVENTS[:2]) + b"0\r\n\r\n")
    assert conn.complete
    waiter = loop.create_future()
    assert conn.tap(relay, waiter)
    assert waiter.done()
    for wire in wires:
        assert wire.writes == [expected(1, EVENTS[0]) + expected(2, EVENTS[1])]
    # Ended, nothing buffered: nothing to tap (the reader sees the end).
    assert not conn.tap(relay, loop.create_future())


def test_a_failed_response_is_not_tapped_and_its_bytes_are_the_readers(untapped: Any) -> None:
    conn, wires, relay, _loop = untapped
    conn.data_received(frame(EVENTS[0]))
    conn.connection_lost(None)
    assert not conn.tap(relay, None)
    assert conn.body  # read before the error, as ever
    assert wires[0].writes == []


@pytest.mark.parametrize("seq", [1, 9, 10, 99, 100, 999, 1000, 4095, 4096, 4097, 123_456])
@pytest.mark.parametrize("size", [0, 1, 300, 4060, 4070, 4095, 4200])
def test_an_event_is_framed_as_one_chunk_of_its_id_and_data(seq: int, size: int) -> None:
    """Each id and size, on either side of the framing's tables (gateway/direct.py): one
    chunk whose size line counts the event's bytes, `id: <seq>`, `data: ` and the payload."""
    payload = bytes(48 + i % 64 for i in range(size))
    wire = Wire()
    assert client(wire).write_event(seq, payload)
    [written] = wire.writes
    size_line, _, rest = written.partition(b"\r\n")
    event = b"id: " + str(seq).encode() + b"\ndata: " + payload + b"\n\n"
    assert rest == event + b"\r\n"
    assert int(size_line, 16) == len(event)
