"""gateway/upstream.py: the connections of one pool share their parser callbacks
(`_Parsing`); each read still reaches its own connection, however the reads of several
responses interleave, tapped or buffered."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import msgspec
from hypothesis import given
from hypothesis import strategies as st

from tests.support import Wire, direct_body
from unbroken.client._engine import _FastLane, _PayloadSink
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Attempt
from unbroken.core.flow import AttemptPlan
from unbroken.core.routes import Route
from unbroken.core.wire import ChatCompletionChunk
from unbroken.gateway.upstream import (
    _AT_FRAME,
    _CUT,
    _MAX_HELD,
    _NEVER,
    _Connection,
    _frame_at,
    _LeanResponse,
    _line_start,
)


def _response(body: bytes, status: int) -> bytes:
    frames = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (body[:3], body[3:]) if part)
    return (
        b"HTTP/1.1 %d OK\r\nContent-Type: text/event-stream\r\nX-Which: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%b0\r\n\r\n" % (status, status, frames)
    )


@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=2, max_size=4),
    st.lists(st.integers(1, 7), min_size=1, max_size=8),
    st.lists(st.booleans(), min_size=4, max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_interleaved_reads_reach_their_own_connection(
    bodies: list[bytes], cuts: list[int], taps: list[bool], seed: int
) -> None:
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    try:
        first = _Connection(loop, ("http", "u", 80), 1 << 20)
        parsing = first.parsing
        conns = [first] + [
            _Connection(loop, ("http", "u", 80), 1 << 20, parsing) for _ in bodies[1:]
        ]
        tapped: dict[int, list[bytes]] = {}
        for i, conn in enumerate(conns):
            conn.begin()
            if taps[i]:
                tapped[i] = []
                assert conn.tap(tapped[i].append, None)
        wires = [_response(body, 200 + i) for i, body in enumerate(bodies)]
        offsets = [0] * len(wires)
        step = 0
        while any(offset < len(wire) for offset, wire in zip(offsets, wires, strict=True)):
            i = rng.randrange(len(wires))
            size = cuts[step % len(cuts)]
            step += 1
            piece = wires[i][offsets[i] : offsets[i] + size]
            offsets[i] += len(piece)
            if piece:
                conns[i].data_received(piece)
        for i, (conn, body) in enumerate(zip(conns, bodies, strict=True)):
            assert conn.error is None
            assert conn.status == 200 + i
            assert conn.complete
            got = b"".join(tapped[i]) if i in tapped else b"".join(conn.body)
            assert got == body
    finally:
        loop.close()


def test_a_body_is_delimited_by_its_length_or_chunks_whatever_the_names_case() -> None:
    """Only Content-Length or a chunked Transfer-Encoding delimit a body (any case); other
    headers, names of the same lengths included, leave it to end with the connection."""
    cases = [
        (b"Content-Length: 2\r\n", True),
        (b"CONTENT-length: 2\r\n", True),
        (b"Transfer-Encoding: chunked\r\n", True),
        (b"transfer-ENCODING: gzip, Chunked\r\n", True),
        (b"Transfer-Encoding: gzip\r\n", False),
        (b"Content-Lengtx: 2\r\nX-Transfer-Encod: chunked\r\n", False),
        (b"", False),
    ]
    loop = asyncio.new_event_loop()
    try:
        for lines, delimited in cases:
            conn = _Connection(loop, ("http", "u", 80), 1 << 20)
            conn.begin()
            conn.data_received(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + lines + b"\r\n")
            assert conn.headers_done
            assert conn.delimited is delimited, lines
    finally:
        loop.close()


def test_a_lean_response_sets_what_httpx_sets_on_a_response() -> None:
    """`_LeanResponse` sets httpx's Response attributes itself (not through httpx's
    `__init__`): every one httpx sets is there, equal to httpx's own but for those it keeps
    its own way (the headers, made when read; its extensions; the shared history)."""
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, ("http", "u", 80), 1 << 20)
        stream = httpx.ByteStream(b"body")
        lean = _LeanResponse(201, b"X-A\0one\0x-b\0two", stream, conn)
        plain = httpx.Response(201, stream=stream)
        names = set(vars(plain))
        assert names - {"headers"} <= set(vars(lean))
        for name in names - {"headers", "extensions", "history"}:
            assert getattr(lean, name) == getattr(plain, name), name
        assert lean.history == []
        assert lean.extensions["network_stream"] is conn
        # `get` answers as Mapping.get does (in one call of its own).
        extensions = lean.extensions
        for key in ("network_stream", "http_version", "other"):
            assert extensions.get(key, "-") == dict(extensions).get(key, "-"), key
        assert extensions.get("other") is None
        assert lean.headers.raw == [(b"X-A", b"one"), (b"x-b", b"two")]
        assert lean.read() == b"body"
        assert lean.is_success
    finally:
        loop.close()


class _Took:
    """A chunk sink (`sink` and `one`) that takes every chunk and keeps its text."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.n_bytes = 0  # of the chunks taken as their upstream bytes (`one`)

    def __call__(self, payload: bytes) -> bool:
        self.texts.append(msgspec.json.decode(payload)["choices"][0]["delta"]["content"])
        self.n_bytes += 1
        return True

    def sink(self, chunks: list[ChatCompletionChunk], payloads: list[bytes] | None) -> bool:
        for chunk in chunks:
            delta = chunk.choices[0].delta
            assert delta is not None
            self.texts.append(delta.content or "")
        return True


