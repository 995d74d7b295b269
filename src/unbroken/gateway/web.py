"""The web front end the gateway serves: the chat page at `/`, the embeddable widget at
`/widget.js`, their static files under `/static/`, and `/ui/config.json` (how to sign in,
and the price table the page computes costs with).

The files ship inside the package (`gateway/static/`, no build step) and are read once at
start. The page is sent with a Content-Security-Policy that allows scripts, styles and
connections to this origin only, so even a sanitizer bypass in model output could neither
run an inline script nor send data elsewhere. Imports core.pricing, settings and gateway
siblings.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources

from unbroken.core.pricing import PriceTable
from unbroken.gateway.asgi import Exchange
from unbroken.gateway.problems import GatewayError

__all__ = ["CSP", "STATIC_PREFIX", "WebUI"]

STATIC_PREFIX = "/static/"
# The page's Content-Security-Policy: everything from this origin only, no inline script or
# style, no plugins, no <base> or form tricks, and the page never framed (the widget is not
# a frame: it runs in the shop's page, in a shadow root).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'; object-src 'none'"
)
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".html": b"text/html; charset=utf-8",
    ".json": b"application/json",
    ".svg": b"image/svg+xml",
    ".md": b"text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: bytes
    etag: bytes


def _load_static() -> dict[str, _File]:
    """Every file under gateway/static/, by its path relative to it (`vendor/x.js`)."""
    files: dict[str, _File] = {}
    root = resources.files("unbroken.gateway") / "static"

    def walk(node: resources.abc.Traversable, prefix: str) -> None:
        for child in node.iterdir():
            name = prefix + child.name
            if child.is_dir():
                walk(child, name + "/")
                continue
            body = child.read_bytes()
            suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
            kind = _TYPES.get(suffix)
            if kind is None:
                guessed = mimetypes.guess_type(child.name)[0] or "text/plain; charset=utf-8"
                kind = guessed.encode()
            etag = b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'
            files[name] = _File(body, kind, etag)

    walk(root, "")
    return files


class WebUI:
    """Serves the chat page, the widget and their files (read from the package once).

    Args:
        models: the served model ids (for the price table).
        auth_required: whether API requests need a key or a widget token.
    """

    def __init__(self, models: frozenset[str], *, auth_required: bool) -> None:
        self._files = _load_static()
        prices = PriceTable()
        table = {}
        for model in sorted(models):
            price = prices.price(model)
            if price is not None:
                table[model] = {
                    "cache_hit": price.cache_hit,
                    "cache_miss": price.cache_miss,
                    "output": price.output,
                }
        self._config = {
            "auth": "token" if auth_required else "none",
            "prices_usd_per_million": table,
        }

    @staticmethod
    def handles(path: str) -> bool:
        """True for the paths this module answers."""
        return path in ("/", "/index.html", "/widget.js", "/ui/config.json") or path.startswith(
            STATIC_PREFIX
        )

    async def handle(self, ex: Exchange, method: str, path: str) -> None:
        """Answer a GET or HEAD of the page, the widget, a static file or the UI config."""
        if method not in ("GET", "HEAD"):
            raise GatewayError(
                405,
                f"method {method} is not allowed on {path[:200]}; use GET",
                code="method_not_allowed",
                headers=[(b"allow", b"GET, HEAD")],
            )
        if path == "/ui/config.json":
            await ex.respond_json(200, self._config)
            return
        if path in ("/", "/index.html"):
            name = "chat.html"
        elif path == "/widget.js":
            name = "widget.js"
        else:
            name = path[len(STATIC_PREFIX) :]
        found = self._files.get(name)
        if found is None:
            raise GatewayError(
                404, f"no such file: {path[:200]}", type="not_found_error", code="not_found"
            )
        headers = [*_SECURITY_HEADERS, (b"etag", found.etag), (b"cache-control", b"no-cache")]
        if name.endswith(".html"):
            headers.append((b"content-security-policy", CSP.encode()))
        else:
            # Public files, fetched by the widget from a shop's page (module scripts are
            # always loaded in CORS mode); no credentials are involved.
            if not any(name == b"access-control-allow-origin" for name, _ in ex.headers_out):
                headers.append((b"access-control-allow-origin", b"*"))
        if ex.header(b"if-none-match") == found.etag:
            await ex.start(304, headers)
            await ex.send({"type": "http.response.body", "body": b""})
            return
        body = b"" if method == "HEAD" else found.body
        await ex.respond(200, body, found.content_type, headers)
