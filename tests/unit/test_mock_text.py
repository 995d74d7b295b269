"""The mock's continuation check (mock.text.split_answer) on its own: the prefix must be the
start of the answer's text, compared character by character, not by length."""

from __future__ import annotations

import pytest

from unbroken.mock.text import Answer, PrefixMismatch, split_answer

ANSWER = Answer(reasoning=("Think ", "twice."), content=("Hello", ", 世界", " 🚀!"))


def test_a_true_prefix_is_continued() -> None:
    assert split_answer(ANSWER, None, "Hello, 世").content_text == "界 🚀!"
    assert split_answer(ANSWER, "Think twice.", "Hello").content_text == ", 世界 🚀!"
    rest = split_answer(ANSWER, "Think t", "")
    assert (rest.reasoning_text, rest.content_text) == ("wice.", "Hello, 世界 🚀!")


@pytest.mark.parametrize(
    ("reasoning", "content", "part", "at"),
    [
        (None, "Hellp, 世", "content", 4),  # same length, one character wrong
        (None, "Hello, 世界 🚀!?", "content", 12),  # longer than the answer
        ("Think", "Hello", "reasoning", 5),  # content given: the reasoning must be whole
        ("Think twice!", "Hello", "reasoning", 11),
        ("Thonk", "", "reasoning", 2),
    ],
)
def test_a_wrong_prefix_is_refused(reasoning: str | None, content: str, part: str, at: int) -> None:
    with pytest.raises(PrefixMismatch) as caught:
        split_answer(ANSWER, reasoning, content)
    assert (caught.value.part, caught.value.at) == (part, at)
