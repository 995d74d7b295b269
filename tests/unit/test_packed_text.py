"""stores/packed.py `PackedEvents.text` and core.wire `template_text`: a choice's text read
from a log's packed events (a block of middles in one decode) is what decoding every event
gives (core.wire `chunk_text`)."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import text_payload
from unbroken.core.accumulator import join_text
from unbroken.core.wire import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    chunk_text,
    template_text,
)
from unbroken.stores.packed import BLOCK_EVENTS, PackedEvents

_payload = text_payload


ROLE = msgspec.json.encode(
    ChatCompletionChunk(id="x", choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
)


def _log(payloads: list[bytes]) -> PackedEvents:
    events = PackedEvents()
    events.extend(payloads)
    return events


def _same(events: PackedEvents, payloads: list[bytes], first: int, last: int) -> None:
    for index, reasoning in ((0, False), (0, True), (1, False)):
        got = join_text(events.text(first, last, index, reasoning))
        want = join_text(chunk_text(payloads[first - 1 : last], index, reasoning))
        assert got == want, (first, last, index, reasoning)


def test_blocks_of_text_are_read_whole() -> None:
    """Every range of a log of plain text, escaped text (newlines, quotes, backslashes at a
    middle's end) and a role chunk: the text of every event, decoded."""
    texts = [f" tok{i}" for i in range(70)]
    texts[20] = "line\n"
    texts[40] = 'a "quote"'
    texts[50] = "ends with \\"
    texts[51] = "n after it"
    payloads = [ROLE, *(_payload(t) for t in texts)]
    events = _log(payloads)
    n = len(payloads)
    for first, last in ((1, n), (2, n), (1, BLOCK_EVENTS), (BLOCK_EVENTS + 1, 2 * BLOCK_EVENTS)):
        _same(events, payloads, first, last)
    for first in range(1, n + 1, 5):
        _same(events, payloads, first, min(n, first + 23))
    assert join_text(events.text(1, n, 0, False)) == "".join(texts)
    events.seal()
    _same(events, payloads, 1, n)


def test_another_field_or_choice_reads_nothing() -> None:
    payloads = [ROLE, *(_payload(f"r{i}", reasoning=True) for i in range(40))]
    events = _log(payloads)
    assert events.text(1, 40, 0, False) == []
    assert "".join(events.text(1, 41, 0, True)) == "".join(f"r{i}" for i in range(40))
    assert "".join(events.text(1, 41, 1, True)) == ""


def test_long_middles_and_surrogates() -> None:
    """Deflated blocks (long middles), escaped emoji halves and non-ASCII text."""
    texts = ["a fairly long piece of text, longer than a token " * 2 for _ in range(20)]
    texts += ["\u00e9t\u00e9", "HIGH", "LOW", "done"]
    # The halves escaped one per chunk, as some servers send an emoji.
    payloads = [ROLE]
    for text in texts:
        payload = _payload(text).replace(b"HIGH", b"\\ud83d").replace(b"LOW", b"\\ude80")
        payloads.append(payload)
    events = _log(payloads)
    _same(events, payloads, 1, len(payloads))
    text = join_text(events.text(1, len(payloads), 0, False))
    assert text.endswith("\u00e9t\u00e9\U0001f680done")


def test_template_text() -> None:
    head, tail = _payload("").split(b'"content":"')
    head += b'"content":"'
    assert template_text(head, tail, b"a b", 0, False) == "a b"
    assert template_text(head, tail, b"a\\nb", 0, False) == "a\nb"
    assert template_text(head, tail, b"\\ud83d\\ude80", 0, False) == "\U0001f680"
    assert template_text(head, tail, b"\\ud83d", 0, False) == "\ud83d"
    assert template_text(head, tail, b'a\\"b', 0, False) == 'a"b'  # an escaped quote
    assert template_text(head, tail, b'a\\\\\\"b', 0, False) == 'a\\"b'
    # A quote not escaped: the values are not all a string's contents (decode each).
    assert template_text(head, tail, b'a\\\\"b', 0, False) is None  # after `\\`
    assert template_text(head, tail, b'a","role":"b', 0, False) is None
    assert template_text(head, tail, b"ab", 1, False) == ""  # another choice's text
    assert template_text(head, tail, b"ab", 0, True) == ""
    assert template_text(b'{"choices":[', b"]}", b"x", 0, False) is None  # not a string value
    around = b'{"choices":[{"delta":{"content":"a'  # text before the value's own
    assert template_text(around, tail, b"b", 0, False) is None
    assert template_text(head, tail, b"\xff", 0, False) is None  # not UTF-8
    assert template_text(head, tail, b"\\x", 0, False) is None  # not a JSON string


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 1),
            st.booleans(),
            st.text(alphabet=st.sampled_from('ab \n"\\\u00e9\U0001f680'), max_size=6),
        ),
        min_size=1,
        max_size=60,
    ),
    st.data(),
)
def test_any_log_reads_as_decoded(parts: list[tuple[int, bool, str]], data: st.DataObject) -> None:
    payloads = [ROLE, *(_payload(t, index=i, reasoning=r) for i, r, t in parts)]
    events = _log(payloads)
    first = data.draw(st.integers(1, len(payloads)))
    last = data.draw(st.integers(first, len(payloads)))
    _same(events, payloads, first, last)
    events.seal()  # the open block deflated too
    _same(events, payloads, first, last)


