"""The mock's control endpoints (/_mock/config, /_mock/log) reduced to pure functions: the
view of a configuration and the new configuration a POST asks for. Imports the standard
library, msgspec and mock siblings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from unbroken.errors import ConfigError
from unbroken.mock.apierrors import invalid
from unbroken.mock.config import FaultRule, Latency, MockConfig

__all__ = ["CONFIG_FIELDS", "config_view", "query_int", "reconfigure"]

# What POST /_mock/config may change (the rest needs a restart).
CONFIG_FIELDS = frozenset(
    {
        "seed",
        "latency",
        "answer_tokens",
        "reasoning_tokens",
        "faults",
        "fault_seed",
        "balance",
        "beta",
    }
)


def config_view(config: MockConfig) -> dict[str, object]:
    """The configuration as JSON-ready data (keys are counted, never shown)."""
    return {
        "seed": config.seed,
        "latency": dataclasses.asdict(config.latency),
        "answer_tokens": list(config.answer_tokens),
        "reasoning_tokens": list(config.reasoning_tokens),
        "faults": [dataclasses.asdict(rule) for rule in config.faults],
        "fault_seed": config.fault_seed,
        "balance": config.balance,
        "beta": config.beta,
        "n_api_keys": None if config.api_keys is None else len(config.api_keys),
    }


def reconfigure(config: MockConfig, raw: bytes) -> tuple[MockConfig, set[str]]:
    """The configuration a POST /_mock/config body asks for, and the fields it changed.

    Raises:
        ApiError: 400 naming the problem (not JSON, an unknown field, a bad value).
    """
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise invalid(f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("the /_mock/config body must be a JSON object")
    unknown = sorted(set(body) - CONFIG_FIELDS)
    if unknown:
        raise invalid(
            f"unknown /_mock/config field(s): {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(CONFIG_FIELDS))}"
        )
    try:
        return dataclasses.replace(config, **_changes(config, body)), set(body)
    except (ConfigError, TypeError, ValueError) as exc:
        raise invalid(f"invalid /_mock/config: {exc}") from None


def _changes(config: MockConfig, body: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in ("seed", "fault_seed"):
        if name in body:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer")
            changes[name] = value
    if "beta" in body:
        if not isinstance(body["beta"], bool):
            raise ValueError("beta must be true or false")
        changes["beta"] = body["beta"]
    if "balance" in body:
        if not isinstance(body["balance"], str):
            raise ValueError("balance must be a decimal string")
        changes["balance"] = body["balance"]
    for name in ("answer_tokens", "reasoning_tokens"):
        if name in body:
            value = body[name]
            if not isinstance(value, list) or len(value) != 2:
                raise ValueError(f"{name} must be [low, high]")
            changes[name] = (int(value[0]), int(value[1]))
    if "latency" in body:
        value = body["latency"]
        if not isinstance(value, dict):
            raise ValueError("latency must be an object")
        current = dataclasses.asdict(config.latency)
        current.update({k: float(v) for k, v in value.items()})
        changes["latency"] = Latency(**current)
    if "faults" in body:
        value = body["faults"]
        if not isinstance(value, list):
            raise ValueError("faults must be an array of rules")
        changes["faults"] = tuple(
            FaultRule(**rule) if isinstance(rule, dict) else FaultRule(str(rule)) for rule in value
        )
    return changes


def query_int(query_string: bytes, name: str, default: int) -> int:
    """An integer query parameter in [0, 100000], or `default` when absent or malformed."""
    for part in query_string.decode("latin-1").split("&"):
        key, _, value = part.partition("=")
        if key == name:
            try:
                return max(0, min(int(value), 100_000))
            except ValueError:
                return default
    return default
