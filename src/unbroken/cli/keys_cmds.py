"""`unbroken keys create|list|revoke|rotate`: gateway API keys kept in the store.

A key is shown once, when it is created or rotated; the store keeps only its SHA-256,
name, role, limits and allowed models. Keys are found by name or by the first characters
of their hash (the `id` that `keys list` prints). The gateway accepts stored keys when
`gateway.keys_in_store` is true. Registered on the CLI app by `cli/commands.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from unbroken.errors import ConfigError
from unbroken.settings import KeySettings, LimitSettings, Settings, hash_key
from unbroken.stores import open_store
from unbroken.stores.base import Store

__all__ = ["keys_app"]

T = TypeVar("T")

keys_app = typer.Typer(
    no_args_is_help=True,
    help="Gateway API keys in the store (gateway.store): create, list, revoke, rotate.",
)

# Key names go in logs, metrics-free usage tables and error messages: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# Printed ids: enough of the hash to be unique in any realistic key set.
ID_CHARS = 12
# The prefix of generated keys, so a leaked one is recognisable by secret scanners.
KEY_PREFIX = "sk-ub-"

_CONFIG = typer.Option(None, "--config", "-c", help="TOML config file (gateway.store)")
_STORE = typer.Option(
    None, "--store", help="store URL (default: gateway.store of the config or the env)"
)
_JSON = typer.Option(False, "--json", help="print JSON for scripts")


def _new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _store_url(config: str | None, store: str | None) -> tuple[str, bool]:
    settings = Settings.load(None if config is None else Path(config))
    url = store or settings.gateway.store
    if url == "memory":
        raise ConfigError(
            "keys live in a shared store, and gateway.store is 'memory' (one process's own); "
            "set gateway.store (or UNBROKEN_GATEWAY_STORE, or --store) to a redis:// URL"
        )
    return url, settings.gateway.keys_in_store


def _run(url: str, work: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        store = open_store(url)
        try:
            return await work(store)
        finally:
            await store.aclose()

    return anyio.run(main)


def _find(keys: list[KeySettings], ref: str) -> KeySettings:
    matches = [
        k for k in keys if (k.name == ref or (len(ref) >= 6 and k.sha256.startswith(ref.lower())))
    ]
    if not matches:
        raise ConfigError(f"no stored key is named {ref!r} or has an id starting with it")
    if len(matches) > 1:
        raise ConfigError(f"{ref!r} matches {len(matches)} keys; give more of the id")
    return matches[0]


def _describe(key: KeySettings) -> dict[str, Any]:
    limits = {
        name: getattr(key.limits, name)
        for name in key.limits.__dataclass_fields__
        if getattr(key.limits, name) is not None
    }
    return {
        "id": key.sha256[:ID_CHARS],
        "name": key.name,
        "role": key.role,
        "models": None if key.models is None else list(key.models),
        "limits": limits,
    }


def _show_secret(out: Console, secret: str, key: KeySettings, as_json: bool, note: str) -> None:
    info = _describe(key)
    if as_json:
        print(json.dumps({"key": secret, **info}))
        return
    out.print(f"{note} [bold]{escape(str(info['name']))}[/bold] (id {info['id']}):")
    print(secret, flush=True)
    out.print("[yellow]This is the only time the key is shown; store it now.[/yellow]")


def _hint(err: Console, keys_in_store: bool) -> None:
    if not keys_in_store:
        err.print(
            "[dim]note: the gateway accepts stored keys only with gateway.keys_in_store = true "
            "(UNBROKEN_GATEWAY_KEYS_IN_STORE=1)[/dim]"
        )


@keys_app.command("create")
def create(
    name: str = typer.Argument(..., help="a label for logs and usage (letters, digits, ._@-)"),
    model: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], "--model", "-m", help="a model this key may use, repeatable (default: every model)"
    ),
    admin: bool = typer.Option(False, "--admin", help="may read every key's usage"),
    rpm: float | None = typer.Option(None, "--rpm", help="requests per minute"),
    tpm: float | None = typer.Option(None, "--tpm", help="tokens per minute"),
    concurrent: int | None = typer.Option(None, "--concurrent", help="requests in flight"),
    daily_tokens: int | None = typer.Option(None, "--daily-tokens", help="tokens per UTC day"),
    daily_cost_usd: float | None = typer.Option(
        None, "--daily-cost-usd", help="spend per UTC day (USD)"
    ),
    config: str | None = _CONFIG,
    store: str | None = _STORE,
    as_json: bool = _JSON,
) -> None:
    """Create a key and print it once."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"key name {name[:70]!r} must be 1-64 letters, digits or ._@-")
    limits = LimitSettings.parse(
        {
            "requests_per_minute": rpm,
            "tokens_per_minute": tpm,
            "concurrent_streams": concurrent,
            "daily_tokens": daily_tokens,
            "daily_cost_usd": daily_cost_usd,
        },
        "keys create",
    )
    url, keys_in_store = _store_url(config, store)
    secret = _new_secret()
    key = KeySettings(
        name, hash_key(secret), limits, tuple(model) or None, "admin" if admin else "user"
    )

    async def work(s: Store) -> None:
        if any(k.name == name for k in await s.list_keys()):
            raise ConfigError(f"a key named {name!r} exists; rotate or revoke it instead")
        await s.put_key(key)

    _run(url, work)
    _show_secret(Console(), secret, key, as_json, "Created key")
    _hint(Console(stderr=True), keys_in_store)


@keys_app.command("list")
def list_keys(
    config: str | None = _CONFIG, store: str | None = _STORE, as_json: bool = _JSON
) -> None:
    """List stored keys (never the keys themselves)."""
    url, keys_in_store = _store_url(config, store)

    async def work(s: Store) -> list[KeySettings]:
        return await s.list_keys()

    rows = sorted((_describe(k) for k in _run(url, work)), key=lambda r: str(r["name"]))
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("id", "name", "role", "models", "limits")
    for row in rows:
        models = row["models"]
        table.add_row(
            str(row["id"]),
            escape(str(row["name"])),
            str(row["role"]),
            "all" if models is None else escape(", ".join(models)),
            ", ".join(f"{k}={v:g}" for k, v in row["limits"].items()) or "defaults",
        )
    Console().print(table)
    _hint(Console(stderr=True), keys_in_store)


@keys_app.command("revoke")
def revoke(
    ref: str = typer.Argument(..., help="the key's name or id"),
    config: str | None = _CONFIG,
    store: str | None = _STORE,
) -> None:
    """Delete a key; gateways refuse it within their key cache time (5 s by default)."""
    url, _ = _store_url(config, store)

    async def work(s: Store) -> KeySettings:
        key = _find(await s.list_keys(), ref)
        await s.delete_key(key.sha256)
        return key

    key = _run(url, work)
    Console().print(f"Revoked key {escape(key.name)} (id {key.sha256[:ID_CHARS]})")


@keys_app.command("rotate")
def rotate(
    ref: str = typer.Argument(..., help="the key's name or id"),
    config: str | None = _CONFIG,
    store: str | None = _STORE,
    as_json: bool = _JSON,
) -> None:
    """Give a key a new secret (same name, role, limits, models), shown once; the old one stops."""
    url, _ = _store_url(config, store)
    secret = _new_secret()

    async def work(s: Store) -> KeySettings:
        old = _find(await s.list_keys(), ref)
        new = dataclasses.replace(old, sha256=hash_key(secret))
        await s.put_key(new)
        await s.delete_key(old.sha256)
        return new

    key = _run(url, work)
    _show_secret(Console(), secret, key, as_json, "Rotated key")
