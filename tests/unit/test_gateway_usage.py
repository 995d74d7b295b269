"""gateway/usage.py: the rules of a usage query that span its fields (the OpenAPI schema
cannot state them, so the fuzzer skips /v1/usage and these tests hold them)."""

from __future__ import annotations

import datetime as dt

import pytest

from unbroken.core.pricing import PriceTable
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.usage import parse_usage_query
from unbroken.settings import LimitSettings

NOW = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC).timestamp()
USER = Caller("k:1", "alice", LimitSettings())


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "2026-12-04", "end": "2026-12-01"}, "start"),
        ({"start": "2026-01-01", "end": "2026-12-01"}, "start"),
        ({"start": "2026-02-30"}, "start"),
        ({"days": "0"}, "days"),
        ({"days": "94"}, "days"),
    ],
)
def test_bad_ranges_are_400s_naming_the_field(params: dict[str, str], param: str) -> None:
    """start after end, a span over 93 days, a non-date and days out of [1, 93] are 400s."""
    with pytest.raises(GatewayError) as caught:
        parse_usage_query(params, USER, PriceTable(), NOW)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_days_counts_back_from_today() -> None:
    """days=7 covers today and the six days before it."""
    query = parse_usage_query({"days": "7"}, USER, PriceTable(), NOW)
    assert (query.start, query.end) == (dt.date(2026, 11, 28), dt.date(2026, 12, 4))