def test_a_deflated_block_of_middles_reads_as_decoded() -> None:
    """A deflated block holding whole events and middles (an answer's first and last
    blocks): its runs of middles, middles with a quote or a backslash, whole events and
    another choice's chunks between them read as decoding every event gives, in any range."""
    texts = [f" tok{i}" for i in range(BLOCK_EVENTS - 1)]
    texts[4] = 'a "quote"'
    texts[7] = "ends with \\"
    texts[8] = "\u00e9 after it"
    payloads = [ROLE, *(_payload(t) for t in texts)]
    payloads[11] = _payload("other", index=1)
    payloads[13] = _payload("thought", reasoning=True)
    events = _log(payloads)
    assert len(events._ends) == 1
    assert events._ends[0] & 15 == 0  # deflated, with middles in it
    n = len(payloads)
    for first in range(1, n + 1):
        for last in range(first, n + 1):
            _same(events, payloads, first, last)
    assert join_text(events.text(1, n, 0, False)) == join_text(chunk_text(payloads, 0, False))


def test_a_deflated_block_reads_escapes_in_its_runs_and_odd_ends_alone() -> None:
    """In a deflated block, middles holding escapes (an escaped quote, an escaped backslash
    at the end) are read with the run around them; one ending in an odd run of backslashes
    (it would escape the next middle's first byte) is decoded as its event. In any range,
    the text is what decoding every event gives."""
    texts = [f" tok{i}" for i in range(BLOCK_EVENTS - 1)]
    texts[2] = 'say "resume"'
    texts[5] = "ends with \\\\"
    payloads = [ROLE, *(_payload(t) for t in texts)]
    # On the template, its middle `x\\\` (an odd run: it escapes the tail's quote).
    payloads[9] = _payload("QQQ").replace(b"QQQ", b"x\\\\\\")
    events = _log(payloads)
    assert events._ends[0] & 15 == 0  # deflated, with middles in it
    n = len(payloads)
    for first in range(1, n + 1):
        for last in range(first, n + 1):
            _same(events, payloads, first, last)


def test_escaped_quotes_and_backslashes_are_read_whole() -> None:
    """A block whose middles hold escaped quotes, and one ending in an escaped backslash
    (`\\\\`, an even run), is read in one decode; one ending in a backslash that escapes
    nothing (an odd run, not a JSON string's end) is read event by event. Either way the
    text is what decoding every event gives."""
    texts = [f" tok{i}" for i in range(2 * BLOCK_EVENTS - 1)]
    texts[BLOCK_EVENTS + 3] = 'say "resume"'
    texts[BLOCK_EVENTS + 7] = "back\\"
    payloads = [ROLE, *(_payload(t) for t in texts)]
    events = _log(payloads)
    events.seal()
    # Block 0 holds the role chunk whole; block 1 holds middles only.
    middles = events._middles(1, len(events._ends), 2 * BLOCK_EVENTS)
    assert middles is not None
    assert middles[0] == 2 * BLOCK_EVENTS
    n = len(payloads)
    _same(events, payloads, 1, n)
    _same(events, payloads, BLOCK_EVENTS + 1, n)
    assert join_text(events.text(2, n, 0, False)) == "".join(texts)
    # Block 1's last event with an odd run of backslashes before its tail (a chunk that
    # is no JSON): the block is read event by event, as decoding each reads it.
    odd = [*payloads[:-1], _payload("x").replace(b'x"', b'x\\\\\\"')]
    events = _log(odd)
    events.seal()
    assert events._middles(1, len(events._ends), 2 * BLOCK_EVENTS) is None
    _same(events, odd, 1, n)
    _same(events, odd, BLOCK_EVENTS + 1, n)


