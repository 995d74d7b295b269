"""The per-call options that are unbroken's or the SDK's, not the API's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from unbroken.core.routes import Route
from unbroken.errors import InvalidRequestError

__all__ = ["ChatParams"]


@dataclass(frozen=True, slots=True)
class ChatParams:
    """Options of `create`/`stream` that are not request-body fields.

    Attributes:
        extra_headers: headers for this request only (as in the openai SDK).
        extra_body: fields merged into the JSON body (as in the openai SDK).
        timeout: seconds allowed for the whole answer (the deadline).
        fallbacks: models (on the first route) or routes to try after the configured ones.
        restart: start over when a broken answer cannot be continued anywhere.
        routes: routes to use for this request instead of the configured ones (a gateway
            routing one public model name to its own upstreams).
    """

    extra_headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, Any] | None = None
    timeout: float | None = None
    fallbacks: Sequence[str | Route] | None = None
    restart: bool = False
    routes: Sequence[Route] | None = None

    @classmethod
    def pop(cls, params: dict[str, Any]) -> ChatParams:
        """Take the options out of `params` (which keeps only body fields), checking types.

        Raises:
            InvalidRequestError: an option has the wrong type.
        """
        headers = params.pop("extra_headers", None) or {}
        body = params.pop("extra_body", None)
        timeout = params.pop("timeout", None)
        fallbacks = params.pop("fallbacks", None)
        restart = params.pop("restart", False)
        routes = params.pop("routes", None)
        params.pop("extra_query", None)  # accepted for openai compatibility; nothing to query
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise InvalidRequestError("extra_headers must map strings to strings")
        if body is not None and not isinstance(body, Mapping):
            raise InvalidRequestError("extra_body must be a mapping")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise InvalidRequestError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        if fallbacks is not None and (
            isinstance(fallbacks, str) or not isinstance(fallbacks, Sequence)
        ):
            raise InvalidRequestError("fallbacks must be a list of model names or routes")
        if routes is not None and (
            not isinstance(routes, Sequence)
            or not routes
            or not all(isinstance(r, Route) for r in routes)
        ):
            raise InvalidRequestError("routes must be a non-empty list of Route objects")
        if not isinstance(restart, bool):
            raise InvalidRequestError("restart must be True or False")
        return cls(
            extra_headers=dict(headers),
            extra_body=body,
            timeout=None if timeout is None else float(timeout),
            fallbacks=fallbacks,
            restart=restart,
            routes=routes,
        )
