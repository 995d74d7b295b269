"""The answer cache's admin endpoints: forget cached answers (admin keys only).

    DELETE /v1/cache/entries/{key}     one entry, by its key (`v1:<sha256 hex>`)
    POST   /v1/cache/invalidate        the entry of a chat request (the body, as sent to
                                       /v1/chat/completions: its normalized key; only
                                       `model` and `messages` are checked, since a
                                       request for a model no longer served may still
                                       have an entry)
    DELETE /v1/cache?model=<name>      every entry of a model (of every model without it)

Each answers `{"object": "cache.invalidation", "scope": ..., "deleted": n}`. A user key gets
403 `admin_required`; a gateway without an answer cache answers 404 `cache_disabled`.
Imports gateway siblings only.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from unbroken.core.cache import cache_key
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import decode_json

if TYPE_CHECKING:
    from unbroken.gateway.app import Gateway
    from unbroken.gateway.asgi import Exchange

__all__ = ["CACHE_PATH", "CacheAdmin"]

CACHE_PATH = "/v1/cache"
_ENTRIES = CACHE_PATH + "/entries/"
_INVALIDATE = CACHE_PATH + "/invalidate"
# What core.cache.cache_key makes: a version, a colon, a SHA-256 in hex.
_KEY = re.compile(r"v[0-9]{1,4}:[0-9a-f]{64}")
# Model names are short; a longer one is a mistake, not a model.
_MAX_MODEL_CHARS = 256


class CacheAdmin:
    """Serves the admin endpoints above for `gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def __repr__(self) -> str:
        return f"CacheAdmin(enabled={self._gateway.cache is not None})"

    @staticmethod
    def handles(path: str) -> bool:
        """Is `path` one of the cache's admin paths?"""
        return path == CACHE_PATH or path.startswith(CACHE_PATH + "/")

    async def handle(self, ex: Exchange, method: str, path: str) -> None:
        """Answer one admin request.

        Raises:
            GatewayError: 404 (no such path, or no answer cache), 405, 401, 403
                `admin_required`, 400 for a malformed key, model or body.
            StoreError: the cache's backend failed (the gateway answers 503).
        """
        if path == CACHE_PATH:
            allowed = "DELETE"
        elif path == _INVALIDATE:
            allowed = "POST"
        elif path.startswith(_ENTRIES) and "/" not in path[len(_ENTRIES) :]:
            allowed = "DELETE"
        else:
            raise GatewayError(
                404,
                f"no such endpoint: {method} {path[:200]}; see GET /openapi.json",
                type="not_found_error",
                code="not_found",
            )
        if method != allowed:
            raise GatewayError(
                405,
                f"method {method} is not allowed on {path[:200]}; use {allowed}",
                code="method_not_allowed",
                headers=[(b"allow", allowed.encode())],
            )
        gateway = self._gateway
        caller = await gateway.keys.identify(ex.header(b"authorization"))
        if caller.role != "admin":
            raise GatewayError(
                403,
                f"key {caller.name!r} may not invalidate cached answers; use an admin key",
                type="permission_error",
                code="admin_required",
            )
        cache = gateway.cache
        if cache is None:
            raise GatewayError(
                404,
                "this gateway has no answer cache ([gateway.cache] store is not set)",
                type="not_found_error",
                code="cache_disabled",
            )
        result: dict[str, Any]
        if path == _INVALIDATE:
            raw = await ex.read_body(gateway.settings.gateway.max_body_bytes)
            key = cache_key(_chat_body(raw))
            deleted = await cache.invalidate_key(key, "request")
            result = {"scope": "request", "key": key, "deleted": deleted}
        elif path == CACHE_PATH:
            model = _model_param(ex)
            if model is None:
                result = {"scope": "all", "deleted": await cache.invalidate_all()}
            else:
                deleted = await cache.invalidate_model(model)
                result = {"scope": "model", "model": model, "deleted": deleted}
        else:
            key = path[len(_ENTRIES) :]
            if not _KEY.fullmatch(key):
                raise GatewayError(
                    400,
                    f"{key[:80]!r} is not a cache key; keys look like 'v1:' and 64 hex "
                    "digits (POST /v1/cache/invalidate finds a request's)",
                    code="invalid_value",
                    param="key",
                )
            deleted = await cache.invalidate_key(key, "key")
            result = {"scope": "key", "key": key, "deleted": deleted}
        await ex.respond_json(200, {"object": "cache.invalidation", **result})


def _chat_body(raw: bytes) -> dict[str, Any]:
    """The chat request to invalidate: a JSON object with a model name and messages. The
    key is computed from the body as the lookup computes it from the parsed request (the
    parser checks fields, it does not change the ones that make the key)."""
    body = decode_json(raw) if raw.strip() else None
    if not isinstance(body, dict):
        raise GatewayError(
            400,
            "the body must be the chat request (a JSON object) whose cached answer to forget",
            code="invalid_json",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(
            400, "model must be a non-empty string", code="invalid_type", param="model"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(
            400,
            "messages must be a non-empty array of messages",
            code="invalid_type",
            param="messages",
        )
    if not all(isinstance(m, dict) for m in messages):
        raise GatewayError(
            400, "each of messages must be an object", code="invalid_type", param="messages"
        )
    return body


def _model_param(ex: Exchange) -> str | None:
    query = parse_qsl(ex.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    model = None
    for name, value in query:
        if name != "model":
            raise GatewayError(
                400,
                f"unknown query parameter {name[:40]!r}; DELETE /v1/cache takes only model",
                code="invalid_value",
                param=name[:40],
            )
        if not value or len(value) > _MAX_MODEL_CHARS:
            raise GatewayError(
                400,
                f"model must be a model name of 1-{_MAX_MODEL_CHARS} characters",
                code="invalid_value",
                param="model",
            )
        model = value
    return model
