"""gateway/upstream.py: the connections of one pool share their parser callbacks
(`_Parsing`); each read still reaches its own connection, however the reads of several
responses interleave, tapped or buffered."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given
from hypothesis import strategies as st

from unbroken.gateway.upstream import _Connection, _Parsing


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
        parsing = _Parsing()
        conns = [_Connection(loop, ("http", "u", 80), 1 << 20, parsing) for _ in bodies]
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
