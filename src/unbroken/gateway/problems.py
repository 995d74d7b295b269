"""The gateway's errors and their OpenAI-shaped bodies: `{"error": {message, type, param,
code}}`, and the one table that maps `unbroken` errors to an HTTP status (h11's
`error_status_hint` idea). Messages never carry upstream keys or upstream auth details.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import msgspec

from unbroken.errors import (
    ConfigError,
    InvalidRequestError,
    ProtocolError,
    RateLimited,
    RetriesExhausted,
    StoreError,
    UnbrokenError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from unbroken.gateway.upstream import UpstreamCertificateError

__all__ = ["GatewayError", "Scrubber", "error_body", "from_unbroken"]


class GatewayError(Exception):
    """An error the gateway answers with; the body is OpenAI-shaped.

    Attributes:
        status: the HTTP status.
        message: what went wrong and, where useful, what to do.
        type: `invalid_request_error`, `authentication_error`, `permission_error`,
            `not_found_error`, `rate_limit_error`, `upstream_error`, `server_error`.
        code: a stable machine-readable code (`model_not_found`, `rate_limit_exceeded`...).
        param: the request field at fault, if any.
        retry_after_s: sent as `Retry-After` (whole seconds, rounded up).
        extra_headers: more response headers.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra_headers = headers or []
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        """The JSON body."""
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers (`Retry-After`, `Allow`...)."""
        if self.retry_after_s is None:
            return list(self.extra_headers)
        seconds = max(1, math.ceil(min(self.retry_after_s, 86400.0)))
        return [(b"retry-after", str(seconds).encode()), *self.extra_headers]


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}` as JSON bytes."""
    return msgspec.json.encode(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    )


class Scrubber:
    """Removes secrets from text that leaves the gateway: the upstream keys themselves,
    DeepSeek's `****abcd` key tails and anything shaped like an `sk-` key."""

    _PATTERNS = (re.compile(r"\*{2,}[A-Za-z0-9_-]{1,12}"), re.compile(r"sk-[A-Za-z0-9_-]{6,}"))

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        """`text` without secrets."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        for pattern in self._PATTERNS:
            text = pattern.sub("***", text)
        return text


def _root(exc: BaseException) -> BaseException:
    seen = 0
    while isinstance(exc, RetriesExhausted) and exc.__cause__ is not None and seen < 10:
        exc = exc.__cause__
        seen += 1
    return exc


def from_unbroken(exc: UnbrokenError, scrub: Scrubber) -> GatewayError:
    """The gateway error for an SDK error (the status table).

    Upstream 400/404/422 are the caller's to fix and keep the upstream's message; upstream
    401/402/403 are the operator's (a bad or empty upstream key) and say nothing about it;
    everything transient becomes 502/503/504 after the SDK's own retries.
    """
    prefix = f"after {exc.attempts} attempts: " if isinstance(exc, RetriesExhausted) else ""
    root = _root(exc)
    if isinstance(root, UpstreamStatusError):
        status = root.status_code or 502
        route = f" (route {root.route!r})" if root.route else ""
        if status in (401, 403):
            return GatewayError(
                502,
                f"the upstream refused the gateway's credentials{route}; "
                "the gateway operator must fix the upstream key",
                type="upstream_error",
                code="upstream_auth_failed",
            )
        if status == 402:
            return GatewayError(
                503,
                f"the upstream account has insufficient balance{route}",
                type="upstream_error",
                code="upstream_insufficient_balance",
            )
        if status == 429:
            return GatewayError(
                429,
                prefix + scrub(root.message),
                type="rate_limit_error",
                code="upstream_rate_limited",
                retry_after_s=root.retry_after_s or 1.0,
            )
        if 400 <= status < 500:
            code = root.kind if root.kind != "unknown" else "upstream_rejected"
            return GatewayError(
                400 if status not in (404, 413, 422) else status,
                prefix + scrub(root.message),
                code=code,
            )
        return GatewayError(
            502, prefix + scrub(root.message), type="upstream_error", code="upstream_error"
        )
    if isinstance(root, UpstreamTimeout):
        return GatewayError(
            504,
            prefix + scrub(root.message),
            type="upstream_error",
            code=f"upstream_timeout_{root.phase}",
        )
    if isinstance(root, UpstreamCertificateError):
        return GatewayError(
            502, scrub(root.message), type="upstream_error", code="upstream_certificate_invalid"
        )
    if isinstance(root, UpstreamError | ProtocolError):
        return GatewayError(
            502, prefix + scrub(root.message), type="upstream_error", code="upstream_error"
        )
    if isinstance(root, InvalidRequestError):
        return GatewayError(400, scrub(root.message), code="invalid_request")
    if isinstance(root, RateLimited):
        return GatewayError(
            429,
            scrub(root.message),
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after_s=root.retry_after_s,
        )
    if isinstance(root, StoreError):
        return GatewayError(
            503,
            "the gateway's state store is unavailable; try again shortly",
            type="server_error",
            code="store_unavailable",
            retry_after_s=1.0,
        )
    if isinstance(root, ConfigError):
        return GatewayError(500, scrub(root.message), type="server_error", code="config_error")
    return GatewayError(
        502, prefix + scrub(str(root)), type="upstream_error", code="upstream_error"
    )
