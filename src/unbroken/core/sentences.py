"""Whole sentences out of streamed text, for callers that feed text-to-speech; pure.

Imports the standard library only.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["SentenceSplitter"]

# Chinese and Japanese full-width ends close a sentence at once; so does a line break.
_WIDE_ENDS = frozenset("。！？；…\n")
# ASCII ends close a sentence only before whitespace (so "3.14", "e.g." inside a word and
# "file.txt" are not cut), possibly after closing quotes or brackets.
_ENDS = frozenset(".!?")
_CLOSERS = frozenset("\"')]}”’」』）")


class SentenceSplitter:
    """Cuts streamed text into sentences.

    `feed(text)` yields each sentence completed by the text so far, with its end mark and
    closing quotes; `flush()` yields what is left at the end. Joining everything yielded
    gives back the input exactly (whitespace between sentences goes with the next one,
    stripped off its start only when `strip` is set).

    Args:
        strip: strip whitespace around each sentence and skip empty ones (default on).
    """

    __slots__ = ("_buffer", "_strip")

    def __init__(self, *, strip: bool = True) -> None:
        self._buffer = ""
        self._strip = strip

    def feed(self, text: str) -> Iterator[str]:
        """Text in; the sentences it completed out."""
        self._buffer += text
        buffer = self._buffer
        start = 0
        i = 0
        n = len(buffer)
        while i < n:
            char = buffer[i]
            end = -1
            if char in _WIDE_ENDS:
                end = i + 1
                while end < n and (buffer[end] in _WIDE_ENDS or buffer[end] in _CLOSERS):
                    end += 1
                if end == n and buffer[end - 1] != "\n":
                    break  # more closers or ends may follow
            elif char in _ENDS:
                end = i + 1
                while end < n and (buffer[end] in _ENDS or buffer[end] in _CLOSERS):
                    end += 1
                if end == n:
                    break  # is a space next? not known yet
                if not buffer[end].isspace():
                    i = end
                    continue
            if end < 0:
                i += 1
                continue
            sentence = buffer[start:end]
            start = i = end
            yield from self._emit(sentence)
        self._buffer = buffer[start:]

    def flush(self) -> Iterator[str]:
        """The text after the last sentence end (the stream ended)."""
        rest, self._buffer = self._buffer, ""
        yield from self._emit(rest)

    def _emit(self, sentence: str) -> Iterator[str]:
        if not self._strip:
            if sentence:
                yield sentence
            return
        sentence = sentence.strip()
        if sentence:
            yield sentence
