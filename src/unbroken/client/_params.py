"""The per-call options that are unbroken's or the SDK's, not the API's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from unbroken.core.routes import Route
from unbroken.errors import InvalidRequestError

__all__ = ["ChatParams"]


# Not frozen: a frozen dataclass sets each field through object.__setattr__ (~1 us a
# request for these nine); nothing changes one after `pop` made it.
@dataclass(slots=True)
class ChatParams:
    """Options of `create`/`stream` that are not request-body fields.

    Attributes:
        extra_headers: headers for this request only (as in the openai SDK).
        extra_body: fields merged into the JSON body (as in the openai SDK).
        extra_query: query parameters for this request only (as in the openai SDK).
        timeout: openai's meaning: seconds (or an `httpx.Timeout`) for each wait - the
            connection, the headers, the first token, each gap between data events.
        deadline: seconds allowed for the whole answer across all attempts.
        fallbacks: models (on the first route) or routes to try after the configured ones.
        restart: start over when a broken answer cannot be continued anywhere.
        budget_key: whose share of the routes' retry budgets this answer uses (the gateway
            passes its caller's key name, so one key's failures cannot spend the recovery
            of the others); "" shares one budget per route.
        routes: routes to use for this request instead of the configured ones (a gateway
            routing one public model name to its own upstreams).
    """

    extra_headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, Any] | None = None
    timeout: float | httpx.Timeout | None = None
    deadline: float | None = None
    fallbacks: Sequence[str | Route] | None = None
    restart: bool = False
    budget_key: str = ""
    routes: Sequence[Route] | None = None
    extra_query: Mapping[str, Any] | None = None

    @classmethod
    def pop(cls, params: dict[str, Any]) -> ChatParams:
        """Take the options out of `params` (which keeps only body fields), checking types.

        Raises:
            InvalidRequestError: an option has the wrong type.
        """
        headers = params.pop("extra_headers", None) or {}
        body = params.pop("extra_body", None)
        timeout = params.pop("timeout", None)
        deadline = params.pop("deadline", None)
        fallbacks = params.pop("fallbacks", None)
        restart = params.pop("restart", False)
        budget_key = params.pop("budget_key", "")
        routes = params.pop("routes", None)
        query = params.pop("extra_query", None)
        if query is not None and not isinstance(query, Mapping):
            raise InvalidRequestError("extra_query must be a mapping")
        # type(...) is ...: the common shapes pass without the ABC checks (~2 us a request).
        if type(headers) is not dict and not isinstance(headers, Mapping):
            raise InvalidRequestError("extra_headers must map strings to strings")
        for k, v in headers.items():  # (a loop: no generator per request)
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidRequestError("extra_headers must map strings to strings")
        if body is not None and not isinstance(body, Mapping):
            raise InvalidRequestError("extra_body must be a mapping")
        if timeout is not None and not isinstance(timeout, httpx.Timeout) and not _seconds(timeout):
            raise InvalidRequestError(
                f"timeout must be a positive number of seconds or an httpx.Timeout, got {timeout!r}"
            )
        if deadline is not None and not _seconds(deadline):
            raise InvalidRequestError(
                f"deadline must be a positive number of seconds, got {deadline!r}"
            )
        if fallbacks is not None and (
            isinstance(fallbacks, str) or not isinstance(fallbacks, list | Sequence)
        ):
            raise InvalidRequestError("fallbacks must be a list of model names or routes")
        if routes is not None:
            if (type(routes) is not list and not isinstance(routes, Sequence)) or not routes:
                raise InvalidRequestError("routes must be a non-empty list of Route objects")
            for r in routes:  # (a loop: no generator per request)
                if not isinstance(r, Route):
                    raise InvalidRequestError("routes must be a non-empty list of Route objects")
        if not isinstance(restart, bool):
            raise InvalidRequestError("restart must be True or False")
        if not isinstance(budget_key, str):
            raise InvalidRequestError("budget_key must be a string")
        # Set field by field: the dataclass's `__init__` (keywords, a default-factory
        # check) cost as much again, once per answer.
        made: ChatParams = cls.__new__(cls)
        made.extra_headers = dict(headers)
        made.extra_body = body
        made.timeout = (
            timeout if timeout is None or isinstance(timeout, httpx.Timeout) else float(timeout)
        )
        made.deadline = None if deadline is None else float(deadline)
        made.fallbacks = fallbacks
        made.restart = restart
        made.budget_key = budget_key
        made.routes = routes
        made.extra_query = query
        return made


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
