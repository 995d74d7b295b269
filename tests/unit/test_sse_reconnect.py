"""A decoder that goes on over a new connection drops the unfinished event and keeps the
last event id (WHATWG SSE: reestablishing the connection)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from unbroken.core import ChatStreamDecoder, SSEDecoder
from unbroken.core.events import SSEEvent

EVENTS = [f'id: {i}\ndata: {{"n": {i}}}\n\n'.encode() for i in range(1, 6)]


@given(st.integers(1, len(b"".join(EVENTS)) - 1))
def test_any_cut_then_replay_after_the_last_id_gives_every_event_once(cut: int) -> None:
    """Cut the stream at any byte, reconnect, replay after the last id: each event once."""
    whole = b"".join(EVENTS)
    decoder = SSEDecoder()
    got = [i for i in decoder.feed(whole[:cut]) if isinstance(i, SSEEvent)]
    last = int(decoder.last_event_id or 0)
    decoder.reconnected()
    assert decoder.last_event_id == (str(last) if last else "")
    got += [i for i in decoder.feed(b"".join(EVENTS[last:])) if isinstance(i, SSEEvent)]
    assert [e.data for e in got] == [f'{{"n": {i}}}' for i in range(1, 6)]
    assert decoder.last_event_id == "5"


def test_chat_decoder_exposes_the_last_id_and_reconnects() -> None:
    """ChatStreamDecoder passes the last id through and drops a cut event on reconnect."""
    decoder = ChatStreamDecoder()
    chunk = b'id: 7\ndata: {"id":"a","choices":[]}\n\n'
    assert len(decoder.feed(chunk + b'id: 8\ndata: {"id":"b","cho')) == 1
    assert decoder.last_event_id == "7"
    decoder.reconnected()
    again = decoder.feed(b'\xef\xbb\xbfid: 8\ndata: {"id":"b","choices":[]}\n\n')
    assert [c.id for c in again] == ["b"]
    assert decoder.last_event_id == "8"
