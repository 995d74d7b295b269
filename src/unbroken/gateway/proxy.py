"""Upstream proxies for `LeanTransport`: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
`NO_PROXY`, as curl and httpx read them.

An https upstream is reached through an HTTP CONNECT tunnel (RFC 9110 §9.3.6), and TLS to
the upstream runs inside it, so the proxy never sees the request. A plain-http upstream is
sent to the proxy in absolute form (RFC 9112 §3.2.2). `NO_PROXY` lists hosts, domains
(`.example.com` or `example.com` covers subdomains), `host:port`, or `*`. Credentials in a
proxy URL become a `Proxy-Authorization: Basic` header; they are never logged or shown in
an error. Imports httpx and the standard library.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx

from unbroken.errors import ConfigError

__all__ = ["Proxy", "ProxyConfig", "open_tunnel"]

# The largest CONNECT response head accepted; a real one is a few dozen bytes.
MAX_CONNECT_HEAD = 16 * 1024


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: where it listens and the Proxy-Authorization to send, if any."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, variable: str) -> Proxy:
        """Read a proxy URL (`http://[user:password@]host[:port]`).

        Raises:
            ConfigError: the URL is not an http:// proxy URL; names the variable.
        """
        raw = url if "://" in url else f"http://{url}"
        parts = urlsplit(raw)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(
                f"{variable} must be an http://host:port proxy URL (https and socks proxies "
                f"are not supported), got scheme {parts.scheme!r}"
            )
        try:
            port = parts.port or 80
        except ValueError:
            raise ConfigError(f"{variable} has a malformed port") from None
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = b"Basic " + base64.b64encode(pair.encode())
        return cls(parts.hostname, port, authorization)

    @property
    def label(self) -> str:
        """`host:port`, for error messages (never the credentials)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Which proxy each upstream URL goes through."""

    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyConfig:
        """From `Settings.proxy_env` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY).

        Raises:
            ConfigError: a proxy URL is malformed.
        """
        every = env.get("ALL_PROXY")
        https = env.get("HTTPS_PROXY") or every
        http = env.get("HTTP_PROXY") or every
        no_proxy = tuple(
            part.strip().lower() for part in env.get("NO_PROXY", "").split(",") if part.strip()
        )
        return cls(
            Proxy.parse(https, "HTTPS_PROXY") if https else None,
            Proxy.parse(http, "HTTP_PROXY") if http else None,
            no_proxy,
        )

    def select(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for `scheme://host:port`, or None to connect directly."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self._bypass(host.lower(), port):
            return None
        return proxy

    def _bypass(self, host: str, port: int) -> bool:
        for entry in self.no_proxy:
            if entry == "*":
                return True
            name, _, entry_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
            if entry_port and entry_port != str(port):
                continue
            name = name.strip("[]")
            if "/" in name:
                try:
                    if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            domain = name.lstrip(".")
            if host == domain or host.endswith("." + domain):
                return True
        return False


def _has_port(entry: str) -> bool:
    # `host:port` or `[v6]:port`; a bare IPv6 address has colons but no port.
    if entry.startswith("["):
        return "]:" in entry
    return entry.count(":") == 1


class _TunnelReply(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, up to the blank line."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head = b""
        self.done: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0 and not self.done.done():
            self.done.set_result(self.head[: end + 4])
        elif len(self.head) > MAX_CONNECT_HEAD and not self.done.done():
            self.done.set_exception(httpx.ProxyError("the proxy's CONNECT reply is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                httpx.ProxyError("the proxy closed the connection during CONNECT")
            )


async def open_tunnel(
    proxy: Proxy, host: str, port: int, timeout_s: float | None
) -> asyncio.Transport:
    """A connection to `host:port` through `proxy` (CONNECT, 2xx), ready for TLS.

    Args:
        proxy: the proxy.
        host: the upstream's host, ASCII (IDNA-encoded).
        port: the upstream's port.
        timeout_s: connect timeout for the whole exchange with the proxy.

    Raises:
        httpx.ConnectError, httpx.ConnectTimeout: the proxy is unreachable.
        httpx.ProxyError: the proxy refused the tunnel (its status is in the message).
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            transport, reply = await loop.create_connection(
                lambda: _TunnelReply(loop), proxy.host, proxy.port
            )
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            lines = [f"CONNECT {target} HTTP/1.1".encode(), f"Host: {target}".encode()]
            if proxy.authorization is not None:
                lines.append(b"Proxy-Authorization: " + proxy.authorization)
            transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
            try:
                head = await reply.done
            except BaseException:
                transport.abort()
                raise
    except TimeoutError:
        raise httpx.ConnectTimeout(f"timed out connecting through proxy {proxy.label}") from None
    except OSError as exc:
        raise httpx.ConnectError(
            f"cannot connect to proxy {proxy.label}: {exc.strerror or exc}"
        ) from None
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or not 200 <= int(parts[1]) < 300:
        transport.abort()
        shown = status_line[:100].decode("latin-1", "replace")
        raise httpx.ProxyError(f"proxy {proxy.label} refused CONNECT to {host}:{port}: {shown}")
    return transport
