"""How `unbroken chat` reads what the user types.

On a terminal, a prompt_toolkit line editor: arrow keys, Home/End and the Emacs keys edit
the line, Up/Down walk a history kept per user in the data home, Alt+Enter (or Esc then
Enter) or a line ending in a backslash starts a new line, Ctrl+C drops the line and Ctrl+D
exits. Piped, plain line reads, so scripts see exactly what they send (a trailing backslash
continues there too). No stream logic here; imports prompt_toolkit lazily.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import Input
    from prompt_toolkit.key_binding import KeyPressEvent
    from prompt_toolkit.output import Output

__all__ = [
    "CONTINUATION",
    "MULTILINE_HELP",
    "LineReader",
    "PlainReader",
    "TerminalReader",
    "history_path",
    "line_reader",
]

# The end of a line that asks for another line (as in a shell).
CONTINUATION = "\\"
MULTILINE_HELP = (
    "Alt+Enter (or Esc, Enter) or a line ending in \\ starts a new line; Up/Down: history"
)


class LineReader(Protocol):
    """Reads one message: raises EOFError at the end of input (Ctrl+D) and
    KeyboardInterrupt when the user drops the line (Ctrl+C)."""

    def read(self) -> str:
        """The next message (it may hold newlines)."""


def history_path(data_home: str | None) -> Path:
    """`$XDG_DATA_HOME/unbroken/chat_history` (default `~/.local/share/unbroken/...`), next
    to the session database."""
    base = Path(data_home) if data_home else Path.home() / ".local" / "share"
    return base / "unbroken" / "chat_history"


class PlainReader:
    """Plain line reads (stdin piped): `ask` prints the prompt, `readline` returns one line
    or "" at the end of input."""

    def __init__(self, ask: Callable[[], str]) -> None:
        self._ask = ask

    def read(self) -> str:
        lines = [self._ask()]
        while lines[-1].endswith(CONTINUATION):
            lines[-1] = lines[-1][: -len(CONTINUATION)]
            try:
                lines.append(self._ask())
            except EOFError:
                break
        return "\n".join(lines)


class TerminalReader:
    """A prompt_toolkit editor with a persistent history (see the module docstring).

    Args:
        history: the history file (its directory is created).
        session: a ready PromptSession (tests pass one on a pipe input); built when None.
    """

    def __init__(self, history: Path, session: PromptSession[str] | None = None) -> None:
        self._session = session or build_session(history)

    def read(self) -> str:
        return self._session.prompt()


def build_session(
    history: Path, *, input: Input | None = None, output: Output | None = None
) -> PromptSession[str]:
    """The chat's PromptSession: prompt, continuation, key bindings and file history;
    `input` and `output` default to the terminal (tests give a pipe and a dummy)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    history.parent.mkdir(parents=True, exist_ok=True)
    # What the user typed is theirs alone, as the session database next to it.
    history.touch(mode=0o600, exist_ok=True)
    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if buffer.document.text_before_cursor.endswith(CONTINUATION):
            buffer.delete_before_cursor(len(CONTINUATION))
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    # Alt+Enter arrives as Esc then Enter on every terminal.
    @bindings.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return PromptSession(
        FormattedText([("bold ansicyan", "you ›"), ("", " ")]),
        multiline=True,
        prompt_continuation=lambda width, line, wrap: "… ".rjust(width),
        history=FileHistory(str(history)),
        key_bindings=bindings,
        enable_open_in_editor=False,
        input=input,
        output=output,
    )


def line_reader(ask: Callable[[], str], data_home: str | None) -> LineReader:
    """The editor when stdin and stdout are terminals, plain reads otherwise."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalReader(history_path(data_home))
    return PlainReader(ask)
