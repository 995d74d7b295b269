"""core.accumulator `ChunkAccumulator.keep_text_in` and core.wire `chunk_text`: an
accumulator whose text a log of its chunks holds keeps no copy of it, and reads back the
same text, completion and copies as one that keeps it."""

from __future__ import annotations

import sys

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from tests.support import held_text_bytes
from unbroken.core.accumulator import ChunkAccumulator, join_text
from unbroken.core.wire import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    Usage,
    chunk_text,
    decode_chunk,
)


class ChunkLog:
    """A log of the chunks an accumulator folds (as the gateway's stream log): their JSON,
    appended by the test after each fold, read back with `chunk_text`."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.reads = 0

    def text_mark(self) -> int:
        return len(self.payloads)

    def text_since(self, mark: int, until: int | None, index: int, reasoning: bool) -> str:
        self.reads += 1
        return join_text(chunk_text(self.payloads[mark:until], index, reasoning))


def _chunk(
    content: str | None = None,
    *,
    index: int = 0,
    reasoning: str | None = None,
    role: str | None = None,
    finish: str | None = None,
    usage: Usage | None = None,
) -> ChatCompletionChunk:
    delta = Delta(role=role, content=content, reasoning_content=reasoning)
    return ChatCompletionChunk(
        id="c1",
        model="m",
        created=7,
        choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)],
        usage=usage,
    )


def _both(chunks: list[ChatCompletionChunk]) -> tuple[ChunkAccumulator, ChunkAccumulator, ChunkLog]:
    """`chunks` folded by an accumulator that keeps the text, and by one whose log does."""
    kept = ChunkAccumulator()
    lean = ChunkAccumulator()
    log = ChunkLog()
    assert lean.keep_text_in(log)
    for chunk in chunks:
        kept.feed(chunk)
        lean.feed(chunk)
        log.payloads.append(msgspec.json.encode(chunk))
    return kept, lean, log


def test_the_text_is_not_kept_twice() -> None:
    """The text folded is held by the log only: the accumulator holds a few bytes however
    long it is (one keeping it holds all of it)."""
    text = "a long answer, token by token. " * 40
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    chunks = [_chunk("", role="assistant"), *(_chunk(p) for p in pieces)]
    kept, lean, log = _both(chunks)
    assert held_text_bytes(kept, skip=log) >= len(text)
    assert held_text_bytes(lean, skip=log) < 100
    assert lean.content() == kept.content() == text
    assert lean.completion() == kept.completion()


def test_feed_text_keeps_no_copy_either() -> None:
    """The relay's path (`feed_text`, content and reasoning) notes only that text came."""
    lean = ChunkAccumulator()
    log = ChunkLog()
    lean.keep_text_in(log)
    lean.feed(_chunk("", role="assistant"))
    log.payloads.append(msgspec.json.encode(_chunk("", role="assistant")))
    for piece, reasoning in (("think ", True), ("hard", True), ("Hi", False), (" you", False)):
        lean.feed_text(0, piece, reasoning)
        chunk = _chunk(None, reasoning=piece) if reasoning else _chunk(piece)
        log.payloads.append(msgspec.json.encode(chunk))
    assert held_text_bytes(lean, skip=log) < 100
    assert lean.reasoning() == "think hard"
    assert lean.content() == "Hi you"
    assert lean.n_text_deltas() == 4


def test_feed_text_of_nothing_is_no_output() -> None:
    """An empty text on the relay's path is no delta and no output, as with the text kept
    (and a surrogate half, which UTF-8 cannot encode, is text like any other)."""
    lean = ChunkAccumulator()
    lean.keep_text_in(ChunkLog())
    lean.feed_text(0, "")
    lean.feed_text(0, "", True)
    kept = ChunkAccumulator()
    kept.feed_text(0, "")
    assert (lean.has_output, kept.has_output, lean.n_text_deltas()) == (False, False, 0)
    lean.feed_text(0, "\ud83d")
    kept.feed_text(0, "\ud83d")
    assert (lean.has_output, kept.has_output) == (True, True)
    assert lean.n_text_deltas() == kept.n_text_deltas() == 1


def test_only_while_no_text_came() -> None:
    """Before any text: the role chunk's empty content (folded, logged or not yet) is no
    obstacle; once text came, or with a source already, nothing changes."""
    acc = ChunkAccumulator()
    log = ChunkLog()
    role = _chunk("", role="assistant")
    acc.feed(role)
    acc.feed(_chunk(None, index=1, reasoning=""))
    assert acc.keep_text_in(log)
    assert not acc.keep_text_in(ChunkLog())
    log.payloads.append(msgspec.json.encode(role))  # logged after the switch
    for chunk in (_chunk("Hi"), _chunk(None, index=1, reasoning="hm")):
        acc.feed(chunk)
        log.payloads.append(msgspec.json.encode(chunk))
    assert (acc.content(), acc.reasoning(1), acc.role()) == ("Hi", "hm", "assistant")
    assert held_text_bytes(acc, skip=log) < 100
    kept = ChunkAccumulator()
    kept.feed(_chunk("kept"))
    assert not kept.keep_text_in(ChunkLog())
    kept.feed(_chunk(" here"))
    assert kept.content() == "kept here"
    reasoned = ChunkAccumulator()
    reasoned.feed(_chunk(None, reasoning="r"))
    assert not reasoned.keep_text_in(ChunkLog())