def _chunk_event(text: str) -> bytes:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def _tapped_lane(loop: asyncio.AbstractEventLoop) -> tuple[_Connection, _FastLane, _Took]:
    """A connection whose response head was read, tapped by an SDK fast lane (a real one,
    on a real attempt) whose `one` keeps what it takes."""
    conn = _Connection(loop, ("http", "u", 80), 1 << 20)
    conn.begin()
    conn.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    attempt = Attempt(
        AttemptPlan(route=Route("r", "http://u"), body={}), ChunkAccumulator(), now=0.0
    )
    took = _Took()
    # (A connection is tappable: `_FastLane.open` checks it at run time.)
    tappable: Any = conn
    lane = _FastLane(tappable, attempt, _PayloadSink(took.sink, took))
    assert conn.tap(lane, None)
    return conn, lane, took


@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=12),
    st.lists(st.integers(1, 400), min_size=1, max_size=8),
    st.booleans(),
)
def test_a_lane_takes_the_same_chunks_however_the_frames_are_cut(
    per_frame: list[int], cuts: list[int], upper: bool
) -> None:
    """Read by read, frames cut by the connection (whole frames) or by the parser (the
    rest: a frame's part, the body's end, a frame after a part) reach the lane as the
    events they hold, in order; the body ends whole."""
    loop = asyncio.new_event_loop()
    try:
        conn, lane, took = _tapped_lane(loop)
        events: list[bytes] = []
        wire = b""
        for n in per_frame:
            frame = b"".join(_chunk_event(f"w{len(events) + i} ") for i in range(n))
            events.extend(_chunk_event(f"w{len(events) + i} ") for i in range(n))
            size_line = b"%X\r\n" % len(frame) if upper else b"%x\r\n" % len(frame)
            wire += size_line + frame + b"\r\n"
        wire += b"7\r\ndata: [\r\n7\r\nDONE]\n\n\r\n0\r\n\r\n"
        at = step = 0
        while at < len(wire):
            size = cuts[step % len(cuts)]
            step += 1
            conn.data_received(wire[at : at + size])
            at += size
        assert lane.error is None
        assert conn.error is None
        assert conn.complete
        assert took.texts == [f"w{i} " for i in range(len(events))]
        assert lane.taken() == []
        assert lane._attempt.decoder.done
    finally:
        loop.close()


