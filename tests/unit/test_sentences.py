"""SentenceSplitter: whole sentences out of any split of the text."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.sentences import SentenceSplitter

TEXT = (
    "Streams break. Pi is 3.14 and the file is a.txt! Really?! "
    "他说：“好。”然后走了。真的吗？是的…\n"
    'She said "stop." Then left'
)
# Written out by hand, not derived from the code's rules.
SENTENCES = [
    "Streams break.",
    "Pi is 3.14 and the file is a.txt!",
    "Really?!",
    "他说：“好。”",
    "然后走了。",
    "真的吗？",
    "是的…",
    'She said "stop."',
    "Then left",
]


def split(pieces: list[str], *, strip: bool = True) -> list[str]:
    splitter = SentenceSplitter(strip=strip)
    out: list[str] = []
    for piece in pieces:
        out.extend(splitter.feed(piece))
    out.extend(splitter.flush())
    return out


def test_sentences_of_mixed_text() -> None:
    """English ends before a space, Chinese ends at once, closing quotes stay with them."""
    assert split([TEXT]) == SENTENCES


@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=12))
def test_any_split_gives_the_same_sentences(cuts: list[int]) -> None:
    """Where the stream's chunks are cut does not change the sentences."""
    bounds = [0, *sorted(cuts), len(TEXT)]
    pieces = [TEXT[a:b] for a, b in itertools.pairwise(bounds)]
    assert split(pieces) == SENTENCES


@given(st.text(alphabet="ab .!?。”\n ", max_size=40), st.integers(0, 40))
def test_unstripped_sentences_join_back_to_the_text(text: str, cut: int) -> None:
    """Without strip, nothing is lost or added."""
    assert "".join(split([text[:cut], text[cut:]], strip=False)) == text


def test_a_sentence_is_given_as_soon_as_it_is_known_to_end() -> None:
    """A full stop waits for the next character; a Chinese end waits for closers only."""
    splitter = SentenceSplitter()
    assert list(splitter.feed("One.")) == []
    assert list(splitter.feed(" Two")) == ["One."]
    assert list(splitter.feed("。")) == []
    assert list(splitter.feed("三")) == ["Two。"]
    assert list(splitter.feed("\n")) == ["三"]
    assert list(splitter.flush()) == []
