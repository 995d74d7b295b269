"""The relayed chunk's fused steps keep what the general steps keep: the memory log's
`append_one` (`PackedEvents.add` spelt out for an event on the template) holds and reads
back what `append_now` does, byte for byte; `LiveSink.feed_one` (`DirectBody.write_event`
spelt out) writes and refuses as `LiveSink.feed` of one event does. (core/attempt.py
`relay_one`'s fused text path: tests/unit/test_attempt.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from tests.support import Wire, streaming_cycle
from unbroken.core.streamlog import Retention
from unbroken.gateway.direct import DirectBody, hold_writes, release_writes
from unbroken.gateway.problems import Scrubber
from unbroken.gateway.relay import HeadSink, LiveSink, StreamRelay
from unbroken.stores.packed import BLOCK_EVENTS, PackedEvents
from unbroken.stores.streamlog import LogFullError, MemoryStreamLog

pytestmark = pytest.mark.anyio


def chunk(text: str, *, id: str = "c1", finish: str | None = None) -> bytes:
    """A DeepSeek text chunk's JSON."""
    return msgspec.json.encode(
        {
            "id": id,
            "object": "chat.completion.chunk",
            "created": 7,
            "model": "deepseek-chat",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": text, "reasoning_content": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
    )


PAYLOADS = [
    chunk("", id="role"),
    *(chunk(f"w{i} ") for i in range(2 * BLOCK_EVENTS + 3)),  # a template, blocks sealed
    chunk("x" * 70_000),  # on the template but past the two-byte lengths: widened
    *(chunk(f"v{i}") for i in range(BLOCK_EVENTS)),  # on the template, four-byte lengths
    b'{"short":1}',  # shorter than the template
    chunk("end", finish="stop"),  # the template's head, not its tail
    chunk("other", id="c2"),  # another head: kept whole
    *(chunk(f"u{i} ", id="c2") for i in range(BLOCK_EVENTS + 5)),  # a second template
    chunk('with "quotes" and \\ escapes', id="c2"),
]


def packed_state(events: PackedEvents) -> tuple[Any, ...]:
    return (
        bytes(events._packed),
        events._lengths.typecode,
        list(events._lengths),
        list(events._ends),
        events._whole,
        events._templates,
        events._head,
        events._tail,
        events._tried,
        events._zdict,
    )


async def test_append_one_keeps_what_append_now_keeps() -> None:
    """Appended one by one on the fused path or through `append_now`, a log holds the same
    packed bytes, lengths, blocks and templates after each event, counts the same, and
    reads back every event as it came."""
    fused, general = MemoryStreamLog(), MemoryStreamLog()
    for log in (fused, general):
        await log.create(
            "s", caller="k", request=b"{}", resumable=True, owner="me", now=1.0, lease_s=60.0
        )
    for i, payload in enumerate(PAYLOADS):
        now = 2.0 + i
        assert fused.append_one("s", 1, payload, now) == i + 1
        assert general.append_now("s", 1, (payload,), now, end=False) == i + 1
        a, b = fused._streams["s"], general._streams["s"]
        assert packed_state(a.events) == packed_state(b.events)
        assert (a.n_events, a.n_bytes, a.updated_at) == (b.n_events, b.n_bytes, b.updated_at)
        assert fused.total_bytes == general.total_bytes
    assert fused._streams["s"].events._lengths.typecode != "H"  # the widened lengths ran
    read = fused.events_now("s", 0, len(PAYLOADS))
    assert read == list(enumerate(PAYLOADS, 1))
    assert read == general.events_now("s", 0, len(PAYLOADS))


async def test_append_one_holds_to_the_retention_the_log_has_now() -> None:
    """`append_one` checks a log's bounds as `append_now` does, also after its retention
    was replaced (it reads them as the log's own copies)."""
    log = MemoryStreamLog(Retention(max_stream_bytes=4096, max_total_bytes=8192))
    await log.create(
        "s", caller="k", request=b"{}", resumable=True, owner="me", now=1.0, lease_s=60.0
    )
    payload = chunk("x" * 1500)
    assert log.append_one("s", 1, payload, 2.0) == 1
    assert log.append_one("s", 1, payload, 2.0) == 2
    with pytest.raises(LogFullError):  # the stream's 4096 bytes
        log.append_one("s", 1, payload, 2.0)
    log.retention = Retention(max_stream_bytes=1 << 20, max_total_bytes=1 << 21)
    assert log.retention.max_stream_bytes == 1 << 20
    assert log.append_one("s", 1, payload, 2.0) == 3
    log.retention = Retention(max_stream_bytes=2048, max_total_bytes=8192)
    with pytest.raises(LogFullError):
        log.append_one("s", 1, payload, 2.0)
    assert log.events_now("s", 0, 3) == [(1, payload), (2, payload), (3, payload)]


def live(sink_type: type[LiveSink] = LiveSink) -> tuple[LiveSink, StreamRelay, Any, Wire]:
    """A sink on a streaming response (its relay, uvicorn's request cycle, the wire)."""
    wire = Wire()
    cycle = streaming_cycle(wire)
    exchange = SimpleNamespace(started=True)  # a `HeadSink`'s response has started
    relay = StreamRelay(exchange, Scrubber([]), keepalive_s=15.0, send_timeout_s=10.0)  # type: ignore[arg-type]  # the sinks read only `started` of it
    cycle.body = DirectBody(cycle)
    return sink_type(relay, cycle.body), relay, cycle, wire


# The cycle's changes, each reported to its body as the protocol reports it
# (gateway/guard.py: the response's end, the connection's loss, a pause of its writes).


def _cut(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    cycle.response_complete = True
    cycle.body.changed()


def _gone(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    cycle.disconnected = True
    cycle.body.changed()


def _paused(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    cycle.flow.write_paused = True
    cycle.body.changed()


def _closing(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    wire.closing = True


def _busy(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    relay._busy = True


def _stopped(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    relay._reason = "stopped"


def _head(*, relay: StreamRelay, cycle: Any, wire: Wire) -> None:
    cycle.scope["method"] = "HEAD"


@pytest.mark.parametrize("sink_type", [LiveSink, HeadSink])
@pytest.mark.parametrize(
    "refuse", [None, _cut, _gone, _paused, _closing, _busy, _stopped, _head], ids=str
)
async def test_feed_one_writes_and_refuses_as_feed_does(
    sink_type: type[LiveSink], refuse: Callable[..., None] | None
) -> None:
    """Events fed one at a time on the fused path and through `feed` reach the client as
    the same bytes (the framing tables' ids and past them, writes held or not), count
    alike, and are refused alike (nothing written) once the response may not be written
    directly: complete, client gone, paused, transport closing, relay busy or stopped."""
    fused, fused_relay, fused_cycle, fused_wire = live(sink_type)
    general, general_relay, general_cycle, general_wire = live(sink_type)
    if refuse is _head:  # read once, at the first write
        refuse(relay=fused_relay, cycle=fused_cycle, wire=fused_wire)
        refuse(relay=general_relay, cycle=general_cycle, wire=general_wire)
    if sink_type is HeadSink:  # live once its first events went out after the start
        assert fused.feed(0, (b"{}",)) == general.feed(0, (b"{}",)) == (refuse is not _head)
    seqs = [1, 2, 3, 4095, 4096, 10_000, 10_001]
    for i, seq in enumerate(seqs):
        payload = chunk(f"t{i}")
        if i == 3 and refuse is not None:
            refuse(relay=fused_relay, cycle=fused_cycle, wire=fused_wire)
            refuse(relay=general_relay, cycle=general_cycle, wire=general_wire)
        held = i % 3 == 1
        if held:
            hold_writes()
        try:
            assert fused.feed_one(seq, payload) == general.feed(seq, (payload,))
            assert fused_wire.writes == general_wire.writes  # held back alike
        finally:
            if held:
                release_writes()
        assert fused_wire.writes == general_wire.writes
        assert fused.last == general.last
        assert fused_relay._n_direct == general_relay._n_direct
        assert fused_relay._wrote == general_relay._wrote
    n_written = len(seqs) if refuse is None else 0 if refuse is _head else 3
    assert len(fused_wire.writes) == n_written + (sink_type is HeadSink and refuse is not _head)


async def test_a_head_sink_before_its_start_feeds_as_feed() -> None:
    """A `HeadSink` whose response has not started takes one event as `feed` does: it
    starts the response (here: refused by the exchange, nothing written)."""
    sink, relay, _, wire = live(HeadSink)
    relay._ex = SimpleNamespace(started=False, start_now=lambda *args: False)  # type: ignore[assignment]  # what `feed` reads of it
    assert not sink.feed_one(1, chunk("a"))
    assert wire.writes == []
    assert asyncio.get_running_loop() is not None
