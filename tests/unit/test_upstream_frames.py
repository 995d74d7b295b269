"""gateway/upstream.py: a tapped body's reads of whole chunked frames are read by the
connection itself (`_Connection._frames`), not by httptools; every other read is
httptools'. Either way the tap gets what httptools' `on_body` gives, read by read."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.gateway.upstream import _Connection

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Bodies:
    """httptools' own reading of a response: its `on_body` calls, read by read."""

    def __init__(self) -> None:
        self.reads: list[list[bytes]] = []
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self.reads.append([])
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.reads[-1].append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Refusing:
    """A parser fed nothing (the reads it is given are read without it)."""

    def feed_data(self, data: bytes) -> None:
        raise AssertionError(f"fed {data!r}")


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _tapped(loop: asyncio.AbstractEventLoop) -> tuple[_Connection, list[list[bytes]]]:
    """A connection whose response head came, its body tapped: the tap's calls per read."""
    conn = _Connection(loop, ("http", "u", 80), 1 << 20)
    conn.begin()
    conn.data_received(HEAD)
    reads: list[list[bytes]] = []
    assert conn.tap(lambda body: reads[-1].append(body), None)
    return conn, reads


def _feed(conn: _Connection, reads: list[list[bytes]], data: bytes) -> None:
    reads.append([])
    conn.data_received(data)


def _frame(body: bytes, size: bytes | None = None) -> bytes:
    return (size or b"%x" % len(body)) + b"\r\n" + body + b"\r\n"


_BODIES = st.binary(min_size=1, max_size=40) | st.sampled_from(
    [b"\r\n", b"0\r\n\r\n", b"data: x\n\n", b"1a\r\n", b"\r\n\r\n" * 3]
)


@given(
    st.lists(_BODIES, min_size=1, max_size=8),
    st.lists(st.integers(1, 60) | st.just(0), min_size=1, max_size=8),
    st.booleans(),
)
def test_any_reads_give_the_tap_what_httptools_gives(
    bodies: list[bytes], cuts: list[int], upper: bool
) -> None:
    """Reads cut anywhere (0: at the next frame's end): the tap's calls, read by read, are
    httptools' `on_body` calls; the response completes."""
    loop = asyncio.new_event_loop()
    try:
        conn, reads = _tapped(loop)
        reference = _Bodies()
        reference.parser.feed_data(HEAD)
        frames = [_frame(b, (b"%X" if upper else b"%x") % len(b)) for b in bodies]
        wire = b"".join(frames) + b"0\r\n\r\n"
        ends = [sum(map(len, frames[: i + 1])) for i in range(len(frames))]
        at = step = 0
        while at < len(wire):
            cut = cuts[step % len(cuts)]
            step += 1
            stop = (
                min((end for end in ends if end > at), default=len(wire)) if not cut else at + cut
            )
            piece = wire[at:stop]
            at += len(piece)
            _feed(conn, reads, piece)
            reference.feed(piece)
        assert conn.error is None
        assert conn.complete
        assert reference.complete
        assert reads == reference.reads
        assert b"".join(b"".join(r) for r in reads) == b"".join(bodies)
    finally:
        loop.close()


def test_reads_of_whole_frames_are_not_parsed_by_httptools(
    loop: asyncio.AbstractEventLoop,
) -> None:
    conn, reads = _tapped(loop)
    _feed(conn, reads, _frame(b"data: a\n\n"))  # httptools' (after the head's read)
    parser = conn.parser
    conn.parser = _Refusing()
    _feed(conn, reads, _frame(b"data: b\n\n"))
    _feed(conn, reads, _frame(b"data: c\n\n") + _frame(b"x" * 300, b"12C"))
    assert reads[1:] == [[b"data: b\n\n"], [b"data: c\n\n", b"x" * 300]]
    conn.parser = parser
    _feed(conn, reads, b"0\r\n\r\n")  # the body's end is httptools'
    assert conn.complete
    assert conn.error is None


@pytest.mark.parametrize(
    "data",
    [
        _frame(b"abc", b"3;ext=1"),  # an extension
        _frame(b"abc", b"00000003"),  # more size digits than read here
        _frame(b"abc") + b"1",  # part of the next size line
        _frame(b"abc") + b"0\r\n\r\n",  # the body's end
        b"3\r\nab",  # part of a frame
    ],
)
def test_other_reads_are_parsed_by_httptools(loop: asyncio.AbstractEventLoop, data: bytes) -> None:
    """Reads that are not whole frames alone go to httptools, which then knows where the
    next frame starts: the reads after them are read as httptools reads them."""
    conn, reads = _tapped(loop)
    reference = _Bodies()
    reference.parser.feed_data(HEAD)
    for piece in (_frame(b"a"), data, b"c\r\n" if data.endswith(b"ab") else b"", _frame(b"d")):
        if piece and not conn.complete:
            _feed(conn, reads, piece)
            reference.feed(piece)
    assert conn.error is None
    assert reads == reference.reads


def test_a_malformed_frame_fails_the_response(loop: asyncio.AbstractEventLoop) -> None:
    """A frame with no CRLF after its body is httptools' to read: it hands the body on,
    then fails."""
    conn, reads = _tapped(loop)
    transport = _Transport()
    conn.transport = transport  # type: ignore[assignment]
    _feed(conn, reads, _frame(b"a"))
    _feed(conn, reads, b"3\r\nabcX\r\n")  # no CRLF after the body
    assert conn.error is not None
    assert transport.aborted
    assert reads[-1] == [b"abc"]


def test_a_tap_that_raises_fails_the_response(loop: asyncio.AbstractEventLoop) -> None:
    """As httptools fails a callback that raises: the response's error, the connection
    aborted, the read's later frames not handed on."""
    conn = _Connection(loop, ("http", "u", 80), 1 << 20)
    conn.begin()
    conn.data_received(HEAD)
    transport = _Transport()
    conn.transport = transport  # type: ignore[assignment]
    got: list[bytes] = []

    def tap(body: bytes) -> None:
        got.append(body)
        if len(got) == 2:
            raise ValueError("no")

    assert conn.tap(tap, None)
    conn.data_received(_frame(b"a"))
    conn.data_received(_frame(b"b") + _frame(b"c"))
    assert got == [b"a", b"b"]
    assert "malformed HTTP response" in str(conn.error)
    assert transport.aborted


def test_frames_after_the_tap_stops_are_buffered(loop: asyncio.AbstractEventLoop) -> None:
    """A tap stopped while a read's frames are handed on: the rest are buffered for the
    reader, as httptools' `on_body` buffers them."""
    conn = _Connection(loop, ("http", "u", 80), 1 << 20)
    conn.begin()
    conn.data_received(HEAD)
    got: list[bytes] = []

    def tap(body: bytes) -> None:
        got.append(body)
        if len(got) == 2:
            conn.tap(None, None)

    assert conn.tap(tap, None)
    conn.data_received(_frame(b"a"))
    conn.data_received(_frame(b"b") + _frame(b"c") + _frame(b"d"))
    assert got == [b"a", b"b"]
    assert conn.body == [b"c", b"d"]
