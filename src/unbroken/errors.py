"""The exception tree of unbroken; this module imports nothing from unbroken.

    UnbrokenError
    ├── ConfigError              a setting is missing or out of range
    ├── InvalidRequestError      a request we were asked to send is malformed (ours to fix)
    ├── EncodeError              a value cannot be written as SSE (CR/LF in an event name...)
    ├── ProtocolError            the upstream broke the wire format (SSE, JSON, sizes)
    ├── UpstreamError            the upstream failed to give an answer
    │   ├── UpstreamStatusError  it answered with an HTTP error status (status_code, error)
    │   ├── UpstreamStreamError  it reported an error inside a 200 stream
    │   ├── UpstreamConnectError the connection could not be made or was reset
    │   ├── UpstreamTruncated    the stream ended before a finish_reason
    │   └── UpstreamTimeout      one of the stream timers fired (phase says which)
    ├── RetriesExhausted         every attempt failed (attempts; last error as __cause__)
    ├── ResumeError              a stream cannot be resumed (state expired, no id)
    ├── RateLimited              a local limit refused the call (retry_after_s)
    └── StoreError               a state store failed

Every error that ends a stream after part of the answer arrived carries it in `partial`, so
nothing the user already paid for is lost. Messages start lowercase, name the offending value
and, where useful, what to do next. They never contain API keys.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = [
    "ConfigError",
    "EncodeError",
    "InvalidRequestError",
    "ProtocolError",
    "RateLimited",
    "ResumeError",
    "RetriesExhausted",
    "StoreError",
    "UnbrokenError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamStreamError",
    "UpstreamTimeout",
    "UpstreamTruncated",
]


class UnbrokenError(Exception):
    """Base class of every error unbroken raises.

    Attributes:
        partial: the part of the answer that arrived before the failure (a
            `unbroken.ChatCompletion`), or None when nothing arrived.
    """

    partial: Any

    def __init__(self, message: str, *, partial: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.partial = partial


class ConfigError(UnbrokenError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class InvalidRequestError(UnbrokenError, ValueError):
    """A request built by the caller is malformed; sending it would only earn a 400."""


class EncodeError(UnbrokenError, ValueError):
    """A value cannot be represented on the wire (for example a line break in an SSE id)."""


class ProtocolError(UnbrokenError):
    """The upstream sent bytes that break the wire format.

    Attributes:
        excerpt: a short, printable excerpt of the offending input (at most 120 chars).
    """

    def __init__(self, message: str, *, excerpt: str = "", partial: Any = None) -> None:
        super().__init__(message, partial=partial)
        self.excerpt = excerpt


ErrorKind = Literal[
    "rate_limited",
    "overloaded",
    "server_error",
    "bad_request",
    "context_length_exceeded",
    "content_filter",
    "authentication",
    "insufficient_balance",
    "permission",
    "not_found",
    "invalid_parameters",
    "unreachable",  # permanent transport error: certificate verification, unknown host
    "unknown",
]


class UpstreamError(UnbrokenError):
    """The upstream failed to deliver an answer.

    Attributes:
        status_code: the HTTP status (200 for errors reported inside a stream), if known.
        kind: a coarse classification used by the retry policy (see `ErrorKind`).
        error_type: the provider's `error.type`, if it sent one.
        error_code: the provider's `error.code` (string or int), if it sent one.
        retry_after_s: the server's `Retry-After`, in seconds, if it sent one.
        route: the name of the route that failed, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        kind: ErrorKind = "unknown",
        error_type: str | None = None,
        error_code: str | int | None = None,
        retry_after_s: float | None = None,
        route: str | None = None,
        partial: Any = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.status_code = status_code
        self.kind = kind
        self.error_type = error_type
        self.error_code = error_code
        self.retry_after_s = retry_after_s
        self.route = route


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error status; `status_code` says which."""


class UpstreamStreamError(UpstreamError):
    """The upstream reported an error object inside a stream that had started (HTTP 200)."""


class UpstreamConnectError(UpstreamError):
    """The connection failed, was refused or was reset."""


class UpstreamTruncated(UpstreamError):
    """The stream ended (EOF) before every choice had a finish_reason."""


TimeoutPhase = Literal["connect", "headers", "first_token", "idle", "deadline"]


class UpstreamTimeout(UpstreamError):
    """A stream timer fired.

    Attributes:
        phase: `connect`, `headers` (no response headers), `first_token` (no content or
            reasoning yet), `idle` (no data event for too long; keep-alive comments do not
            count) or `deadline` (the total time allowed for the answer).
        timeout_s: the limit that was exceeded.
    """

    def __init__(
        self,
        message: str,
        *,
        phase: TimeoutPhase,
        timeout_s: float,
        route: str | None = None,
        partial: Any = None,
    ) -> None:
        super().__init__(message, kind="unknown", route=route, partial=partial)
        self.phase: TimeoutPhase = phase
        self.timeout_s = timeout_s


class RetriesExhausted(UnbrokenError):
    """Every allowed attempt failed; the last error is chained as `__cause__`.

    Attributes:
        attempts: how many attempts were made.
    """

    def __init__(self, message: str, *, attempts: int, partial: Any = None) -> None:
        super().__init__(message, partial=partial)
        self.attempts = attempts


class ResumeError(UnbrokenError):
    """A stream cannot be resumed: its state expired or the id is unknown."""


class RateLimited(UnbrokenError):
    """A local limit refused the call.

    Attributes:
        retry_after_s: when a retry may succeed, in seconds.
        limit: which limit refused (`requests`, `tokens`, `concurrency`, `budget`).
    """

    def __init__(self, message: str, *, retry_after_s: float, limit: str = "requests") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


class StoreError(UnbrokenError):
    """A state store (memory, SQLite, Redis) failed or is unreachable."""
