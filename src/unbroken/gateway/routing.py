"""Model routing: which upstream routes (and upstream model names) serve a public model name.

Theory of operation
-------------------
Three modes, chosen by the settings:
  * a model list (`[[gateway.model_list]]`): each public name, alias or glob pattern maps to
    its own ordered targets (route + upstream model); the first matching entry wins;
  * a static list (`gateway.models`): those names, on every configured route;
  * neither: discovery. Until it asks, the router serves DeepSeek's two names. The first
    request for another name, and `GET /v1/models`, fetch the first route's `GET /models`;
    from then on its names are served, fetched again (on the next such need) once
    `model_refresh_s` has passed. So a DeepSeek upstream costs no extra request, and a
    vLLM server's own names work from the first request. An upstream without `/models`
    (404) or one that cannot be reached puts the router in pass-through: every name is
    accepted and sent upstream as is, so the upstream's own 404 reaches the client.
Prices and context sizes of the model list feed the SDK's price table and the routes.
Imports core, client errors, settings and gateway siblings.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from unbroken.core.pricing import Price, PriceTable
from unbroken.core.routes import Route
from unbroken.errors import UnbrokenError, UpstreamStatusError
from unbroken.modelconf import ModelSettings, PriceSettings
from unbroken.settings import DEFAULT_MODELS, RouteSettings, Settings

__all__ = ["ModelRouter", "RoutedPrices", "ServedModels", "base_routes"]

logger = logging.getLogger(__name__)

# After a failed discovery, try again this soon rather than after the full refresh period.
RETRY_DISCOVERY_S = 30.0
# Model ids longer than this from an upstream's /models are ignored (nobody types them).
MAX_MODEL_ID = 200


def route_of(settings: RouteSettings) -> Route:
    """The SDK route of a configured gateway route."""
    return Route(
        settings.name,
        settings.base_url,
        settings.api_key,
        settings.model,
        settings.dialect,  # type: ignore[arg-type]  # RouteSettings checked the dialect
        settings.context_tokens,
    )


def base_routes(settings: Settings) -> list[Route]:
    """The configured routes (or the one default route), as SDK routes."""
    return [route_of(r) for r in settings.upstream_routes()]


def _price(price: PriceSettings) -> Price:
    cached = price.input if price.cached_input is None else price.cached_input
    return Price(cache_hit=cached, cache_miss=price.input, output=price.output)


class RoutedPrices(PriceTable):
    """The built-in price table with the model list's prices over it: an upstream model a
    priced entry routes to, the entry's public names, and names its pattern matches."""

    __slots__ = ("_patterns",)

    def __init__(self, entries: tuple[ModelSettings, ...], routes: dict[str, Route]) -> None:
        explicit: dict[str, Price] = {}
        patterns: list[tuple[str, Price]] = []
        for entry in entries:
            if entry.price is None:
                continue
            price = _price(entry.price)
            for public in (entry.name, *entry.aliases):
                if entry.is_pattern and public == entry.name:
                    patterns.append((public, price))
                else:
                    explicit.setdefault(public, price)
            for target in entry.targets:
                upstream = target.model or routes[target.route].model
                if upstream is not None:
                    explicit.setdefault(upstream, price)
        super().__init__(explicit)
        self._patterns = tuple(patterns)

    def price(self, model: str) -> Price | None:
        """A configured price, a matching pattern's, or the built-in table's."""
        if model in self._prices:
            return self._prices[model]
        for pattern, price in self._patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return super().price(model)


class ServedModels:
    """The names the gateway serves: `name in served` says whether a request may ask for
    it (patterns and pass-through included); iterating lists the concrete names."""

    __slots__ = ("_names", "_passthrough", "_patterns")

    def __init__(self, names: frozenset[str], patterns: tuple[str, ...], passthrough: bool) -> None:
        self._names = names
        self._patterns = patterns
        self._passthrough = passthrough

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if self._passthrough or name in self._names:
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in self._patterns)

    def __iter__(self) -> Iterator[str]:
        names = self._names or (frozenset(DEFAULT_MODELS) if self._passthrough else self._names)
        return iter(sorted(names))

    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> frozenset[str]:
        """The concrete names (patterns and pass-through aside)."""
        return self._names

    def __and__(self, other: object) -> frozenset[str]:
        if not isinstance(other, set | frozenset):
            return NotImplemented
        return frozenset(n for n in other if isinstance(n, str) and n in self)