def test_frames_are_cut_without_the_parser_only_between_two_of_a_plain_chunked_body() -> None:
    """The connection cuts reads into frames itself while the parser stands between two
    frames of a plain chunked body, a frame's part and a size line cut short included:
    the next read goes on from there. A chunk extension, the last frame or a body
    delimited otherwise go to the parser."""
    loop = asyncio.new_event_loop()
    try:
        conn, lane, took = _tapped_lane(loop)
        one, two = _chunk_event("a"), _chunk_event("b")
        assert conn.framing == _AT_FRAME
        conn.data_received(b"%x\r\n%b\r\n" % (len(one), one))
        assert conn.framing == _AT_FRAME
        frame = b"%x\r\n%b\r\n" % (len(two), two)
        conn.data_received(frame[:9])
        assert conn.framing == _CUT  # the connection keeps the frame's start
        assert (conn._line, conn._left) == (frame[:9], len(frame) - 9)
        conn.data_received(frame[9:-1])
        assert (conn.framing, conn._line, conn._left) == (_CUT, frame[:-1], 1)  # its LF
        assert took.texts == ["a"]  # handed on whole, once it is
        conn.data_received(frame[-1:])
        assert (conn.framing, conn._line, conn._left) == (_AT_FRAME, b"", 0)
        # A size line cut short: kept until the rest of it comes.
        conn.data_received(frame[:1])
        assert (conn.framing, conn._line) == (_CUT, frame[:1])
        conn.data_received(frame[1:3])
        assert (conn.framing, conn._line) == (_CUT, frame[:3])
        conn.data_received(frame[3:])
        assert (conn.framing, conn._line, conn._left) == (_AT_FRAME, b"", 0)
        # A chunk extension: the parser's (it drops it).
        conn.data_received(b"%x;x=1\r\n%b\r\n" % (len(one), one))
        assert conn.framing == _AT_FRAME
        assert took.texts == ["a", "b", "b", "a"]
        # Each relayed as its upstream bytes (whole), those that came in parts too.
        assert took.n_bytes == 4
        conn.data_received(b"0\r\n\r\n")
        assert conn.complete
        assert conn.framing == _NEVER
        assert lane.taken() == []
        # Delimited by its length, or by a coding besides chunked: the parser's alone.
        for head in (b"Content-Length: 3\r\n", b"Transfer-Encoding: gzip, chunked\r\n"):
            other = _Connection(loop, ("http", "u", 80), 1 << 20)
            other.begin()
            other.data_received(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")
            assert other.framing == _NEVER
    finally:
        loop.close()


class _CountingParser:
    """An httptools parser that counts the bytes fed to it (the parser is not ours)."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.fed = b""

    def feed_data(self, data: bytes) -> None:
        self.fed += data
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


def _wire(texts: list[list[str]], extension: set[int], padded: set[int]) -> bytes:
    """A chunked body of frames of the events of `texts`, frame `i` with a chunk
    extension if `i` is in `extension`, its size zero-padded (past the digits cut here)
    if in `padded`; then the `[DONE]` event, split across two frames, and the last frame."""
    wire = b""
    for i, frame_texts in enumerate(texts):
        frame = b"".join(_chunk_event(t) for t in frame_texts)
        size = b"%x" % len(frame)
        if i in padded:
            size = b"0" * 8 + size
        if i in extension:
            size += b";x=1"
        wire += size + b"\r\n" + frame + b"\r\n"
    return wire + b"7\r\ndata: [\r\n7\r\nDONE]\n\n\r\n0\r\n\r\n"


def _read_in(wire: bytes, cuts: list[int]) -> tuple[_Took, _Connection, _FastLane, bytes]:
    """Feed `wire` to a tapped lane's connection in reads ending at `cuts`: the chunks
    taken, the connection, its lane and what its parser was fed of the body."""
    loop = asyncio.new_event_loop()
    try:
        conn, lane, took = _tapped_lane(loop)
        counting = _CountingParser(conn.parser)
        conn.parser = counting
        at = 0
        for cut in [*cuts, len(wire)]:
            if cut > at:
                conn.data_received(wire[at:cut])
                at = cut
        return took, conn, lane, counting.fed
    finally:
        loop.close()


def test_every_cut_of_an_answer_reaches_the_lane_whole_without_the_parser() -> None:
    """An answer of three frames (one of two events) read in two reads, cut anywhere, or
    in three, cut at any two places near where a frame's parts meet (a size line's
    digits, its CRLF, the body, the body's CRLF): the lane takes every event in order,
    the body ends whole, and the parser is fed the last frames alone (every frame's part,
    a size line's part included, is cut here)."""
    texts = [["x0 "], ["x1 ", "x2 "], ["x3 "]]
    wire = _wire(texts, set(), set())
    want = [t for frame in texts for t in frame]
    done = wire.index(b"7\r\ndata: [")
    seams = {0}
    at = 0
    while at < done:
        line_end = wire.index(b"\r\n", at) + 2
        size = int(wire[at : line_end - 2], 16)
        seams.update((at + 1, line_end - 1, line_end, line_end + size, line_end + size + 2))
        at = line_end + size + 2
    near = sorted({p + d for p in seams for d in (-1, 0, 1) if 0 <= p + d <= done})
    cut_ups = [[first] for first in range(len(wire) + 1)]
    cut_ups += [[first, second] for first in near for second in near if first < second]
    for cuts in cut_ups:
        took, conn, lane, fed = _read_in(wire, cuts)
        assert took.texts == want, cuts
        assert took.n_bytes == len(want), cuts  # each event whole: its upstream bytes
        assert conn.complete
        assert conn.error is None
        assert lane.error is None
        assert lane._attempt.decoder.done
        # The parser takes the `[DONE]` frames and the last one, some of them perhaps cut
        # here already (a read with the frame before's end): fed from a frame's start.
        assert wire.endswith(fed), cuts
        assert len(fed) <= len(wire) - done, cuts
        assert fed.endswith(b"0\r\n\r\n"), cuts


@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=8),
    st.lists(st.integers(1, 300), min_size=1, max_size=8),
    st.sets(st.integers(0, 7)),
    st.sets(st.integers(0, 7)),
)
def test_cut_frames_and_the_parsers_frames_mix_in_any_reads(
    per_frame: list[int], cuts: list[int], extension: set[int], padded: set[int]
) -> None:
    """Frames cut here and frames the parser must take (a chunk extension, a size past the
    digits cut here) mix in reads cut anywhere: the lane takes the same events in order
    and the body ends whole, the parser fed no byte of a frame cut here."""
    texts = [[f"w{f}.{i} " for i in range(n)] for f, n in enumerate(per_frame)]
    wire = _wire(texts, extension, padded)
    ends = []
    at = step = 0
    while at < len(wire):
        at += cuts[step % len(cuts)]
        step += 1
        ends.append(at)
    took, conn, lane, fed = _read_in(wire, ends)
    assert took.texts == [t for frame in texts for t in frame]
    assert conn.complete
    assert conn.error is None
    assert lane.error is None
    assert lane._attempt.decoder.done
    if not extension & set(range(len(texts))) and not padded & set(range(len(texts))):
        assert b'"w' not in fed  # (each event's text starts so)


