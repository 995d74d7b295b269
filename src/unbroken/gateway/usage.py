"""Usage and spend per key, day and model, kept in the store; `GET /v1/usage` reads it.

Each answer adds its billed requests, tokens and cost to one usage table per UTC day
(`Store.add_usage`), under the fields `<key name>\\x1f<model>\\x1f<metric>`. The key's
*name* is used, so a rotated key keeps its history. A report can also price the same
tokens at another model's prices ("what would this traffic cost on model X").
Imports core, settings, stores and gateway siblings.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unbroken.core.pricing import PriceTable
from unbroken.core.wire import Usage
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.stores.base import Store

__all__ = ["MAX_DAYS", "UsageBook", "UsageQuery", "parse_usage_query"]

# Usage tables are kept this long: a quarter, enough for a monthly bill and its dispute.
USAGE_TTL_S = 93 * 86400.0
# The longest period one report may cover (the tables expire after it anyway).
MAX_DAYS = 93
_SEP = "\x1f"
_METRICS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
# (key name, model) pairs whose field names `UsageBook` keeps made.
_MAX_FIELDS = 4096


def day_of(now: float) -> str:
    """The UTC day of Unix time `now`, as YYYY-MM-DD."""
    # Unix time has 86,400 s per day: the day number keys a cache of the formatted
    # day (every answer books usage and admits under its day; strftime took ~3 us).
    if now % 86400.0 >= 86399.999999:  # fromtimestamp may round up to the next day
        return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
    return _day_label(int(now // 86400.0))


@functools.lru_cache(maxsize=4)
def _day_label(day: int) -> str:
    return dt.datetime.fromtimestamp(day * 86400.0, dt.UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A checked `/v1/usage` query.

    Attributes:
        start, end: the first and last UTC day (inclusive).
        key: the key name to report; None for every key (admins only).
        price_at: a model whose prices the same tokens are also priced at.
    """

    start: dt.date
    end: dt.date
    key: str | None
    price_at: str | None


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, code="invalid_value", param=param)


def _date(raw: str, param: str) -> dt.date:
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise _bad(f"{param} must be a date YYYY-MM-DD, got {raw[:40]!r}", param) from None


def parse_usage_query(
    params: Mapping[str, str], caller: Caller, prices: PriceTable, now: float
) -> UsageQuery:
    """Read `start`, `end`, `days`, `key` and `price_at` for `caller`.

    Raises:
        GatewayError: 400 for a malformed value, 403 when a non-admin asks for another key.
    """
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    end = _date(params["end"], "end") if "end" in params else today
    if "start" in params:
        start = _date(params["start"], "start")
    else:
        raw_days = params.get("days", "7")
        if not (raw_days.isascii() and raw_days.isdigit()) or not 1 <= int(raw_days) <= MAX_DAYS:
            raise _bad(f"days must be an integer in [1, {MAX_DAYS}], got {raw_days[:20]!r}", "days")
        start = end - dt.timedelta(days=int(raw_days) - 1)
    if start > end:
        raise _bad(f"start ({start}) is after end ({end})", "start")
    if (end - start).days >= MAX_DAYS:
        raise _bad(f"a report covers at most {MAX_DAYS} days", "start")
    key: str | None = params.get("key", caller.name)
    if key == "*":
        key = None
    if key != caller.name and caller.role != "admin":
        raise GatewayError(
            403,
            f"key {caller.name!r} may read only its own usage; an admin key reads others'",
            type="permission_error",
            code="admin_required",
            param="key",
        )
    price_at = params.get("price_at")
    if price_at is not None and prices.price(price_at) is None:
        raise _bad(f"price_at: the model {price_at[:100]!r} has no configured price", "price_at")
    return UsageQuery(start, end, key, price_at)


class UsageBook:
    """Books answers and reports usage.

    Args:
        store: where the daily usage tables live.
        prices: the gateway's price table (for `price_at`).
    """

    def __init__(self, store: Store, prices: PriceTable) -> None:
        self._store = store
        self._prices = prices
        # The fields of each (key name, model) booked, made once (five strings an answer).
        self._fields: dict[tuple[str, str], tuple[str, ...]] = {}

    async def record(
        self, key: str, model: str, usage: Usage | None, cost_usd: float, now: float
    ) -> None:
        """Add one answer: a request, its billed tokens (if any) and cost."""
        fields = self._fields.get((key, model))
        if fields is None:
            fields = self._fields_of(key, model)
        if usage is None:
            values: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, cost_usd)
        else:
            cached = usage.prompt_cache_hit_tokens
            if cached is None:
                details = usage.prompt_tokens_details
                cached = details.cached_tokens if details is not None else 0
            values = (
                1.0,
                float(usage.prompt_tokens),
                float(cached or 0),
                float(usage.completion_tokens),
                cost_usd,
            )
        await self._store.add_usage(
            day_of(now), dict(zip(fields, values, strict=True)), USAGE_TTL_S
        )

    def _fields_of(self, key: str, model: str) -> tuple[str, ...]:
        base = f"{key}{_SEP}{model}{_SEP}"
        fields = tuple(base + metric for metric in _METRICS)
        if len(self._fields) >= _MAX_FIELDS:  # (key names and models: few; bounded anyway)
            self._fields.clear()
        self._fields[key, model] = fields
        return fields

    async def report(self, query: UsageQuery) -> dict[str, Any]:
        """The `/v1/usage` body: one row per day, key and model, and the totals."""
        rows: list[dict[str, Any]] = []
        day = query.start
        while day <= query.end:
            table = await self._store.get_usage(day.isoformat())
            grouped: dict[tuple[str, str], dict[str, float]] = {}
            for field, value in table.items():
                parts = field.split(_SEP)
                if len(parts) != 3 or parts[2] not in _METRICS:
                    continue
                key, model, metric = parts
                if query.key is not None and key != query.key:
                    continue
                grouped.setdefault((key, model), {})[metric] = value
            for (key, model), metrics in sorted(grouped.items()):
                rows.append(self._row(day.isoformat(), key, model, metrics, query.price_at))
            day += dt.timedelta(days=1)
        total: dict[str, Any] = {
            name: sum(row[name] for row in rows)
            for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens")
        }
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        total["cost_usd"] = sum(row["cost_usd"] for row in rows)
        if query.price_at is not None:
            total["cost_usd_at_price"] = sum(row["cost_usd_at_price"] for row in rows)
        return {
            "object": "usage",
            "start": query.start.isoformat(),
            "end": query.end.isoformat(),
            "key": "*" if query.key is None else query.key,
            "price_at": query.price_at,
            "data": rows,
            "total": total,
        }

    def _row(
        self, day: str, key: str, model: str, metrics: Mapping[str, float], price_at: str | None
    ) -> dict[str, Any]:
        prompt = int(metrics.get("prompt_tokens", 0))
        cached = int(metrics.get("cached_tokens", 0))
        completion = int(metrics.get("completion_tokens", 0))
        row: dict[str, Any] = {
            "day": day,
            "key": key,
            "model": model,
            "requests": int(metrics.get("requests", 0)),
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cost_usd": metrics.get("cost_usd", 0.0),
        }
        if price_at is not None:
            usage = Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                prompt_cache_hit_tokens=cached,
                prompt_cache_miss_tokens=max(0, prompt - cached),
            )
            row["cost_usd_at_price"] = self._prices.cost(price_at, usage).total_usd
        return row
