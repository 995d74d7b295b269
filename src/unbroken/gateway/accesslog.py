"""The access log (one line per request), the request id on every log line, and the log
formats (`text` or `json`) of `unbroken serve`.

A `RequestRecord` is opened when a request arrives and kept in a context variable, so the
chat path fills it in (key name, model, route, tokens...) and every log line written while
the request runs, in any module, carries its request id (`RequestIdFilter`). The record is
closed once, after the response: one access-log line, one duration observation. Never in a
line: a key, an Authorization header, a prompt or an answer. Imports core and the stdlib.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import itertools
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from unbroken.core.wire import Answer, ChatCompletion

__all__ = [
    "ACCESS_LOGGER",
    "JsonFormatter",
    "RequestIdFilter",
    "RequestRecord",
    "configure_logging",
    "current_request",
    "new_request_id",
    "outcome_of_status",
]

ACCESS_LOGGER = "unbroken.access"
_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "unbroken_request", default=None
)
# The fields of an access line, in the order the text format writes them.
_FIELDS = (
    "key",
    "model",
    "route",
    "outcome",
    "ttft_s",
    "duration_s",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "attempts",
    "resumes",
    "fallbacks",
    "error",
)
# Outcomes besides a relay's (complete, error, client_gone, slow_client, shutdown): the
# only label values of the duration histogram, so no exception name ever becomes one.
OUTCOMES = frozenset(
    {"ok", "complete", "error", "client_gone", "slow_client", "shutdown", "rejected", "failed"}
)


def outcome_of_status(status: int) -> str:
    """The outcome of a request that relayed no answer: ok, rejected (4xx) or failed."""
    if status < 400:
        return "ok"
    return "rejected" if status < 500 else "failed"


@dataclass(slots=True)
class RequestRecord:
    """What the access log says about one request (filled in while it runs)."""

    request_id: str
    method: str
    path: str
    started_s: float
    unix_time: float
    status: int = 0
    key: str | None = None
    model: str | None = None
    route: str | None = None
    outcome: str | None = None
    error: str | None = None
    ttft_s: float | None = None
    duration_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    attempts: int | None = None
    resumes: int | None = None
    fallbacks: int | None = None

    @classmethod
    def begin(cls, request_id: str, method: str, path: str) -> RequestRecord:
        """Open a record and make it the current request's."""
        record = cls(request_id, method, path[:200], time.monotonic(), time.time())
        _CURRENT.set(record)
        return record

    def answer(self, outcome: str, completion: ChatCompletion | None) -> None:
        """Take the answer's facts: outcome, route, timings, billed usage and cost."""
        self.outcome = outcome
        if completion is None:
            return
        usage = completion.usage
        if usage is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.completion_tokens = usage.completion_tokens
        if isinstance(completion, Answer):
            meta = completion.unbroken
            self.route = meta.route or None
            self.ttft_s = meta.ttft_s
            self.cost_usd = meta.cost_usd
            self.attempts = len(meta.attempts)
            self.resumes = meta.resumes
            self.fallbacks = meta.fallbacks

    def finish(self, status: int) -> None:
        """Close the record (its status, duration and outcome); later log lines in this
        context carry no request id."""
        _CURRENT.set(None)
        self.status = status
        self.duration_s = time.monotonic() - self.started_s
        if self.outcome is None or self.outcome not in OUTCOMES:
            self.outcome = outcome_of_status(status)

    def fields(self) -> dict[str, Any]:
        """The set fields, for the JSON format and the text line."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
        }
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = round(value, 6) if isinstance(value, float) else value
        return out

    def line(self) -> str:
        """The access line's message in the text format."""
        parts = [f"{self.method} {self.path} {self.status}"]
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name.endswith("_s"):
                parts.append(f"{name[:-2]}_ms={value * 1000:.0f}")
            elif isinstance(value, float):
                parts.append(f"{name}={value:.6f}")
            else:
                parts.append(f"{name}={value}")
        return " ".join(parts)


class _RequestIds:
    """Request ids shaped like `uuid.uuid4().hex` (32 hex digits; a UUID4's version and
    variant digits in place): 20 random digits per process, then a 48-bit counter. As
    unique as uuid4 ids across processes (reseeded in a forked child), for ~0.3 us instead
    of ~3 us; not secret, like any request id."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = uuid.uuid4().hex[:20].encode()
        self._count = itertools.count()

    def next(self) -> bytes:
        return b"%b%012x" % (self._prefix, next(self._count) & 0xFFFFFFFFFFFF)


_REQUEST_IDS = _RequestIds()
os.register_at_fork(after_in_child=_REQUEST_IDS.reseed)


def new_request_id() -> bytes:
    """A new request id (32 lowercase hex digits, the form of `uuid.uuid4().hex`)."""
    return _REQUEST_IDS.next()


def current_request() -> RequestRecord | None:
    """The record of the request being served in this context, if any."""
    return _CURRENT.get()


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add `record.request_id`; never drops a record."""
        if not hasattr(record, "request_id"):
            current = _CURRENT.get()
            record.request_id = current.request_id if current is not None else "-"
        return True


# Record attributes that are logging's own, or uvicorn's ANSI-coloured copy of the message.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
# Libraries that log every upstream call at INFO; their lines add nothing to the access log.
_QUIET = ("httpx", "httpcore")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Format `record` as one line of JSON."""
        data: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name == "access" and isinstance(value, dict):
                data.update(value)  # the access line's fields, flat
            elif name not in _STANDARD and name not in data:
                data[name] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # a stream of text
    """The handler `configure_logging` installs (so a second call replaces it)."""


def configure_logging(level: str = "info", fmt: str = "text") -> logging.Handler | None:
    """Log to stderr in `fmt` (`text` or `json`), every line with its request id; the
    CLI calls this once (the library itself never adds handlers). Like
    `logging.basicConfig`, it leaves a root logger that already has other handlers alone
    (an embedding application's, or a test runner's).

    Returns:
        the handler installed on the root logger, or None when it was left alone.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if len(ours) != len(root.handlers):
        return None
    for old in ours:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # The access log is switched by gateway.access_log, not by the level of other lines.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    return handler


def write_access_line(record: RequestRecord) -> None:
    """Log the access line of a finished request (logger `unbroken.access`, INFO)."""
    logging.getLogger(ACCESS_LOGGER).info(
        "%s", record.line(), extra={"access": record.fields(), "request_id": record.request_id}
    )