def test_a_frame_too_large_to_keep_whole_is_the_parsers_across_reads() -> None:
    """A frame past `_MAX_HELD` that a read ends inside of is not kept whole here: the
    parser takes it from its start and hands it on in parts; the frames after it are cut
    here again once a read starts between two."""
    texts = [["a "], ["b" * (_MAX_HELD + 10)], ["c "], ["d "]]
    wire = _wire(texts, set(), set())
    second = wire.index(b"\r\n", wire.index(b"a ")) + 2
    third = wire.index(b'"c ')
    took, conn, lane, fed = _read_in(wire, list(range(second + 10, third - 100, 4096)))
    assert took.texts == ["a ", "b" * (_MAX_HELD + 10), "c ", "d "]
    assert conn.complete
    assert lane.error is None
    assert fed.startswith(wire[second : second + 10])  # the large frame's start on
    assert wire.endswith(fed)


def test_a_frame_whose_data_is_not_followed_by_crlf_fails_the_response() -> None:
    """A frame cut here whose body is not followed by CRLF: the response fails as a
    malformed one (as the parser fails it), that frame and nothing after it taken."""
    loop = asyncio.new_event_loop()
    try:
        conn, _lane, took = _tapped_lane(loop)
        one = _chunk_event("a")
        frame = b"%x\r\n%b\r\n" % (len(one), one)
        conn.data_received(frame + frame[:5])
        conn.data_received(frame[5:-2] + b"xx" + frame)
        assert isinstance(conn.error, httpx.RemoteProtocolError)
        assert "CRLF" in str(conn.error)
        assert conn.framing == _NEVER
        assert took.texts == ["a"]
    finally:
        loop.close()


