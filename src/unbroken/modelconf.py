"""The gateway's model list as configured: public names (aliases, wildcards) mapped to
ordered upstream targets, with a price and a context size per model.

Parsed from `[[gateway.model_list]]` tables by `settings.py`; imports `unbroken.errors`
only (the gateway turns these into routes in `gateway/routing.py`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from unbroken.errors import ConfigError

__all__ = ["ModelSettings", "ModelTarget", "PriceSettings", "parse_model_list"]


@dataclass(frozen=True, slots=True)
class PriceSettings:
    """USD per one million tokens.

    Attributes:
        input: prompt tokens not served from a cache (DeepSeek's cache miss).
        cached_input: prompt tokens served from a cache (defaults to `input`).
        output: completion tokens (reasoning included).
    """

    input: float
    output: float
    cached_input: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"price {name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """One place a model is served from, in fallback order.

    Attributes:
        route: the name of a `[[gateway.routes]]` entry (or `default`).
        model: the model to ask that route for; None keeps the route's own `model`, or else
            passes the requested name through (what a wildcard wants).
        context_tokens: that model's context window there (default: the entry's, else the
            route's); a request too long for one target moves on to a larger one.
    """

    route: str
    model: str | None = None
    context_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """One entry of the model list.

    Attributes:
        name: the public name clients ask for, or a glob pattern (`*`, `Qwen/*`).
        targets: where it is served, first to last (later ones are fallbacks).
        aliases: other public names of the same entry.
        price: its price (cost budgets, `/v1/usage`); None keeps the built-in table's.
        context_tokens: its context window (a request too long for one target moves on to
            a target with a larger window).
    """

    name: str
    targets: tuple[ModelTarget, ...]
    aliases: tuple[str, ...] = ()
    price: PriceSettings | None = None
    context_tokens: int | None = None

    @property
    def is_pattern(self) -> bool:
        """True when `name` is a glob pattern."""
        return any(c in self.name for c in "*?[")

    def matches(self, model: str) -> bool:
        """True when a request for `model` is served by this entry."""
        if model == self.name or model in self.aliases:
            return True
        return self.is_pattern and fnmatch.fnmatchcase(model, self.name)


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {value!r:.60}")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{where} must be a number >= 0, got {value!r:.60}")
    return float(value)


def _target(item: object, where: str) -> ModelTarget:
    if isinstance(item, str):
        return ModelTarget(_string(item, where))
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a route name or a table {{route = ..., model = ...}}")
    unknown = sorted(set(item) - {"route", "model", "context_tokens"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; known: context_tokens, model, route"
        )
    model = item.get("model")
    return ModelTarget(
        _string(item.get("route"), f"{where}.route"),
        None if model is None else _string(model, f"{where}.model"),
        _context(item.get("context_tokens"), f"{where}.context_tokens"),
    )


def _context(value: object, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where} must be an integer >= 1")
    return value


def _price(item: object, where: str) -> PriceSettings:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a table {{input = ..., output = ...}}")
    unknown = sorted(set(item) - {"input", "cached_input", "output"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; known: cached_input, input, output"
        )
    if "input" not in item or "output" not in item:
        raise ConfigError(f"{where} needs `input` and `output` (USD per million tokens)")
    cached = item.get("cached_input")
    return PriceSettings(
        input=_number(item["input"], f"{where}.input"),
        output=_number(item["output"], f"{where}.output"),
        cached_input=None if cached is None else _number(cached, f"{where}.cached_input"),
    )


_ENTRY_KEYS = frozenset({"name", "aliases", "routes", "price", "context_tokens"})


def parse_model_list(items: object, route_names: tuple[str, ...]) -> tuple[ModelSettings, ...]:
    """Read `[[gateway.model_list]]` tables.

    Args:
        items: the TOML value.
        route_names: the configured route names a target may name.

    Raises:
        ConfigError: naming the entry and key that is wrong.
    """
    if not isinstance(items, list):
        raise ConfigError("gateway.model_list must be an array of tables ([[gateway.model_list]])")
    entries: list[ModelSettings] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"gateway.model_list[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(item) - _ENTRY_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown key(s) in {where}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_ENTRY_KEYS))}"
            )
        name = _string(item.get("name"), f"{where}.name")
        aliases_raw = item.get("aliases", [])
        if not isinstance(aliases_raw, list):
            raise ConfigError(f"{where}.aliases must be a list of names")
        aliases = tuple(_string(a, f"{where}.aliases") for a in aliases_raw)
        raw_targets = item.get("routes")
        if not isinstance(raw_targets, list) or not raw_targets:
            raise ConfigError(
                f"{where}.routes must list at least one route (a name, or "
                "{route = NAME, model = UPSTREAM_MODEL})"
            )
        targets = tuple(_target(t, f"{where}.routes[{j}]") for j, t in enumerate(raw_targets))
        for target in targets:
            if target.route not in route_names:
                raise ConfigError(
                    f"{where}: route {target.route!r} is not configured; "
                    f"routes: {', '.join(route_names)}"
                )
        for public in (name, *aliases):
            if public in seen:
                raise ConfigError(f"{where}: the model name {public!r} is listed twice")
            seen.add(public)
        context = _context(item.get("context_tokens"), f"{where}.context_tokens")
        price = item.get("price")
        entries.append(
            ModelSettings(
                name=name,
                targets=targets,
                aliases=aliases,
                price=None if price is None else _price(price, f"{where}.price"),
                context_tokens=context,
            )
        )
    return tuple(entries)
