"""Reading one streamed answer into a `RequestRecord`: SSE items in (with the time they
arrived), text chunks, timings, usage and the gateway's own account out. Pure: the runner
reads the bytes and the clock and passes them in."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from unbroken.core.events import Comment, SSEEvent
from unbroken.loadtest.stats import RequestRecord

__all__ = ["AnswerRead", "apply_usage"]

# The gateway's trailer comment: `: unbroken route=R attempts=N retries=N resumes=N ...`.
_TRAILER = re.compile(r"unbroken route=\S+ attempts=(\d+) retries=\d+ resumes=(\d+)")


def apply_usage(record: RequestRecord, usage: object) -> None:
    """Copy the token counts of a `usage` object into `record`."""
    if isinstance(usage, dict):
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.completion_tokens = int(usage.get("completion_tokens") or 0)


@dataclass(slots=True)
class AnswerRead:
    """The reading state of one answer that started at `t0` (the runner's clock).

    Attributes:
        done: `[DONE]` (or a finished long-poll log) was seen.
        finished: nothing more will be read (done, or an error event).
        last_id: the last SSE event id (what a reconnect sends as `Last-Event-ID`).
        times: arrival time of each answer-text chunk.
    """

    record: RequestRecord
    t0: float
    text: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    done: bool = False
    finished: bool = False
    error: str | None = None
    last_id: str = ""
    end: float | None = None

    def feed(self, items: Iterable[object], now: float) -> None:
        """Take the SSE items of one read that arrived at `now`.

        Raises:
            msgspec.DecodeError: a data line that is not JSON.
        """
        record = self.record
        self.end = now
        for item in items:
            if isinstance(item, Comment):
                match = _TRAILER.search(item.text)
                if match:
                    record.attempts = int(match.group(1))
                    record.resumes = int(match.group(2))
                continue
            if not isinstance(item, SSEEvent):
                continue
            if item.id:
                self.last_id = item.id
            if item.data == "[DONE]":
                self.done = self.finished = True
                continue
            chunk = msgspec.json.decode(item.data)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                self.error = "stream_error"
                self.finished = True
                continue
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                if piece:
                    if not self.times:
                        record.ttft_s = now - self.t0
                    self.times.append(now)
                    self.text.append(piece)
            if chunk.get("usage"):
                apply_usage(record, chunk["usage"])
            meta = chunk.get("unbroken")
            if isinstance(meta, dict) and isinstance(meta.get("attempts"), int):
                # A gateway's stream log ends with an event that says what the answer took.
                record.attempts = meta["attempts"]
                record.resumes = int(meta.get("resumes") or 0)

    def finish(self, now: float, cut_after: int | None) -> None:
        """Write the answer's figures into the record; `now` ends an answer that never
        read anything. `cut_after`: the mock chunk a fault broke the stream after."""
        record = self.record
        record.e2e_s = (self.end if self.end is not None else now) - self.t0
        record.text = "".join(self.text)
        record.n_chunks = len(self.times)
        record.gaps_s = [b - a for a, b in itertools.pairwise(self.times)]
        if self.error is not None:
            record.error = self.error
        elif not self.done and record.error is None:
            record.error = "truncated"
        # A mock fault `after=N` breaks the stream after chunk N, the role chunk being chunk
        # 1: the gap before answer-text chunk N (0-based N-1) is the one the cut caused.
        after = cut_after or 0
        if after >= 2 and len(self.times) >= after and record.cut_gap_s is None:
            record.cut_gap_s = self.times[after - 1] - self.times[after - 2]
