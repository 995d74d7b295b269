"""Bounds on the sessions API, per key: how many sessions a key holds, how fast it creates
them (a token bucket in the gateway's store), how big one session grows, and pages for
every list, so no request can make the gateway hold or send an unbounded amount.

Lists are cursor-paged the OpenAI way: `?limit=N&after=<id>` answers
`{"object": "list", "data", "first_id", "last_id", "has_more"}`; a session's messages are
paged by position (`?limit=N&after=<index>`). Imports gateway siblings and settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

import msgspec

from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.settings import GatewaySettings
from unbroken.stores.base import Store

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "Page", "SessionLimits", "page_query", "paged"]

# OpenAI's list endpoints default to 20 items and allow up to 100.
DEFAULT_PAGE = 20
MAX_PAGE = 100
# Messages are small next to a session's byte bound, so a page may hold more of them.
MAX_MESSAGES_PAGE = 1000


class Page(msgspec.Struct, frozen=True):
    """A page request: at most `limit` items after the cursor `after`."""

    limit: int
    after: str | None = None


def page_query(query_string: bytes, default: int, most: int) -> Page:
    """The `limit` and `after` of a query string.

    Raises:
        GatewayError: 400 naming the parameter when `limit` is not an integer in [1, most].
    """
    try:
        params = parse_qs(query_string.decode("latin-1"), keep_blank_values=True, max_num_fields=20)
    except ValueError:
        raise GatewayError(
            400, "the query string has too many fields", code="invalid_value"
        ) from None
    raw_limit = params.get("limit", [str(default)])[-1]
    # str.isdigit() also takes "³", which int() refuses: ASCII digits only.
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= most:
        raise GatewayError(
            400,
            f"limit must be an integer in [1, {most}], got {raw_limit[:20]!r}",
            code="invalid_value",
            param="limit",
        )
    return Page(int(raw_limit), params.get("after", [None])[-1])


class SessionLimits:
    """The per-key bounds of the sessions API.

    Args:
        settings: `sessions_per_key`, `sessions_per_minute`, `session_max_bytes`,
            `session_max_messages`.
        store: where the creation buckets live (shared by gateway instances on Redis).
    """

    def __init__(self, settings: GatewaySettings, store: Store) -> None:
        self.per_key = settings.sessions_per_key
        self.per_minute = settings.sessions_per_minute
        self.max_bytes = settings.session_max_bytes
        self.max_messages = settings.session_max_messages
        self._store = store

    async def check_create(self, caller: Caller, n_held: int, now: float) -> None:
        """Refuse a new session past the key's count or creation rate.

        Raises:
            GatewayError: 429 naming the limit, with Retry-After.
        """
        if n_held >= self.per_key:
            raise GatewayError(
                429,
                f"key {caller.name!r} holds {n_held} sessions, its limit; delete some first",
                type="rate_limit_error",
                code="session_limit_exceeded",
            )
        rate = self.per_minute
        wait = await self._store.take(f"sessions:{caller.id}", rate, rate / 60.0, 1.0, now)
        if wait > 0:
            raise GatewayError(
                429,
                f"key {caller.name!r} creates sessions faster than {rate:g} per minute; "
                f"retry in {math.ceil(wait)} s",
                type="rate_limit_error",
                code="session_rate_exceeded",
                retry_after_s=wait,
            )

    def check_size(self, history: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> None:
        """Refuse a turn that would grow a session past its bounds (the answer is counted
        when it is stored, so a session can pass the byte bound by one answer at most).

        Raises:
            GatewayError: 413 `session_too_large`.
        """
        n = len(history) + len(new) + 1
        if n > self.max_messages:
            raise GatewayError(
                413,
                f"the session would hold {n} messages, over the limit of {self.max_messages}; "
                "start a new session",
                code="session_too_large",
            )
        size = len(msgspec.json.encode([*history, *new]))
        if size > self.max_bytes:
            raise GatewayError(
                413,
                f"the session would hold {size} bytes of messages, over the limit of "
                f"{self.max_bytes}; start a new session",
                code="session_too_large",
            )


def paged(items: Sequence[Any], ids: Sequence[str], page: Page) -> dict[str, Any]:
    """One page of `items` (whose cursors are `ids`) as an OpenAI list object; a cursor
    that names no item (deleted since, or never there) gives an empty last page."""
    start = 0
    if page.after is not None:
        try:
            start = list(ids).index(page.after) + 1
        except ValueError:
            start = len(items)
    chunk = list(items[start : start + page.limit])
    chunk_ids = ids[start : start + page.limit]
    return {
        "object": "list",
        "data": chunk,
        "first_id": chunk_ids[0] if chunk_ids else None,
        "last_id": chunk_ids[-1] if chunk_ids else None,
        "has_more": start + page.limit < len(items),
    }
