"""httpx plumbing shared by Client and AsyncClient: headers, error mapping, error bodies.

Callers never see an httpx exception from our API: `map_transport_error` turns each into
ours at this boundary (httpx `map_httpcore_exceptions` style).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Mapping

import httpx

from unbroken.core.backoff import kind_of_status, parse_retry_after
from unbroken.core.routes import Route
from unbroken.core.wire import decode_error_body
from unbroken.errors import (
    UnbrokenError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeout,
)

__all__ = [
    "MAX_ERROR_BODY_BYTES",
    "USER_AGENT",
    "map_transport_error",
    "request_headers",
    "status_error",
]

# Error bodies are read only this far: an HTML page from a proxy can be large, and nothing
# past the first lines helps (protocol.md §4).
MAX_ERROR_BODY_BYTES = 64 * 1024
USER_AGENT = "unbroken/0.1"


def request_headers(route: Route, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers for a request on `route`. The key goes only into Authorization."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream, application/json",
        # The body is read raw into the SSE decoder: a compressed stream must not arrive.
        "Accept-Encoding": "identity",
        "User-Agent": USER_AGENT,
    }
    headers.update(route.headers)
    if extra:
        headers.update(extra)
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key}"
    return headers


def status_error(
    route: Route, status: int, headers: httpx.Headers, body: bytes
) -> UpstreamStatusError:
    """The typed error for an HTTP error response (body already read, bounded)."""
    error = decode_error_body(body)
    retry_after = parse_retry_after(
        headers.get("retry-after"), headers.get("retry-after-ms"), now_epoch=time.time()
    )
    message = error.message or f"HTTP {status}"
    return UpstreamStatusError(
        f"route {route.name!r} answered HTTP {status}: {message}",
        status_code=status,
        kind=kind_of_status(status, message, error.code),
        error_type=error.type,
        error_code=error.code,
        retry_after_s=retry_after,
        route=route.name,
    )


def map_transport_error(exc: Exception, route: Route, *, got_headers: bool) -> UnbrokenError:
    """Our error for an httpx exception raised while talking to `route`."""
    name = route.name
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamTimeout(
            f"timed out connecting to route {name!r}", phase="connect", timeout_s=0.0, route=name
        )
    if isinstance(exc, httpx.TimeoutException) and not got_headers:
        return UpstreamTimeout(
            f"timed out waiting for response headers from route {name!r}",
            phase="headers",
            timeout_s=0.0,
            route=name,
        )
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(
            f"cannot connect to route {name!r}: {_reason(exc)}",
            kind="unreachable" if _is_permanent(exc) else "server_error",
            route=name,
        )
    return UpstreamConnectError(
        f"connection to route {name!r} failed{' mid-stream' if got_headers else ''}: "
        f"{_reason(exc)}",
        kind="server_error",
        route=name,
    )


# Connection failures that retrying the same route cannot fix: a certificate that does not
# verify, a host name that does not resolve.
_PERMANENT_MARKS = (
    "certificate verify failed",
    "certificate_verify_failed",
    "name or service not known",
    "nodename nor servname",
    "no address associated with hostname",
    "name does not resolve",
    "getaddrinfo failed",
)


def _is_permanent(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if isinstance(current, socket.gaierror):
            # EAI_AGAIN ("temporary failure in name resolution") may heal; the rest will not.
            return current.errno != socket.EAI_AGAIN
        if any(mark in str(current).lower() for mark in _PERMANENT_MARKS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: Exception) -> str:
    # httpx messages name the URL at most, never headers, so no key can leak through them.
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
