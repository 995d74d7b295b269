"""DeepSeek-shaped error responses of the mock: the JSON bodies of protocol.md §1.9 and the
nginx HTML pages that proxies in front of it send (TV29). Imports only the standard library.
"""

from __future__ import annotations

import json

__all__ = [
    "ApiError",
    "auth_error",
    "content_filter_error",
    "context_length_error",
    "error_body",
    "insufficient_balance_error",
    "invalid",
    "nginx_page",
    "refusal",
    "unprocessable",
]


def error_body(message: str, type_: str, code: str | None = "invalid_request_error") -> bytes:
    """`{"error":{"message","type","param":null,"code"}}` as DeepSeek sends it."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


class ApiError(Exception):
    """An HTTP error response: status, headers and body, ready to send.

    Attributes:
        status: the HTTP status.
        body: the response body.
        content_type: its Content-Type.
        headers: extra headers (`Retry-After`).
        kind: a short label for the request log (`invalid`, `auth`, a fault kind...).
    """

    def __init__(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        headers: tuple[tuple[bytes, bytes], ...] = (),
        kind: str = "invalid",
    ) -> None:
        super().__init__(body.decode("utf-8", "replace")[:200])
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.kind = kind


def invalid(message: str) -> ApiError:
    """400 Invalid Format: the body cannot be read as a request (protocol.md §1.9)."""
    return ApiError(400, error_body(message, "invalid_request_error"))


def unprocessable(message: str) -> ApiError:
    """422 Invalid Parameters: a field has a wrong type or is out of range."""
    return ApiError(422, error_body(message, "invalid_request_error"))


def auth_error(message: str) -> ApiError:
    """401 with DeepSeek's `authentication_error` body."""
    return ApiError(401, error_body(message, "authentication_error"), kind="auth")


def insufficient_balance_error() -> ApiError:
    """402 with DeepSeek's observed body."""
    return ApiError(402, error_body("Insufficient Balance", "unknown_error"), kind="402")


def context_length_error(limit: int, n_prompt: int, n_completion: int) -> ApiError:
    """400 for a prompt plus max_tokens over the context window (DeepSeek's wording)."""
    message = (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{n_prompt + n_completion} tokens ({n_prompt} in the messages, {n_completion} in the "
        "completion). Please reduce the length of the messages or completion."
    )
    return ApiError(400, error_body(message, "invalid_request_error"), kind="context_length")


def content_filter_error() -> ApiError:
    """400 for a prompt the content filter refuses (DeepSeek's observed message)."""
    return ApiError(
        400, error_body("Content Exists Risk", "invalid_request_error"), kind="content_filter"
    )


_NGINX_TITLES = {
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}


def nginx_page(status: int) -> bytes:
    """The HTML page nginx sends for 502/503/504 (protocol.md TV29), CRLF line ends."""
    title = _NGINX_TITLES[status]
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


_JSON_REFUSALS: dict[int, tuple[str, str, str | None]] = {
    400: (
        "Invalid request (injected by the mock)",
        "invalid_request_error",
        "invalid_request_error",
    ),
    401: ("Authentication Fails (no such user)", "authentication_error", "invalid_request_error"),
    422: (
        "Invalid parameters (injected by the mock)",
        "invalid_request_error",
        "invalid_request_error",
    ),
    429: ("Rate limit reached for requests", "rate_limit_error", "rate_limit_exceeded"),
    500: ("Internal server error", "server_error", "internal_error"),
    502: ("Bad gateway", "server_error", "bad_gateway"),
    503: ("Server overloaded, please try again later", "server_error", "server_overloaded"),
    504: ("Gateway timeout", "server_error", "gateway_timeout"),
}


def refusal(kind: str, *, retry_after: str | None = None, body: str | None = None) -> ApiError:
    """The error response of a refusal fault (`429`, `503 body=json`, `402`, ...)."""
    if kind == "402":
        return insufficient_balance_error()
    if kind == "context_length":
        return context_length_error(131072, 140000, 4096)
    if kind == "content_filter":
        return content_filter_error()
    status = int(kind)
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if retry_after is not None:
        headers = ((b"retry-after", retry_after.encode()),)
    style = body or ("html" if status in _NGINX_TITLES else "json")
    if style == "html" and status in _NGINX_TITLES:
        return ApiError(
            status,
            nginx_page(status),
            content_type=b"text/html",
            headers=headers,
            kind=kind,
        )
    message, type_, code = _JSON_REFUSALS[status]
    return ApiError(status, error_body(message, type_, code), headers=headers, kind=kind)
