"""Unit tests of core.pricing: price lookup and the cost of usage."""

from __future__ import annotations

import pytest

from unbroken.core.pricing import DEFAULT_PRICES, Cost, Price, PriceTable
from unbroken.core.wire import PromptTokensDetails, Usage


def test_cost_total_and_sum() -> None:
    """total_usd is input + output; adding costs adds parts and keeps `known` only if both are."""
    a = Cost(input_usd=0.25, output_usd=0.5)
    b = Cost(input_usd=1.0, output_usd=2.0)
    assert a.total_usd == 0.75
    assert a + b == Cost(1.25, 2.5, True)
    assert (a + Cost(known=False)).known is False
    assert (Cost(known=False) + a) == Cost(0.25, 0.5, False)


def test_default_prices() -> None:
    """Without arguments the table holds DeepSeek's published prices."""
    table = PriceTable()
    for model, price in DEFAULT_PRICES.items():
        assert table.price(model) == price


def test_prices_merge_over_defaults_or_replace_them() -> None:
    """Given prices are merged over the defaults, or used alone with replace=True."""
    mine = Price(cache_hit=1.0, cache_miss=2.0, output=3.0)
    merged = PriceTable({"mine": mine, "deepseek-chat": mine})
    assert merged.price("mine") == mine
    assert merged.price("deepseek-chat") == mine
    assert merged.price("deepseek-reasoner") == DEFAULT_PRICES["deepseek-reasoner"]
    alone = PriceTable({"mine": mine}, replace=True)
    assert alone.price("mine") == mine
    assert alone.price("deepseek-chat") is None
    assert PriceTable(replace=True).price("deepseek-chat") is None


def test_dated_model_ids_match_the_longest_known_prefix() -> None:
    """`deepseek-v4-pro-2026` is priced as deepseek-v4-pro; an unknown id has no price."""
    short = Price(9.0, 9.0, 9.0)
    table = PriceTable({"deepseek": short})
    assert table.price("deepseek-v4-pro-2026-01") == DEFAULT_PRICES["deepseek-v4-pro"]
    assert table.price("deepseek-chat-0324") == DEFAULT_PRICES["deepseek-chat"]
    assert table.price("deepseek-x") == short
    assert table.price("gpt-4o") is None


def test_cost_with_deepseek_hit_and_miss() -> None:
    """Cost = hit * P_hit + miss * P_miss + completion * P_out, per million tokens."""
    usage = Usage(
        prompt_tokens=1_010_000,
        completion_tokens=1_000_000,
        total_tokens=2_010_000,
        prompt_cache_hit_tokens=10_000,
        prompt_cache_miss_tokens=1_000_000,
    )
    cost = PriceTable().cost("deepseek-chat", usage)
    assert cost.input_usd == pytest.approx(10_000 * 0.028 / 1e6 + 0.28)
    assert cost.output_usd == pytest.approx(0.42)
    assert cost.known
    assert cost.total_usd == pytest.approx(0.28028 + 0.42)


def test_cost_with_openai_cached_tokens() -> None:
    """Without DeepSeek's split, cached_tokens are hits and the rest of the prompt misses."""
    table = PriceTable({"m": Price(cache_hit=1.0, cache_miss=10.0, output=100.0)}, replace=True)
    usage = Usage(
        prompt_tokens=1000,
        completion_tokens=10,
        total_tokens=1010,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=400),
    )
    cost = table.cost("m", usage)
    assert cost.input_usd == pytest.approx((400 * 1.0 + 600 * 10.0) / 1e6)
    assert cost.output_usd == pytest.approx(10 * 100.0 / 1e6)


@pytest.mark.parametrize(
    "details", [None, PromptTokensDetails(cached_tokens=None)], ids=["no_details", "no_cached"]
)
def test_cost_without_cache_information_is_all_miss(details: PromptTokensDetails | None) -> None:
    """No cache information at all: the whole prompt is a miss."""
    table = PriceTable({"m": Price(cache_hit=1.0, cache_miss=10.0, output=0.0)}, replace=True)
    usage = Usage(prompt_tokens=100, completion_tokens=0, prompt_tokens_details=details)
    assert table.cost("m", usage).input_usd == pytest.approx(100 * 10.0 / 1e6)


def test_cost_miss_never_negative() -> None:
    """A hit count above the prompt (an inconsistent report) gives a miss of 0, not less."""
    table = PriceTable({"m": Price(cache_hit=1.0, cache_miss=10.0, output=0.0)}, replace=True)
    usage = Usage(prompt_tokens=10, prompt_cache_hit_tokens=50)
    assert table.cost("m", usage).input_usd == pytest.approx(50 * 1.0 / 1e6)


def test_cost_of_nothing_and_of_an_unknown_model() -> None:
    """No usage costs nothing (known); usage of a model without a price is unknown, 0 USD."""
    table = PriceTable()
    assert table.cost("deepseek-chat", None) == Cost()
    assert table.cost("nope", None) == Cost()
    unknown = table.cost("nope", Usage(prompt_tokens=5, completion_tokens=5, total_tokens=10))
    assert unknown == Cost(known=False)
    assert unknown.total_usd == 0.0