def test_has_output_only_once_some_text_came() -> None:
    """An empty content (the role chunk's) is no output, as with the text kept."""
    kept, lean, _ = _both([_chunk("", role="assistant")])
    assert not kept.has_output
    assert not lean.has_output
    kept, lean, _ = _both([_chunk("", role="assistant"), _chunk("x")])
    assert kept.has_output
    assert lean.has_output


def test_a_discarded_choice_starts_again_after_the_mark() -> None:
    """A restart discards a choice's text: what it shows next is read from after it."""
    kept, lean, log = _both([_chunk("", role="assistant"), _chunk("first try")])
    for acc in (kept, lean):
        acc.discard(0)
    for chunk in (_chunk("second"), _chunk(" try", finish="stop")):
        kept.feed(chunk)
        lean.feed(chunk)
        log.payloads.append(msgspec.json.encode(chunk))
    assert lean.content() == kept.content() == "second try"
    assert lean.completion() == kept.completion()


def test_a_copy_keeps_its_own_text() -> None:
    """A copy (an attempt's own fold) holds its text: fed apart, it does not read the log."""
    _, lean, log = _both([_chunk("", role="assistant"), _chunk("shared", reasoning="why")])
    twin = lean.copy()
    reads = log.reads
    twin.feed(_chunk(" twin only"))
    assert twin.content() == "shared twin only"
    assert twin.reasoning() == "why"
    assert log.reads == reads
    assert lean.content() == "shared"
    assert held_text_bytes(twin, skip=log) >= len("shared twin only")


def test_several_choices_and_usage() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    chunks = [
        _chunk("", role="assistant"),
        _chunk("", index=1, role="assistant"),
        _chunk("zero"),
        _chunk("one", index=1),
        _chunk(" more", index=1, finish="length"),
        _chunk(None, finish="stop"),
        ChatCompletionChunk(id="c1", choices=[], usage=usage),
    ]
    kept, lean, _ = _both(chunks)
    assert lean.completion() == kept.completion()
    assert lean.content(1) == "one more"
    assert lean.usage == usage


def test_chunk_text_reads_what_the_accumulator_folds() -> None:
    """`reasoning` when `reasoning_content` is absent; lone surrogate halves rejoined;
    events that are not chunks, other choices, and null or empty text add nothing."""
    payloads = [
        b"[DONE]",
        b'{"error":{"message":"x"}}',
        b"{not json",
        b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"index":1,"delta":{"content":"other"}}]}',
        b'{"choices":[{"index":0}]}',
        b'{"choices":[{"index":0,"delta":{"reasoning":"r1"}}]}',
        b'{"choices":[{"index":0,"delta":{"reasoning_content":"r2","reasoning":"no"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"\\ud83d"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"\\ude80!"}}]}',
    ]
    assert join_text(chunk_text(payloads, 0, False)) == "\U0001f680!"
    assert chunk_text(payloads, 0, True) == ["r1", "r2"]
    assert chunk_text(payloads, 1, False) == ["other"]
    acc = ChunkAccumulator()
    for payload in payloads[3:]:
        acc.feed(decode_chunk(payload))
    assert acc.content() == "\U0001f680!"
    assert acc.reasoning() == "r1r2"


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.booleans(), st.text(max_size=4)),
        max_size=12,
    )
)
def test_lean_folds_as_kept(parts: list[tuple[int, bool, str]]) -> None:
    """Any mix of choices, content and reasoning (surrogates included): the same answer."""
    chunks = [
        _chunk(None, index=i, reasoning=text) if reasoning else _chunk(text, index=i)
        for i, reasoning, text in parts
    ]
    kept, lean, _ = _both(chunks)
    assert lean.completion() == kept.completion()
    assert lean.has_output == kept.has_output
    assert sys.getsizeof(lean) == sys.getsizeof(kept)


def test_a_snapshot_leaves_the_text_in_the_log() -> None:
    """A snapshot (a finished attempt's fold) copies no text: it reads the log up to where
    it was taken, whatever is logged later; a copy of it owns its text."""
    _, lean, log = _both([_chunk("", role="assistant"), _chunk("before", reasoning="r")])
    frozen = lean.snapshot()
    reads = log.reads
    for chunk in (_chunk(" after"), _chunk(None, reasoning=" more")):
        lean.feed(chunk)
        log.payloads.append(msgspec.json.encode(chunk))
    assert log.reads == reads
    assert held_text_bytes(frozen, skip=log) < 100
    assert frozen.has_output
    assert (frozen.content(), frozen.reasoning()) == ("before", "r")
    assert (lean.content(), lean.reasoning()) == ("before after", "r more")
    again = frozen.snapshot()
    assert again.content() == "before"
    owned = frozen.copy()
    assert (owned.content(), owned.reasoning()) == ("before", "r")
    assert held_text_bytes(owned, skip=log) >= len("before")


def test_a_snapshot_without_a_source_is_a_copy() -> None:
    acc = ChunkAccumulator()
    acc.feed(_chunk("kept"))
    frozen = acc.snapshot()
    acc.feed(_chunk(" on"))
    assert frozen.content() == "kept"
    assert acc.content() == "kept on"
