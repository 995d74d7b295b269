"""Widget tokens: short-lived JWTs that a shop's backend mints for one shopper, so the chat
widget never holds a gateway key. Verified with a shared HS256 secret or the public keys of
a JWKS file; each subject (`sub`) is its own caller with its own limits and sessions.

Imports PyJWT (the `gateway` extra), settings and gateway siblings.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import jwt

from unbroken.errors import ConfigError
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.settings import GatewaySettings

__all__ = ["WidgetTokens"]

# Clock skew tolerated between the shop's backend and the gateway (RFC 7519 §4.1.4 allows
# "some small leeway").
LEEWAY_S = 30
_ASYMMETRIC = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


def _invalid(reason: str) -> GatewayError:
    return GatewayError(
        401,
        f"invalid widget token: {reason}; the shop's backend must mint a new one",
        type="authentication_error",
        code="invalid_widget_token",
    )


class WidgetTokens:
    """Verifies widget tokens and turns their subject into a `Caller`.

    Args:
        settings: the gateway settings (`widget_*`); `limits` fills unset widget limits.

    Raises:
        ConfigError: the JWKS file cannot be read or holds no usable key.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self._secret = settings.widget_secret
        self._issuer = settings.widget_issuer
        self._audience = settings.widget_audience
        self._max_ttl_s = settings.widget_max_ttl_s
        self._limits = settings.widget_limits.over(settings.limits)
        self._keys: dict[str | None, Any] = {}
        if settings.widget_jwks:
            self._load_jwks(settings.widget_jwks)

    def _load_jwks(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            keys = jwt.PyJWKSet.from_dict(data).keys
        except OSError as exc:
            raise ConfigError(f"cannot read gateway.widget_jwks {path!r}: {exc.strerror}") from None
        except (ValueError, jwt.PyJWTError) as exc:
            raise ConfigError(f"gateway.widget_jwks {path!r} is not a usable JWKS: {exc}") from None
        for key in keys:
            self._keys[key.key_id] = key

    def caller(self, token: str) -> Caller:
        """The caller a widget token stands for.

        Raises:
            GatewayError: 401 naming what is wrong (bad signature, expired, too long-lived,
                no subject, wrong issuer or audience).
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("not a JWT") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm == "HS256" and self._secret:
            key, algorithms = self._secret, ["HS256"]
        elif algorithm in _ASYMMETRIC and self._keys:
            jwk = self._keys.get(header.get("kid")) or (
                next(iter(self._keys.values())) if len(self._keys) == 1 else None
            )
            if jwk is None:
                raise _invalid(f"unknown key id {str(header.get('kid'))[:40]!r}")
            key, algorithms = jwk.key, [algorithm]
        else:
            raise _invalid(f"algorithm {str(algorithm)[:20]!r} is not accepted here")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("it has expired") from None
        except jwt.PyJWTError as exc:
            raise _invalid(str(exc).rstrip(".")) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise _invalid("`sub` must be a non-empty string")
        if claims["exp"] - time.time() > self._max_ttl_s + LEEWAY_S:
            raise _invalid(
                f"it lives longer than the {self._max_ttl_s:g} s allowed (gateway.widget_max_ttl_s)"
            )
        issuer = claims.get("iss") if isinstance(claims.get("iss"), str) else ""
        digest = hashlib.sha256(f"{issuer}\x00{subject}".encode()).hexdigest()
        return Caller(f"w:{digest[:24]}", f"widget:{subject[:64]}", self._limits)
