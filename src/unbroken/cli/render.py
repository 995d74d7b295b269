"""How `unbroken chat` and `unbroken ask` show an answer on a terminal: text as it
streams, reasoning as one dim line, and, when the request sets `max_tokens`, a live
`312 / 4096 tokens` line under the text. No stream logic here.

The progress line lives in a transient rich Live area together with the answer's unfinished
row(s); finished rows are printed above it (rich prints above a Live), so the answer stays
in the terminal's scrollback exactly as it streamed and the progress line disappears when
the answer ends (the summary then gives the upstream's exact count).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.cells import cell_len, chop_cells
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.text import Text

from unbroken.core.events import (
    DoneEvent,
    FellBackEvent,
    ReasoningEvent,
    RestartedEvent,
    ResumedEvent,
    RetryingEvent,
    TextEvent,
)
from unbroken.core.tokens import estimate_tokens

__all__ = ["Turn", "progress_line", "render_answer"]

# Live redraws at most this often while text streams (a fast model sends hundreds of
# tokens a second; the eye needs ~20 frames).
REFRESH_S = 0.05
# Reasoning shown on the one "thinking…" line (the tail, which is what is new).
THINKING_TAIL_CHARS = 400


@dataclass
class Turn:
    """What the renderer saw of one answer."""

    reasoning: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ttft_s: float | None = None


def progress_line(tokens: int, max_tokens: int) -> Text:
    """`312 / 4096 tokens`, dim."""
    return Text(f"{tokens} / {max_tokens} tokens", style="dim")


class _View:
    """The Live area: the thinking line or the answer's unfinished rows, and the progress."""

    def __init__(self, console: Console, turn: Turn, max_tokens: int | None) -> None:
        self.console = console
        self.turn = turn
        self.max_tokens = max_tokens
        self.live: Live | None = None
        self.partial = ""  # answer text not yet printed above the Live area
        self.thinking: str | None = None
        self.drawn_at = 0.0

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Built at each draw from the current state: rich also redraws the Live area when
        # something is printed above it, and that draw must not show a stale frame.
        parts: list[RenderableType] = []
        if self.thinking is not None:
            parts.append(Text(f"thinking… {self.thinking}", style="dim italic"))
        elif self.partial:
            # Cut into rows as the terminal will wrap it once printed, so nothing moves.
            rows = chop_cells(self.partial, max(1, self.console.width))
            parts.append(Text("\n".join(rows)))
        if self.max_tokens is not None:
            # Estimated on the joined text at each frame (not summed per chunk, which
            # would round up once per chunk); the summary gives the upstream's count.
            tokens = estimate_tokens("".join(self.turn.reasoning)) + estimate_tokens(
                "".join(self.turn.text)
            )
            parts.append(progress_line(tokens, self.max_tokens))
        yield Group(*parts)

    def draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn_at < REFRESH_S:
            return
        self.drawn_at = now
        if self.live is None:
            self.live = Live(self, console=self.console, transient=True, auto_refresh=False)
            self.live.start()
        self.live.refresh()

    def add_text(self, text: str) -> None:
        """Print finished lines above the Live area and keep the unfinished one in it;
        a line taller than the screen is printed row by row as its rows fill."""
        *done, self.partial = (self.partial + text).split("\n")
        for line in done:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        width = max(1, self.console.width)
        if cell_len(self.partial) > width * max(1, self.console.height - 3):
            *rows, self.partial = chop_cells(self.partial, width)
            for row in rows:
                self.console.print(row, markup=False, highlight=False, soft_wrap=True)
        self.draw(force=bool(done))

    def close(self) -> None:
        """Remove the Live area and leave the unfinished row printed, cursor after it."""
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.partial:
            self.console.print(self.partial, end="", markup=False, highlight=False, soft_wrap=True)
            self.partial = ""


def render_answer(
    events: Iterator[object],
    console: Console,
    started: float,
    *,
    pretty: bool,
    max_tokens: int | None = None,
) -> Turn:
    """Show an answer's events and return what was seen.

    Args:
        events: a session's or stream's events.
        console: where to draw.
        started: `time.monotonic()` when the question was sent (for the first-token time).
        pretty: a terminal: reasoning on a live line, progress when `max_tokens` is set.
        max_tokens: the request's cap; with `pretty`, a live estimated token count of the
            answer (reasoning included, as DeepSeek counts it) is shown against it.
    """
    turn = Turn()
    progress = max_tokens if pretty else None
    view = _View(console, turn, progress)
    try:
        for event in events:
            if isinstance(event, ReasoningEvent):
                turn.reasoning.append(event.text)
                if pretty:
                    joined = "".join(turn.reasoning)
                    view.thinking = joined[-THINKING_TAIL_CHARS:].replace("\n", " ")
                    view.draw(force=progress is None)
            elif isinstance(event, TextEvent):
                if turn.ttft_s is None:
                    turn.ttft_s = time.monotonic() - started
                if view.thinking is not None:
                    view.thinking = None
                    if progress is None:
                        view.close()
                    console.print(
                        f"[dim]▸ thought {len(''.join(turn.reasoning))} chars "
                        "(/reasoning to expand)[/dim]"
                    )
                turn.text.append(event.text)
                if progress is None:
                    console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
                else:
                    view.add_text(event.text)
            elif isinstance(event, RetryingEvent | ResumedEvent | FellBackEvent | RestartedEvent):
                turn.notes.append(event.type)
                if isinstance(event, RestartedEvent):
                    view.close()
                    console.print("\n[yellow]↺ restarting the answer[/yellow]")
            elif isinstance(event, DoneEvent):
                break
    finally:
        view.close()
    return turn