class ModelRouter:
    """Resolves public model names to routes (see the theory of operation above).

    Args:
        settings: the settings (`gateway.model_list`, `gateway.models`, the routes).
    """

    def __init__(self, settings: Settings) -> None:
        g = settings.gateway
        self._routes = {r.name: r for r in base_routes(settings)}
        self._entries = g.model_list
        self.discovers = not g.models and not g.model_list
        self._refresh_s = g.model_refresh_s
        self._next_fetch = 0.0
        self._lock: asyncio.Lock | None = None
        self.prices = RoutedPrices(self._entries, self._routes)
        names = set(g.models)
        patterns = []
        for entry in self._entries:
            if entry.is_pattern:
                patterns.append(entry.name)
            else:
                names.add(entry.name)
            names.update(entry.aliases)
        if self.discovers:
            names.update(DEFAULT_MODELS)
        self.served = ServedModels(frozenset(names), tuple(patterns), False)

    def entry(self, model: str) -> ModelSettings | None:
        """The model-list entry serving `model`, if any."""
        for entry in self._entries:
            if entry.matches(model):
                return entry
        return None

    def routes_for(self, model: str) -> list[Route] | None:
        """The routes of a request for `model`, in order; None: the configured routes."""
        entry = self.entry(model)
        if entry is None:
            return None
        routes: list[Route] = []
        for target in entry.targets:
            base = self._routes[target.route]
            upstream = target.model or base.model
            name = base.name if target.model in (None, base.model) else f"{base.name}:{upstream}"
            if any(r.name == name for r in routes):
                continue
            routes.append(
                Route(
                    name,
                    base.base_url,
                    base.api_key,
                    upstream,
                    base.dialect,
                    target.context_tokens or entry.context_tokens or base.context_tokens,
                    base.headers,
                    base.beta_path,
                )
            )
        return routes

    def fallback_routes(self, names: list[str]) -> list[str | Route]:
        """A request's `fallbacks` with model-list names expanded to their routes."""
        out: list[str | Route] = []
        for name in names:
            routes = None if name in self._routes else self.routes_for(name)
            if routes is None:
                out.append(name)
            else:
                out.extend(routes)
        return out

    async def refresh(self, fetch: Callable[[], Awaitable[list[Any]]], now: float) -> None:
        """In discovery mode, fetch the upstream's model names when they are due (the
        gateway calls this for a listing, and for a request naming a model not served).

        Args:
            fetch: lists the upstream's models (`AsyncClient.models.list`).
            now: monotonic seconds.
        """
        if not self.discovers or now < self._next_fetch:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if now < self._next_fetch:
                return
            try:
                items = await fetch()
            except UpstreamStatusError as exc:
                if exc.status_code in (404, 405):
                    logger.info("the upstream has no /models; passing model names through")
                    self.served = ServedModels(frozenset(), (), True)
                    self._next_fetch = now + self._refresh_s
                else:
                    self.served = ServedModels(self.served.names, (), True)
                    self._next_fetch = now + RETRY_DISCOVERY_S
                return
            except UnbrokenError as exc:
                logger.warning("cannot list the upstream's models: %s", exc.message)
                # Let requests through: the upstream will say what it serves.
                self.served = ServedModels(self.served.names, (), True)
                self._next_fetch = now + RETRY_DISCOVERY_S
                return
            names = frozenset(
                str(item["id"])
                for item in items
                if isinstance(item, dict)
                and isinstance(item.get("id"), str)
                and 0 < len(item["id"]) <= MAX_MODEL_ID
            )
            self.served = ServedModels(names, (), not names)
            self._next_fetch = now + self._refresh_s
