"""Who may call a gateway that has no keys, and what a request body may be.

Without gateway keys, anything that can reach the port can spend the upstream credit, and
on loopback that includes every web page the machine's browser opens: a cross-site POST
(an HTML form sends `text/plain` without a preflight) or a DNS-rebound name that points
at 127.0.0.1. So in no-key mode:
  * on a loopback bind, the `Host` must be a loopback name (defeats DNS rebinding);
  * a browser's `Origin` must be the gateway's own or one in `cors_origins`;
  * a request body must be declared `application/json`, and a declared type must be
    JSON (a simple cross-site request can only send form or text types).
In every mode, a body with a `Content-Encoding` the gateway does not decode is refused
(415) rather than read as JSON. Imports gateway siblings and settings.
"""

from __future__ import annotations

import ipaddress

from unbroken.gateway.asgi import Scope
from unbroken.gateway.problems import GatewayError
from unbroken.settings import GatewaySettings

__all__ = ["RequestPolicy", "is_loopback_host"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, `*.localhost`, 127.0.0.0/8 and ::1, with or without a port."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    else:
        name = host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _check_encoding(encoding: str) -> None:
    """Refuse a body encoding the gateway does not decode."""
    if encoding.strip().lower() not in ("", "identity"):
        raise GatewayError(
            415,
            f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed",
            code="unsupported_content_encoding",
        )


class RequestPolicy:
    """Checks a request's Host, Origin and body headers before it is routed.

    Args:
        settings: the gateway settings (host, cors_origins).
        keys_required: whether requests must carry a gateway key (no-key mode when False).
    """

    def __init__(self, settings: GatewaySettings, *, keys_required: bool) -> None:
        self.is_open = not keys_required
        self._check_host = self.is_open and settings.is_loopback
        self._origins = frozenset(settings.cors_origins)

    def check(self, scope: Scope, by_name: dict[bytes, bytes] | None = None) -> None:
        """Refuse the request if it breaks the policy (`by_name`: the scope's headers by
        name, when made already).

        Raises:
            GatewayError: 403 for a foreign Host or Origin, 415 for a body that is not
                declared JSON (no-key mode) or is encoded.
        """
        if not self.is_open:
            # With keys only the body's encoding is checked: one lookup (this runs before
            # every request).
            if by_name is None:
                by_name = dict(scope.get("headers", ()))
            raw = by_name.get(b"content-encoding")  # the last one, as below
            if raw is not None:
                _check_encoding(raw.decode("latin-1"))
            return
        host = origin = content_type = encoding = None
        has_body = False
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-encoding":
                encoding = value.decode("latin-1")
            elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                has_body = True
        if encoding is not None:
            _check_encoding(encoding)
        if self._check_host and (host is None or not is_loopback_host(host)):
            raise GatewayError(
                403,
                f"Host {(host or '')[:100]!r} is not a loopback name; a gateway without keys "
                "answers only to localhost (configure gateway keys to serve other names)",
                type="permission_error",
                code="host_not_allowed",
            )
        if origin is not None and not self._origin_ok(origin, host):
            raise GatewayError(
                403,
                f"origin {origin[:100]!r} may not call a gateway without keys; add it to "
                "gateway.cors_origins or configure gateway keys",
                type="permission_error",
                code="origin_not_allowed",
            )
        # A cross-site form always declares its (non-JSON) type, even with no body.
        declared = content_type is not None and content_type.strip() != ""
        if scope.get("method") in _BODY_METHODS and (
            (declared and not _is_json(content_type)) or (has_body and not declared)
        ):
            raise GatewayError(
                415,
                f"the body must be sent as Content-Type: application/json, got "
                f"{(content_type or 'none')[:60]!r}",
                code="unsupported_media_type",
            )

    def host_ok(self, scope: Scope) -> bool:
        """False when no-key mode on loopback meets a foreign `Host` (WebSockets are
        checked here; their Origin is checked by the socket handler)."""
        if not self._check_host:
            return True
        host = dict(scope.get("headers", ())).get(b"host")
        return host is not None and is_loopback_host(host.decode("latin-1"))

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        if "*" in self._origins or origin in self._origins:
            return True
        # The gateway's own pages (the web chat) call it from its own origin.
        _, sep, authority = origin.partition("://")
        return bool(sep) and host is not None and authority.lower() == host.lower()


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
