"""The exception tree of unbroken; this module imports nothing from unbroken.

    UnbrokenError
    ├── ConfigError              a setting is missing or out of range
    ├── InvalidRequestError      a request we were asked to send is malformed (ours to fix)
    ├── EncodeError              a value cannot be written as SSE (CR/LF in an event name...)
    ├── ProtocolError            the upstream broke the wire format (SSE, JSON, sizes)
    ├── APIError                 (openai's name) anything the API did wrong
    │   └── UpstreamError        the upstream failed to give an answer
    │       ├── UpstreamStatusError  an HTTP error status; also an APIStatusError, and one of
    │       │   BadRequestError (400), AuthenticationError (401), PermissionDeniedError (403),
    │       │   NotFoundError (404), ConflictError (409), UnprocessableEntityError (422),
    │       │   RateLimitError (429), InternalServerError (>= 500) by its status
    │       ├── UpstreamStreamError  it reported an error inside a 200 stream
    │       ├── UpstreamConnectError the connection failed or was reset; an APIConnectionError
    │       ├── UpstreamTruncated    the stream ended before a finish_reason
    │       └── UpstreamTimeout      a stream timer fired (phase says which); an APITimeoutError
    ├── RetriesExhausted         every attempt failed (attempts; last error as __cause__); it
    │                            is also an instance of the last error's class, so
    │                            `except RateLimitError` catches "429 until we gave up"
    ├── ResumeError              a stream cannot be resumed (state expired, no id)
    ├── RateLimited              a local limit refused the call (retry_after_s)
    └── StoreError               a state store failed
        └── SessionNotFound      a conversation session does not exist (session_id)

Both kinds of `except` work: our typed classes (`except UpstreamTimeout`) and the names code
written for the official `openai` package uses (`except unbroken.RateLimitError`,
`except unbroken.APIConnectionError`); each status error carries `status_code`, `body`,
`response` and `request_id`, as openai's do.

Every error that ends a stream after part of the answer arrived carries it in `partial`, so
nothing the user already paid for is lost. Messages start lowercase, name the offending value
and, where useful, what to do next. They never contain API keys.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "ConflictError",
    "EncodeError",
    "InternalServerError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "RateLimited",
    "ResumeError",
    "RetriesExhausted",
    "SessionNotFound",
    "StoreError",
    "UnbrokenError",
    "UnprocessableEntityError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamStreamError",
    "UpstreamTimeout",
    "UpstreamTruncated",
    "retries_exhausted",
    "status_error_class",
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
    "unknown",
]


class APIError(UnbrokenError):
    """openai's base of the errors the API caused (named as in the `openai` package).

    Attributes:
        request: the `httpx.Request` that failed, when one was sent.
        body: the decoded JSON error body (or its text), when the API sent one.
    """

    request: Any = None
    body: Any = None

    @property
    def code(self) -> str | int | None:
        """The provider's `error.code` (openai's name)."""
        return getattr(self, "error_code", None)

    @property
    def type(self) -> str | None:
        """The provider's `error.type` (openai's name)."""
        return getattr(self, "error_type", None)

    @property
    def param(self) -> str | None:
        """The request parameter the provider named, if any (openai's name)."""
        body = self.body
        error = body.get("error") if isinstance(body, dict) else None
        param = error.get("param") if isinstance(error, dict) else None
        return param if isinstance(param, str) else None


class APIStatusError(APIError):
    """openai's name for an HTTP error status (see `UpstreamStatusError`).

    Attributes:
        status_code: the HTTP status.
        response: the `httpx.Response` (closed; headers and status remain), if any.
        request_id: the upstream's `x-request-id`, if it sent one.
    """

    status_code: int | None = None
    response: Any = None
    request_id: str | None = None


class APIConnectionError(APIError):
    """openai's name for a failed or broken connection (see `UpstreamConnectError`)."""


class APITimeoutError(APIConnectionError):
    """openai's name for a request that timed out (see `UpstreamTimeout`)."""


class UpstreamError(APIError):
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
        body: Any = None,
        response: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.status_code = status_code
        self.kind = kind
        self.error_type = error_type
        self.error_code = error_code
        self.retry_after_s = retry_after_s
        self.route = route
        self.body = body
        self.response = response
        self.request_id = request_id
        if response is not None:
            self.request = getattr(response, "_request", None)


class UpstreamStatusError(UpstreamError, APIStatusError):
    """The upstream answered with an HTTP error status; `status_code` says which. The
    instances raised are of the subclass named for the status (`RateLimitError`...)."""


class BadRequestError(UpstreamStatusError):
    """HTTP 400: the request was malformed or not allowed (openai's name)."""


class AuthenticationError(UpstreamStatusError):
    """HTTP 401: the API key is missing, wrong or revoked (openai's name)."""


class PermissionDeniedError(UpstreamStatusError):
    """HTTP 403: the key may not do this (openai's name)."""


class NotFoundError(UpstreamStatusError):
    """HTTP 404: no such model or path (openai's name)."""


class ConflictError(UpstreamStatusError):
    """HTTP 409 (openai's name)."""


class UnprocessableEntityError(UpstreamStatusError):
    """HTTP 422: the parameters were understood but invalid (openai's name)."""


class RateLimitError(UpstreamStatusError):
    """HTTP 429: the upstream's rate limit (openai's name; not our own `RateLimited`)."""


class InternalServerError(UpstreamStatusError):
    """HTTP 500 or above: the upstream failed or was overloaded (openai's name)."""


_STATUS_CLASSES: dict[int, type[UpstreamStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status: int | None) -> type[UpstreamStatusError]:
    """The error class for an HTTP status, as openai maps them (others: the base)."""
    if status is None:
        return UpstreamStatusError
    if status >= 500:
        return InternalServerError
    return _STATUS_CLASSES.get(status, UpstreamStatusError)


class UpstreamStreamError(UpstreamError):
    """The upstream reported an error object inside a stream that had started (HTTP 200)."""


class UpstreamConnectError(UpstreamError, APIConnectionError):
    """The connection failed, was refused or was reset."""


class UpstreamTruncated(UpstreamError):
    """The stream ended (EOF) before every choice had a finish_reason."""


TimeoutPhase = Literal["connect", "headers", "first_token", "idle", "deadline"]


class UpstreamTimeout(UpstreamError, APITimeoutError):
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
        # Not super(): in a combined class (see `retries_exhausted`) the next __init__ is
        # the last error's, whose arguments differ; its attributes are copied instead.
        UnbrokenError.__init__(self, message, partial=partial)
        self.attempts = attempts


_EXHAUSTED: dict[type[BaseException], type[RetriesExhausted]] = {}


def retries_exhausted(
    message: str, *, attempts: int, last: BaseException, partial: Any = None
) -> RetriesExhausted:
    """A RetriesExhausted that is also an instance of `last`'s class, with its attributes
    (status_code, body, response...), so code that catches openai's names
    (`except RateLimitError`) still catches "429 on every attempt". Chain it to `last`
    (`raise ... from last`)."""
    base = type(last)
    if not isinstance(last, APIError) or isinstance(last, RetriesExhausted):
        return RetriesExhausted(message, attempts=attempts, partial=partial)
    cls = _EXHAUSTED.get(base)
    if cls is None:
        # One combined class per error class, made once; its name stays "RetriesExhausted"
        # so tracebacks and logs read as before.
        cls = _EXHAUSTED[base] = type(
            "RetriesExhausted", (RetriesExhausted, base), {"__module__": __name__}
        )
    error = cls(message, attempts=attempts, partial=partial)
    for name, value in vars(last).items():
        if name not in ("message", "partial", "attempts") and not name.startswith("__"):
            setattr(error, name, value)
    return error


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


class SessionNotFound(StoreError):
    """A session store holds no session with this id.

    Attributes:
        session_id: the id asked for.
    """

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id[:80]!r}")
        self.session_id = session_id
