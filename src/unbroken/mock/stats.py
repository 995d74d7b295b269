"""Counters and the recent-request log of the mock DeepSeek, served by `/_mock/stats` and
`/_mock/log`. No prompts, answers or keys are ever recorded. Imports only the standard library.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

__all__ = ["LogEntry", "MockStats"]

# Paths counted under their own name; anything else is counted as "other" so that a client
# probing random URLs cannot grow the counters without bound.
KNOWN_PATHS = frozenset(
    {
        "/chat/completions",
        "/v1/chat/completions",
        "/beta/chat/completions",
        "/models",
        "/v1/models",
        "/user/balance",
        "/v1/user/balance",
    }
)


@dataclass(slots=True)
class LogEntry:
    """One finished request, as `/_mock/log` shows it.

    Attributes:
        seq: the request's number since start or reset (1-based).
        time: wall-clock time the request arrived (Unix seconds).
        method, path: the request line.
        status: the HTTP status sent (0 when none was: reset, hang).
        model: the model asked for, if known.
        stream: whether a stream was asked for.
        faults: the fault kinds applied.
        fault_key: the fault key (a digest, never a prompt), when faults were looked up.
        outcome: `ok`, `refused`, `invalid`, or how the answer ended (`reset`, `close`,
            `stall`, `error`, `insufficient`, `done_early`, `hang`, `cancelled`, ...).
        chunks: `data:` chunks written.
        prompt_tokens, completion_tokens: the usage of the answer, when one was made.
        duration_ms: from arrival to the end of the response.
    """

    seq: int
    time: float
    method: str
    path: str
    status: int = 0
    model: str | None = None
    stream: bool = False
    faults: list[str] = field(default_factory=list)
    fault_key: str | None = None
    outcome: str = "ok"
    chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_ms: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """The entry as JSON-ready data."""
        return {
            "seq": self.seq,
            "time": round(self.time, 3),
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "model": self.model,
            "stream": self.stream,
            "faults": self.faults,
            "fault_key": self.fault_key,
            "outcome": self.outcome,
            "chunks": self.chunks,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "duration_ms": round(self.duration_ms, 3),
        }


class MockStats:
    """Counters since start or `reset()`, and a bounded log of finished requests."""

    def __init__(self, log_size: int = 1000) -> None:
        self._log: deque[LogEntry] = deque(maxlen=max(log_size, 0))
        self.reset()

    def reset(self) -> None:
        """Zero every counter and clear the log (active streams stay counted)."""
        self.started = time.time()
        self.seq = 0
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.faults: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_cancelled = 0
        # Streams sent (at least in part) by the pacer (mock.pacer).
        self.streams_paced = 0
        self.chunks_sent = 0
        self.bytes_sent = 0
        # Continuations whose prefix was not the start of the answer (mock.text).
        self.prefix_mismatches = 0
        self._log.clear()
        if not hasattr(self, "streams_active"):
            self.streams_active = 0

    def begin(self, method: str, path: str) -> LogEntry:
        """Start the log entry of a request."""
        self.seq += 1
        return LogEntry(self.seq, time.time(), method, path if path in KNOWN_PATHS else "other")

    def finish(self, entry: LogEntry, started: float, now: float) -> None:
        """Count a finished request and log it."""
        entry.duration_ms = (now - started) * 1000.0
        self.requests[(entry.method, entry.path, entry.status)] += 1
        for kind in entry.faults:
            self.faults[kind] += 1
        self.outcomes[entry.outcome] += 1
        self._log.append(entry)

    def snapshot(self) -> dict[str, object]:
        """The counters as JSON-ready data (the body of `/_mock/stats`)."""
        by_path: dict[str, dict[str, int]] = {}
        by_status: Counter[str] = Counter()
        for (method, path, status), n in sorted(self.requests.items()):
            by_path.setdefault(f"{method} {path}", {})[str(status)] = n
            by_status[str(status)] += n
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests_total": sum(self.requests.values()),
            "requests": by_path,
            "statuses": dict(sorted(by_status.items())),
            "faults": dict(sorted(self.faults.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "streams": {
                "started": self.streams_started,
                "active": self.streams_active,
                "completed": self.streams_completed,
                "cancelled": self.streams_cancelled,
                "paced": self.streams_paced,
            },
            "chunks_sent": self.chunks_sent,
            "bytes_sent": self.bytes_sent,
            "prefix_mismatches": self.prefix_mismatches,
        }

    def recent(self, limit: int) -> list[dict[str, object]]:
        """The last `limit` log entries, oldest first."""
        entries = list(self._log)[-limit:] if limit > 0 else []
        return [entry.as_dict() for entry in entries]
