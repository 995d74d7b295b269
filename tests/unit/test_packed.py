"""stores.packed: a log's events come back exactly as appended, from any block."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from tests.support import DecodedSource
from unbroken.stores.packed import BLOCK_EVENTS, PackedEvents, TemplateSource, _template


def _chunk(i: int, text: bytes) -> bytes:
    return (
        b'{"id":"0af341a7","object":"chat.completion.chunk","created":1796435975,'
        b'"model":"deepseek-chat","choices":[{"index":0,"delta":{"content":"%b"},'
        b'"logprobs":null,"finish_reason":null}],"usage":null,"n":%d}' % (text, i)
    )


def test_every_range_reads_back_what_was_appended() -> None:
    """Events appended one by one and in lists, read in every range, open and sealed."""
    rng = random.Random(3)
    packed = PackedEvents()
    model: list[bytes] = []
    while len(model) < 5 * BLOCK_EVENTS + 3:
        batch = [_chunk(len(model) + i, b"x" * rng.randrange(0, 9)) for i in range(3)]
        if rng.random() < 0.5:
            packed.extend(batch)
        else:
            for payload in batch:
                packed.add(payload)
        model += batch
    for sealed in (False, True):
        if sealed:
            packed.seal()
        assert len(packed) == len(model)
        for first in range(1, len(model) + 1):
            for last in range(first, len(model) + 1):
                assert packed.get(first, last) == model[first - 1 : last]
        assert [packed.length(seq) for seq in range(1, len(model) + 1)] == list(map(len, model))


def test_events_past_64_kib_keep_their_length() -> None:
    """Lengths are kept in two bytes until an event needs more; then all are widened."""
    packed = PackedEvents()
    model = [b"a" * 10, b"b" * 70_000, b"c" * 65_535, b"d"]
    for payload in model[:2]:
        packed.add(payload)
    packed.extend(model[2:])
    assert [packed.length(seq) for seq in range(1, 5)] == [10, 70_000, 65_535, 1]
    assert packed.get(1, 4) == model
    packed.seal()
    assert packed.get(2, 3) == model[1:3]


def test_blocks_are_compressed() -> None:
    """Chunks of one answer repeat their head: sealed, they take a fraction of their bytes."""
    packed = PackedEvents()
    model = [_chunk(i, b"word%d" % i) for i in range(10 * BLOCK_EVENTS)]
    for payload in model:
        packed.add(payload)
    assert len(packed._packed) < sum(map(len, model)) // 8
    assert packed.get(1, len(model)) == model


def test_a_block_of_middles_and_whole_events_is_deflated_as_kept() -> None:
    """An answer's first block (its role chunk and first text chunk whole, the rest kept as
    middles) is deflated as kept, not as its events rebuilt: fewer bytes (and ~16x fewer
    to compress), and it reads back the same, sealed and with the log sealed."""
    model = _answer([b"word%d" % i for i in range(2 * BLOCK_EVENTS)])
    packed = PackedEvents()
    packed.extend(model[:BLOCK_EVENTS])
    assert packed._ends[0] & 15 == 0  # deflated
    assert packed.get(1, BLOCK_EVENTS) == model[:BLOCK_EVENTS]
    # The same events, rebuilt and deflated as one block (as a block of whole events is).
    rebuilt = PackedEvents()
    rebuilt._zdict = packed._zdict
    rebuilt._whole = (1 << BLOCK_EVENTS) - 1
    rebuilt._lengths.extend(map(len, model[:BLOCK_EVENTS]))
    rebuilt._packed += b"".join(model[:BLOCK_EVENTS])
    rebuilt._seal()
    assert packed._ends[0] >> 4 < rebuilt._ends[0] >> 4
    packed.extend(model[BLOCK_EVENTS:])
    packed.seal()
    assert packed.get(1, len(model)) == model
    _read_all_ranges(packed, model)


def _round_trip(model: list[bytes], data: st.DataObject) -> PackedEvents:
    """`model` added (sealed or not, as drawn) reads back the same over a drawn range."""
    packed = PackedEvents()
    for payload in model:
        packed.add(payload)
    if data.draw(st.booleans()):
        packed.seal()
    if model:
        first = data.draw(st.integers(1, len(model)))
        last = data.draw(st.integers(first, len(model)))
        assert packed.get(first, last) == model[first - 1 : last]
    return packed


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.builds(_chunk, st.integers(0, 3), st.binary(max_size=5)),
            st.sampled_from([b'{"a":"', b'","b"}', b'{"a":"","b"}', b'{"a":"x","b"}']),
        ),
        max_size=80,
    ),
    st.data(),
)
def test_any_bytes_round_trip(model: list[bytes], data: st.DataObject) -> None:
    """Whatever the bytes (empty events, binary, no shared head), they read back as added."""
    packed = _round_trip(model, data)
    assert len(packed) == len(model)


def _answer(texts: list[bytes], key: bytes = b"content") -> list[bytes]:
    """A streamed answer's events: a role chunk, a chunk per text, a finish, the final
    event and [DONE]."""
    head = (
        b'{"id":"0af341a7","object":"chat.completion.chunk","created":1796435975,'
        b'"model":"deepseek-chat","system_fingerprint":"fp_1","choices":[{"index":0,'
    )
    tail = b'"},"logprobs":null,"finish_reason":null}],"usage":null}'
    return [
        head + b'"delta":{"role":"assistant","content":""},"logprobs":null}]}',
        *(head + b'"delta":{"' + key + b'":"' + text + tail for text in texts),
        head + b'"delta":{},"logprobs":null,"finish_reason":"stop"}]}',
        b'{"id":"0af341a7","choices":[],"unbroken":{"stream_id":"strm_1"}}',
        b"[DONE]",
    ]


def _read_all_ranges(packed: PackedEvents, model: list[bytes]) -> None:
    assert len(packed) == len(model)
    for first in range(1, len(model) + 1, 3):
        for last in range(first, len(model) + 1, 5):
            assert packed.get(first, last) == model[first - 1 : last]
    assert packed.get(1, len(model)) == model


def test_text_chunks_are_kept_as_their_text() -> None:
    """A text answer's chunks differ only in their text: the open block and the sealed
    blocks between the first and the last hold the text only (no zlib), and every range
    reads back byte for byte, open and sealed, escapes and quotes in the text included."""
    texts = [b"word%d" % i if i % 7 else b'a \\"quoted\\" \\\\ %d\\n' % i for i in range(150)]
    model = _answer(texts)
    packed = PackedEvents()
    for payload in model[:-3]:
        packed.add(payload)
    open_block = len(packed._packed) - (packed._ends[-1] >> 4)
    assert open_block < 12 * BLOCK_EVENTS  # middles, not ~250-byte events
    _read_all_ranges(packed, model[:-3])
    packed.extend(model[-3:])
    packed.seal()
    _read_all_ranges(packed, model)
    kinds = [end & 15 for end in packed._ends]
    assert kinds[0] == 0
    assert kinds[-1] == 0
    assert kinds.count(1) >= len(kinds) - 3  # the text's: kept as their middles
    assert len(packed._packed) < sum(map(len, texts)) + 600  # ~the text, and two deflates


def test_a_template_never_covers_an_event_shorter_than_head_and_tail() -> None:
    """An event that starts with the head and ends with the tail, where the two overlap in
    it, is kept whole: it has no middle."""
    model = _answer([b"one", b"two", b"three"])
    packed = PackedEvents()
    packed.extend(model[:4])
    head, tail = packed._head, packed._tail
    assert head.endswith(b'"content":"')
    assert tail.startswith(b'"},')
    overlapping = head + tail[1:]  # the head's closing quote is the tail's opening one
    assert overlapping.startswith(head)
    assert overlapping.endswith(tail)
    packed.add(overlapping)
    packed.add(model[4])
    assert packed.get(5, 6) == [overlapping, model[4]]
    packed.seal()
    assert packed.get(1, 6) == [*model[:4], overlapping, model[4]]


def test_a_new_kind_of_chunk_gets_its_own_template() -> None:
    """Reasoning, then content (another key): each run of blocks keeps its own template,
    and the blocks of both read back."""
    reasoning = _answer([b"think%d" % i for i in range(40)], b"reasoning_content")
    content = _answer([b"say%d" % i for i in range(40)])
    model = [*reasoning[:-3], *content[1:]]
    packed = PackedEvents()
    packed.extend(model)
    packed.seal()
    assert len(packed._templates) == 4
    assert {end & 15 for end in packed._ends} == {0, 1, 2}
    _read_all_ranges(packed, model)


def test_templates_are_bounded() -> None:
    """A log whose chunks change shape every few blocks stops learning templates at the
    limit; the rest is deflated and reads back."""
    model: list[bytes] = [b"first"]
    for shape in range(20):
        key = b"key%02d" % shape
        model += [
            b'{"id":"0af341a7-0af341a7-0af341a7","' + key + b'":"t%d","end":"xxxxxxxxxxxx"}' % i
            for i in range(3 * BLOCK_EVENTS)
        ]
    packed = PackedEvents()
    packed.extend(model)
    packed.seal()
    assert len(packed._templates) == 2 * 15
    _read_all_ranges(packed, model)
    # Shapes that never fill a block of their own: each learned template replaces the
    # last one, which no block names.
    model = [model[0]] + [e for e in model[1:] if b'"t4' not in e and b'"t3' not in e]
    packed = PackedEvents()
    packed.extend(model)
    assert packed._templates[0].endswith(b'"key19":"')
    assert len(packed._templates) == 2
    assert all(end & 15 == 0 for end in packed._ends)
    _read_all_ranges(packed, model)


def test_a_template_ends_at_the_closing_quote() -> None:
    """The tail starts at the text's closing quote, not at an escaped quote in the text;
    the head ends where the text starts; too little in common is no template."""
    head = b'{"id":"0123456789abcdef0123456789","a":"'
    assert _template(head + b'p\\"' + b'"}', head + b'q\\"' + b'"}') == (head, b'"}')
    assert _template(head + b"pp" + b'"}', head + b"pq" + b'"}') == (head, b'"}')
    assert _template(b'{"a":"x"}', b'{"a":"y"}') is None


_PIECES = st.sampled_from([b'{"a":"', b'","b":"', b'"}', b"x", b"\\", b'"', b":", b"0" * 20])


@given(
    st.lists(
        st.one_of(
            st.builds(b"".join, st.lists(_PIECES, max_size=12)),
            st.builds(_chunk, st.integers(0, 3), st.binary(max_size=5)),
            st.builds(lambda t: _answer([t])[1], st.sampled_from([b"", b"a", b'\\"', b'"', b"}"])),
        ),
        max_size=80,
    ),
    st.data(),
)
def test_templated_events_round_trip(model: list[bytes], data: st.DataObject) -> None:
    """Events that share heads and tails in every way (quotes, backslashes, overlaps, empty
    middles) read back as added, open and sealed."""
    packed = _round_trip(model, data)
    if model:
        assert packed.get(1, len(model)) == model


def _source_of(packed: PackedEvents) -> TemplateSource | None:
    return packed.source  # read through a call: not the type the test assigned


def test_a_learned_template_is_the_sources_bytes_when_they_are_equal() -> None:
    """The log of a relayed answer keeps the decoder's template objects, not equal copies
    (~300 bytes per live stream), and reads back the same; a source whose template differs
    (another answer's) is not taken; a sealed log no longer holds its source."""
    model = _answer([b"word%d" % i for i in range(40)])
    source = DecodedSource()
    packed = PackedEvents()
    packed.source = source
    for payload in model[:-3]:
        source.feed(payload)
        packed.add(payload)
    shared = source.text_template()
    assert shared is not None
    assert packed._head is shared[0]
    assert packed._tail is shared[1]
    packed.extend(model[-3:])
    packed.seal()
    assert _source_of(packed) is None
    _read_all_ranges(packed, model)

    other = DecodedSource()
    for payload in _answer([b"x"], key=b"reasoning_content")[:2]:
        other.feed(payload)
    reasoning = other.text_template()
    assert reasoning is not None
    packed = PackedEvents()
    packed.source = other
    packed.extend(model)
    packed.seal()
    assert (packed._head, packed._tail) != reasoning  # its own: the content chunks'
    assert packed._head.endswith(b'"content":"')
    _read_all_ranges(packed, model)


def _template_by_search(prev: bytes, cur: bytes) -> tuple[bytes, bytes] | None:
    """`_template` as it was first written (binary searches of `startswith`/`endswith`):
    the reference the faster version must agree with."""
    limit = min(len(prev), len(cur))
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if cur.startswith(prev[:mid]):
            lo = mid
        else:
            hi = mid - 1
    value = cur.rfind(b':"', 0, lo)
    head = value + 2 if value >= 0 else cur.rfind(b'"', 0, lo) + 1
    lo, hi = 0, limit - head
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if cur.endswith(prev[len(prev) - mid :]):
            lo = mid
        else:
            hi = mid - 1
    quote = cur.find(b'"', len(cur) - lo)
    while quote > 0 and cur[quote - 1] == 0x5C:
        quote = cur.find(b'"', quote + 1)
    tail = len(cur) - quote if quote >= 0 else 0
    if head + tail < 32:
        return None
    return cur[:head], cur[len(cur) - tail :]


_CHUNKISH = st.lists(st.sampled_from([b'"', b':"', b"\\", b"a", b"\x00", b"\xff", b"}"]))


@given(
    st.binary(max_size=40) | _CHUNKISH.map(b"".join),
    st.binary(max_size=8) | _CHUNKISH.map(b"".join),
    st.binary(max_size=8) | _CHUNKISH.map(b"".join),
    st.binary(max_size=40) | _CHUNKISH.map(b"".join),
)
def test_template_finds_what_the_searches_found(
    head: bytes, one: bytes, two: bytes, tail: bytes
) -> None:
    prev, cur = head + one + tail, head + two + tail
    assert _template(prev, cur) == _template_by_search(prev, cur)
    assert _template(cur, prev) == _template_by_search(cur, prev)
    assert _template(prev, prev + tail) == _template_by_search(prev, prev + tail)
