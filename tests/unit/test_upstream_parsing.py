"""gateway/upstream.py: the connections of one pool share their parser callbacks
(`_Parsing`); each read still reaches its own connection, however the reads of several
responses interleave, tapped or buffered."""

from __future__ import annotations

import asyncio
import random

import httpx
from hypothesis import given
from hypothesis import strategies as st

from unbroken.gateway.upstream import _Connection, _LeanResponse


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