def test_a_tap_stopped_inside_a_cut_frame_gets_the_rest_of_it_buffered() -> None:
    """The tap stops inside a frame cut here: that frame is buffered whole for the reader
    (as the parser buffers an untapped body), and the frames after it are the parser's."""
    loop = asyncio.new_event_loop()
    try:
        conn, lane, _took = _tapped_lane(loop)
        one, two = _chunk_event("a"), _chunk_event("b")
        frame = b"%x\r\n%b\r\n" % (len(one), one)
        conn.data_received(frame[:20])
        assert conn.framing == _CUT
        lane.untap()
        conn.data_received(frame[20:] + b"%x\r\n%b\r\n0\r\n\r\n" % (len(two), two))
        assert conn.complete
        assert conn.error is None
        assert conn.take() == one + two
    finally:
        loop.close()


def test_a_frame_cut_size_line_and_large_sizes_are_the_parsers() -> None:
    """`_frame_at` finds no frame in a size line cut short, one of no hex digits, an
    empty (last) frame or a size past its digits' limit; it finds one in the rest."""
    assert _frame_at(b"1a\r\nxyz", 0, 7) == (4, 26)
    assert _frame_at(b"__1A\r\n", 2, 6) == (6, 26)
    assert _frame_at(b"1a\r", 0, 3) == (-1, 0)
    assert _frame_at(b"1a", 0, 2) == (-1, 0)
    assert _frame_at(b"\r\n", 0, 2) == (-1, 0)
    assert _frame_at(b"0\r\n\r\n", 0, 5) == (-1, 0)
    assert _frame_at(b"g\r\n", 0, 3) == (-1, 0)
    assert _frame_at(b"fffffff\r\n", 0, 9) == (9, 0xFFFFFFF)
    assert _frame_at(b"10000000\r\n", 0, 10) == (-1, 0)
    # The start of a size line a frame would be found in once whole.
    assert _line_start(b"1a", 0, 2)
    assert _line_start(b"__1A\r", 2, 5)
    assert _line_start(b"fffffff", 0, 7)
    assert not _line_start(b"", 0, 0)
    assert not _line_start(b"00", 0, 2)  # perhaps the last frame's
    assert not _line_start(b"1;", 0, 2)
    assert not _line_start(b"1a\r\n", 0, 4)  # whole: `_frame_at`'s
    assert not _line_start(b"10000000", 0, 8)


def test_a_lanes_events_of_one_read_reach_the_client_in_one_write() -> None:
    """Through a fast lane, a read of one event is written at once; the events of a read
    of several frames, or of one frame of several events, reach the client in one write."""
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, ("http", "u", 80), 1 << 20)
        conn.begin()
        conn.data_received(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        wire = Wire()
        body = direct_body(wire)
        seqs = iter(range(1, 100))

        def one(payload: bytes) -> bool:
            return body.write_event(next(seqs), payload)

        attempt = Attempt(
            AttemptPlan(route=Route("r", "http://u"), body={}), ChunkAccumulator(), now=0.0
        )
        tappable: Any = conn
        lane = _FastLane(tappable, attempt, _PayloadSink(lambda chunks, payloads: False, one))
        assert conn.tap(lane, None)
        events = [_chunk_event(f"w{i}") for i in range(7)]
        conn.data_received(b"%x\r\n%b\r\n" % (len(events[0]), events[0]))
        conn.data_received(b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events[1:3]))
        several = b"".join(events[3:6])
        conn.data_received(b"%x\r\n%b\r\n" % (len(several), several))
        conn.data_received(b"%x\r\n%b\r\n" % (len(events[6]), events[6]))
        assert lane.taken() == []
        framed = [b"id: %d\ndata: %b\n\n" % (i, e[6:-2]) for i, e in enumerate(events, 1)]
        chunks = [b"%x\r\n%b\r\n" % (len(f), f) for f in framed]
        assert wire.writes == [
            chunks[0],
            b"".join(chunks[1:3]),
            b"".join(chunks[3:6]),
            chunks[6],
        ]
    finally:
        loop.close()
