"""Price table and the cost of a usage record; pure.

Imports the standard library, msgspec and core siblings only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from unbroken.core.records import quick_init
from unbroken.core.wire import Usage

__all__ = ["DEFAULT_PRICES", "Cost", "Price", "PriceTable"]


@dataclass(frozen=True, slots=True)
class Price:
    """USD per one million tokens."""

    cache_hit: float
    cache_miss: float
    output: float


# DeepSeek's V3.2 prices from 2025-09-29, kept for V3.2 (protocol.md §1.14: the mock's
# default), and the V4 rows of the mid-2026 pricing page. Override with PriceTable(...).
DEFAULT_PRICES: Mapping[str, Price] = {
    "deepseek-chat": Price(cache_hit=0.028, cache_miss=0.28, output=0.42),
    "deepseek-reasoner": Price(cache_hit=0.028, cache_miss=0.28, output=0.42),
    "deepseek-v4-flash": Price(cache_hit=0.0028, cache_miss=0.14, output=0.28),
    "deepseek-v4-pro": Price(cache_hit=0.003625, cache_miss=0.435, output=0.87),
}


@quick_init
@dataclass(frozen=True, slots=True)
class Cost:
    """The cost of some usage, in USD, with its parts. `known` is False when the model had
    no price (the amounts are then 0)."""

    input_usd: float = 0.0
    output_usd: float = 0.0
    known: bool = True

    @property
    def total_usd(self) -> float:
        """Input plus output."""
        return self.input_usd + self.output_usd

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.input_usd + other.input_usd,
            self.output_usd + other.output_usd,
            self.known and other.known,
        )


class PriceTable:
    """Looks up a model's price and computes costs.

    Args:
        prices: model id -> Price; merged over DEFAULT_PRICES unless `replace` is True.
        replace: use `prices` alone.
    """

    __slots__ = ("_prices",)

    def __init__(self, prices: Mapping[str, Price] | None = None, *, replace: bool = False) -> None:
        merged = {} if replace else dict(DEFAULT_PRICES)
        merged.update(prices or {})
        self._prices = merged

    def price(self, model: str) -> Price | None:
        """The price of `model`; a dated or suffixed id (`deepseek-chat-0324`) matches its
        longest known prefix."""
        found = self._prices.get(model)
        if found is not None:
            return found
        best = ""
        for known in self._prices:
            if model.startswith(known) and len(known) > len(best):
                best = known
        return self._prices.get(best) if best else None

    def cost(self, model: str, usage: Usage | None) -> Cost:
        """Cost = hit * P_hit + miss * P_miss + completion * P_out (per 1M tokens, §1.7).

        Without DeepSeek's hit/miss split, OpenAI's `cached_tokens` is the hit count, and
        the rest of the prompt is a miss.
        """
        price = self.price(model)
        if usage is None:
            return Cost()
        if price is None:
            return Cost(known=False)
        hit = usage.prompt_cache_hit_tokens
        if hit is None:
            details = usage.prompt_tokens_details
            hit = (details.cached_tokens or 0) if details is not None else 0
        miss = usage.prompt_cache_miss_tokens
        if miss is None:
            miss = max(0, usage.prompt_tokens - hit)
        return Cost(
            input_usd=(hit * price.cache_hit + miss * price.cache_miss) / 1e6,
            output_usd=usage.completion_tokens * price.output / 1e6,
        )
