"""Routes (where an answer can come from) and what the client learns about each; pure.

Imports the standard library, `unbroken.errors` and core siblings only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from unbroken.core.breaker import CircuitBreaker
from unbroken.core.resume import Dialect
from unbroken.errors import ConfigError

__all__ = ["DIALECTS", "Route", "RouteHealth"]

DIALECTS: tuple[Dialect, ...] = ("deepseek", "vllm", "instruction", "none")


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream an answer may come from.

    Attributes:
        name: unique label (used in metrics, events and the final answer).
        base_url: the OpenAI-format base URL (`https://api.deepseek.com`, `.../v1`...).
        api_key: the Bearer key; never shown in reprs, logs or errors.
        model: the model to ask for on this route; None keeps the request's model.
        dialect: how this route continues a broken answer (see core.resume).
        context_tokens: the model's context window, if known (a request that overflows
            another route's context moves to a route with a larger one).
        headers: extra headers to send.
        beta_path: the path segment for DeepSeek's beta features.
    """

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    dialect: Dialect = "deepseek"
    context_tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    beta_path: str = "/beta"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a route needs a non-empty name")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"route {self.name!r}: base_url must start with http:// or https://, "
                f"got {self.base_url[:60]!r}"
            )
        if self.dialect not in DIALECTS:
            raise ConfigError(
                f"route {self.name!r}: dialect must be one of {', '.join(DIALECTS)}, "
                f"got {self.dialect!r}"
            )

    def url(self, path: str, *, beta: bool = False) -> str:
        """The full URL of `path` (e.g. `/chat/completions`) on this route.

        DeepSeek's beta base is `https://api.deepseek.com/beta`: a `/v1` suffix on the base
        URL is dropped before the beta path is added. A base URL that already ends in the
        beta path (DeepSeek's docs suggest one for prefix completion and FIM) is the root
        plus that path: it is not added twice, and plain paths go to the root.
        """
        base = self.base_url.rstrip("/")
        if self.beta_path and base.endswith(self.beta_path):
            base = base[: -len(self.beta_path)]
        if beta:
            if base.endswith("/v1"):
                base = base[:-3]
            base += self.beta_path
        return base + path

    def with_model(self, model: str, name: str | None = None) -> Route:
        """This route asking for another model (a per-request fallback on the same route)."""
        return replace(self, model=model, name=name or f"{self.name}:{model}")


class RouteHealth:
    """What the client learned about a route: its circuit breaker, parameters it rejects,
    and whether it rejected assistant prefill (then `instruction` is used to continue)."""

    __slots__ = ("breaker", "dialect_override", "dropped_params")

    def __init__(self, breaker: CircuitBreaker | None = None) -> None:
        self.breaker = breaker or CircuitBreaker()
        self.dropped_params: set[str] = set()
        self.dialect_override: Dialect | None = None

    def dialect(self, route: Route) -> Dialect:
        """The dialect to use for continuations on `route` now."""
        return self.dialect_override or route.dialect
