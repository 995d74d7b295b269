"""The chat's line editor at the prompt_toolkit session layer (keys through a pipe input,
a dummy output), plain piped reads, and the answer renderer's token progress line."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from unbroken.cli.lineinput import PlainReader, TerminalReader, build_session, history_path
from unbroken.cli.render import render_answer
from unbroken.core.events import ReasoningEvent, TextEvent

LEFT, HOME, END, UP = "\x1b[D", "\x1b[H", "\x1b[F", "\x1b[A"


def _typed(history: Path, keys: str) -> str:
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        reader = TerminalReader(history, build_session(history, input=pipe, output=DummyOutput()))
        return reader.read()


def test_editing_keys_change_the_line(tmp_path: Path) -> None:
    """Left/Home/End and Ctrl+A/Ctrl+E move the cursor instead of inserting escape codes."""
    history = tmp_path / "h"
    assert _typed(history, f"helo{LEFT}l{END}!\r") == "hello!"
    assert _typed(history, f"orld{HOME}w{END}?\r") == "world?"
    assert _typed(history, "b\x01a\x05c\r") == "abc"


def test_multiline_keys(tmp_path: Path) -> None:
    """A trailing backslash and Alt+Enter (Esc, Enter) both start a new line; Enter sends."""
    assert _typed(tmp_path / "h", "one\\\rtwo\x1b\rthree\r") == "one\ntwo\nthree"


def test_history_is_kept_across_sessions(tmp_path: Path) -> None:
    """Up recalls earlier messages, also those of an earlier run (the history file)."""
    history = tmp_path / "deep" / "h"
    assert _typed(history, "first\r") == "first"
    assert _typed(history, "second\r") == "second"
    assert _typed(history, f"{UP}{UP}\r") == "first"
    assert "+second" in history.read_text()
    assert history.stat().st_mode & 0o077 == 0  # private to the user


def test_ctrl_c_and_ctrl_d(tmp_path: Path) -> None:
    """Ctrl+C drops the line (KeyboardInterrupt), Ctrl+D on an empty line ends (EOFError)."""
    with pytest.raises(KeyboardInterrupt):
        _typed(tmp_path / "h", "half a line\x03")
    with pytest.raises(EOFError):
        _typed(tmp_path / "h", "\x04")


def test_history_path_follows_the_data_home(tmp_path: Path) -> None:
    """The history sits next to the session database."""
    assert history_path(str(tmp_path)) == tmp_path / "unbroken" / "chat_history"
    assert history_path(None).parts[-4:] == (".local", "share", "unbroken", "chat_history")


def test_plain_reader_joins_continued_lines() -> None:
    """Piped, a line ending in a backslash continues on the next one; EOF ends it."""
    lines: Iterator[str] = iter(["one\\", "two", "three\\"])

    def ask() -> str:
        for line in lines:
            return line
        raise EOFError

    reader = PlainReader(ask)
    assert reader.read() == "one\ntwo"
    assert reader.read() == "three"
    with pytest.raises(EOFError):
        reader.read()


def _screen(max_tokens: int | None, *, pretty: bool = True) -> tuple[str, str]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=pretty, width=30, height=8, highlight=False)
    answer = ["Hello ", "there,\nsecond ", "line ", "x" * 300]
    events = [ReasoningEvent(0, "let me think"), *(TextEvent(0, t) for t in answer)]
    turn = render_answer(iter(events), console, 0.0, pretty=pretty, max_tokens=max_tokens)
    assert "".join(turn.text) == "".join(answer)
    return out.getvalue(), re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())


def test_progress_line_counts_against_max_tokens() -> None:
    """With max_tokens on a terminal, a live `N / max tokens` line is drawn; the answer is
    left on screen whole, and long lines are flushed row by row."""
    raw, plain = _screen(4096)
    counts = [int(n) for n in re.findall(r"(\d+) / 4096 tokens", plain)]
    assert counts
    assert counts[0] >= 3  # the reasoning counts too
    assert counts == sorted(counts)
    assert "second line" in plain.replace("\r", "").replace("\n", "")
    assert plain.replace("\r", "").replace("\n", "").count("x") >= 300
    assert "\x1b[2K" in raw  # the live area is redrawn (erased lines), not appended


def test_no_progress_without_max_tokens_or_terminal() -> None:
    """No max_tokens, or not a terminal: no progress line at all."""
    for screen in (_screen(None)[1], _screen(4096, pretty=False)[1]):
        assert "tokens" not in screen
        assert "Hello there," in screen
