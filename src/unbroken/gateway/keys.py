"""Who is calling: gateway API keys (hashed; from settings or the store) -> a `Caller`.

Keys are compared by their SHA-256, so the gateway never holds them in clear. Imports
settings, stores and gateway siblings.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unbroken.gateway.problems import GatewayError
from unbroken.settings import GatewaySettings, KeySettings, LimitSettings
from unbroken.stores.base import Store

__all__ = ["ANONYMOUS", "Caller", "KeyRing"]

# SHA-256 for the per-request key lookup: CPython's own implementation when present (it is
# `hash_key`'s digest, ~3 us a request cheaper than OpenSSL's in the serving process), else
# hashlib's.
_sha256: Callable[[bytes], Any]
try:
    from _sha2 import sha256 as _sha256  # type: ignore[import-not-found,no-redef,unused-ignore]  # CPython >= 3.12
except ImportError:  # pragma: no cover - by Python version
    try:
        from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,no-redef,unused-ignore]  # CPython 3.11
    except ImportError:
        _sha256 = hashlib.sha256


def key_digest(key: str) -> str:
    """`settings.hash_key(key)`: the hex SHA-256 of the key's UTF-8 bytes."""
    return str(_sha256(key.encode("utf-8")).hexdigest())


# Store lookups (hits and misses) are cached `gateway.key_cache_s`, so a flood of bad keys
# costs the store one read per key per interval, and a revoked key stops working within it.
CACHE_MAX = 10_000


_NO_LIMITS = LimitSettings()


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity a request is served and limited under.

    Attributes:
        id: the store namespace of its limits (`k:<hash prefix>` or `anonymous`).
        name: the key's label, for logs and error messages (never the key).
        limits: its effective limits.
        models: the models it may use (None: all served models).
        role: `user`, or `admin` (reads every key's usage); the anonymous caller of a
            gateway without keys is an admin.
        unlimited: no limit is set (each of `limits` is None): worked out once per
            caller, so that its requests need not ask the limiter (which admits them
            without the store and never refuses them).
    """

    id: str
    name: str
    limits: LimitSettings
    models: tuple[str, ...] | None = None
    role: str = "user"
    unlimited: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unlimited", self.limits == _NO_LIMITS)


ANONYMOUS_NAME = "anonymous"
ANONYMOUS = Caller("anonymous", ANONYMOUS_NAME, LimitSettings(), role="admin")


class KeyRing:
    """Authenticates requests against the configured keys and, optionally, the store.

    Args:
        settings: the gateway settings (keys, default limits, `keys_in_store`).
        store: where stored keys live.
        widget: turns a widget token (a JWT) into its caller, or raises a 401
            (`WidgetTokens.caller`); None when widget tokens are not configured.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        store: Store,
        widget: Callable[[str], Caller] | None = None,
    ) -> None:
        self._widget = widget
        self._defaults = settings.limits
        self._keys = {k.sha256: k for k in settings.keys}
        self._store = store if settings.keys_in_store else None
        self._cache_s = settings.key_cache_s
        self._cache: dict[str, tuple[float, Caller | None]] = {}
        self._anonymous = Caller("anonymous", ANONYMOUS_NAME, settings.limits, role="admin")
        # Callers are frozen: one per configured key, not one per request (merging the
        # limits cost ~5 us a request).
        self._callers = {digest: self._caller(key) for digest, key in self._keys.items()}
        self._required = bool(self._keys) or self._store is not None or widget is not None

    @property
    def required(self) -> bool:
        """True when requests must carry a gateway key."""
        return self._required

    def _caller(self, key: KeySettings) -> Caller:
        return Caller(
            f"k:{key.sha256[:24]}",
            key.name,
            key.limits.over(self._defaults),
            key.models,
            key.role,
        )

    async def identify(self, authorization: bytes | None) -> Caller:
        """The caller of a request with this `Authorization` header.

        Raises:
            GatewayError: 401 when a key is required and missing or unknown.
        """
        if not self._required:
            return self._anonymous
        scheme, _, token = (authorization or b"").decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(
                401,
                "missing gateway API key: send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="missing_api_key",
            )
        if self._widget is not None and token.count(".") == 2 and token.startswith("eyJ"):
            return self._widget(token)  # a JWT: a widget token, never a gateway key
        # (`key_digest`, without its call.)
        digest: str = _sha256(token.encode("utf-8")).hexdigest()
        caller = self._callers.get(digest)
        if caller is None and self._store is not None:
            caller = await self._lookup(digest)
        if caller is None:
            raise GatewayError(
                401,
                "invalid gateway API key; check the key or ask the gateway operator for one",
                type="authentication_error",
                code="invalid_api_key",
            )
        return caller

    async def _lookup(self, digest: str) -> Caller | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        assert self._store is not None  # noqa: S101 - checked by the caller
        key = await self._store.get_key(digest)
        caller = None if key is None else self._caller(key)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (now + self._cache_s, caller)
        return caller