def test_an_answers_end_reads_as_decoded_in_every_range() -> None:
    """Blocks of middles read as one run (sealed blocks and the open block's first events),
    up to an answer's last chunks kept whole (its finish and usage chunk, an event that is no
    chunk): every range reads as decoding every event gives, sealed or not."""
    texts = [f" tok{i}" for i in range(3 * BLOCK_EVENTS + 5)]
    texts[BLOCK_EVENTS + 2] = "ends with \\\\"  # an escaped backslash ends a middle well
    texts[2 * BLOCK_EVENTS + 4] = "line\n"
    usage = _payload("").replace(b'"usage":null', b'"usage":{"total_tokens":9}')
    assert usage != _payload("")
    payloads = [ROLE, *(_payload(t) for t in texts), usage, b'{"choices":[]}', b"[DONE]"]
    events = _log(payloads)
    n = len(payloads)
    assert events._whole  # the open block ends with whole events
    for first in range(1, n + 1):
        for last in range(first, n + 1):
            _same(events, payloads, first, last)
    events.seal()
    _same(events, payloads, 1, n)
    _same(events, payloads, 2, n - 1)


def test_a_run_with_a_quote_not_escaped_reads_block_by_block() -> None:
    """Middles that are not all string contents (a quote not escaped: one chunk's value
    holds another field) are read block by block, and each block as decoding gives."""
    texts = [f" tok{i}" for i in range(5 * BLOCK_EVENTS)]
    payloads = [ROLE, *(_payload(t) for t in texts)]
    # A chunk on the template whose middle closes the string and adds a field.
    odd = _payload("x").replace(b'"content":"x"', b'"content":"x","role":"y"')
    payloads[3 * BLOCK_EVENTS + 2] = odd
    events = _log(payloads)
    events.seal()
    n = len(payloads)
    _same(events, payloads, 1, n)
    _same(events, payloads, BLOCK_EVENTS + 1, n)
    assert events._middles(1, len(events._ends), n) is not None  # one run to the end


def test_an_odd_backslash_is_found_in_any_block_of_a_run() -> None:
    """A run of blocks of middles with escapes (`\\n`, an escaped backslash) in several
    blocks reads whole; a middle ending in an odd run of backslashes in any one of its
    blocks (sealed, or the open block's) stops the run from being read as one string, and
    the text is what decoding every event gives either way."""
    n_texts = 5 * BLOCK_EVENTS + 6
    texts = [f" tok{i}" for i in range(n_texts)]
    for i in range(3, n_texts, 7):  # escapes in every block, none at a middle's end...
        texts[i] = f"a\nb{i}"
    texts[2 * BLOCK_EVENTS + 1] = "ends with \\\\"  # ...but an escaped backslash (even)
    payloads = [ROLE, *(_payload(t) for t in texts)]
    events = _log(payloads)
    n = len(payloads)
    run = events._middles(1, len(events._ends), n)
    assert run is not None
    assert run[0] == n  # one run from block 1 to the open block's last event
    _same(events, payloads, 1, n)
    # On the template, its middle `x\\\` (an odd run: it escapes the tail's quote).
    odd = _payload("QQQ").replace(b"QQQ", b"x\\\\\\")
    for at in (BLOCK_EVENTS + 2, 3 * BLOCK_EVENTS + 5, 4 * BLOCK_EVENTS - 1, n - 2):
        changed = [*payloads[:at], odd, *payloads[at + 1 :]]
        events = _log(changed)
        block = at // BLOCK_EVENTS  # (`at` is 0-based: event at + 1)
        assert events._middles(1, len(events._ends), n) is None, at
        if block > 1:  # the blocks before it still read as one run
            assert events._middles(1, len(events._ends), block * BLOCK_EVENTS) is not None
        _same(events, changed, 1, n)
        _same(events, changed, BLOCK_EVENTS + 1, n)
