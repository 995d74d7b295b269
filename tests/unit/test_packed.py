"""stores.packed: a log's events come back exactly as appended, from any block."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from unbroken.stores.packed import BLOCK_EVENTS, PackedEvents


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
    packed = PackedEvents()
    for payload in model:
        packed.add(payload)
    if data.draw(st.booleans()):
        packed.seal()
    if model:
        first = data.draw(st.integers(1, len(model)))
        last = data.draw(st.integers(first, len(model)))
        assert packed.get(first, last) == model[first - 1 : last]
    assert len(packed) == len(model)
