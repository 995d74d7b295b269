"""Settings: one frozen object built once (from env and an optional TOML file) and passed down.

The only module that reads `os.environ`. Imports `unbroken.errors` only. The gateway's part
(`GatewaySettings`: routes, keys, limits, store, lifecycle knobs) is documented with every
key in docs/gateway.md and docs/unbroken.example.toml.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from unbroken.errors import ConfigError
from unbroken.modelconf import ModelSettings, parse_model_list

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_GATEWAY_PORT",
    "DEFAULT_MODELS",
    "GatewaySettings",
    "KeySettings",
    "LimitSettings",
    "RouteSettings",
    "Settings",
    "data_home",
    "debug_enabled",
    "env_api_key",
    "env_client",
    "hash_key",
    "openai_api_key",
]

# DeepSeek's documented OpenAI-format base URL (protocol.md §1.1).
DEFAULT_BASE_URL = "https://api.deepseek.com"
# One above the mock's 8787, so `unbroken mock` and `unbroken serve` can run side by side.
DEFAULT_GATEWAY_PORT = 8788
# The models DeepSeek serves under its stable aliases (protocol.md §1.2).
DEFAULT_MODELS = ("deepseek-chat", "deepseek-reasoner")
_DIALECTS = ("deepseek", "vllm", "instruction", "none")
_ROLES = ("user", "admin")
_LOG_FORMATS = ("text", "json")
# The proxy variables the gateway's upstream transport honours (curl's and httpx's names).
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def hash_key(key: str) -> str:
    """The stored form of a gateway API key: hex SHA-256 of its UTF-8 bytes.

    Gateway keys are long random tokens, so a fast hash is enough: nothing short enough to
    guess is ever hashed, and lookups stay O(1) per request.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw[:40]!r}") from None


def _number(value: object, name: str, *, low: float = 0.0, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{name} must be a number, got {value!r:.60}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r:.60}") from None
    if math.isnan(number) or number < low or (integer and number != int(number)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} >= {low:g}, got {value!r:.60}")
    return number


def _optional(value: object, name: str, *, integer: bool = False) -> float | None:
    if value is None or value == "":
        return None
    number = _number(value, name, integer=integer)
    return None if number == 0 else number


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name} must be true or false, got {value!r:.60}")


def _strings(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{name} must be a list of strings (or a comma-separated string)")


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Per-key limits; None (or 0 in a file) means unlimited.

    Attributes:
        requests_per_minute: chat requests per minute (token bucket, bursts up to N).
        tokens_per_minute: prompt + completion tokens per minute (estimated before the
            request, corrected from the billed usage after it).
        concurrent_streams: chat requests in flight at once.
        daily_tokens: billed tokens per UTC day.
        daily_cost_usd: billed cost per UTC day (DeepSeek prices, see core.pricing).
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrent_streams: int | None = None
    daily_tokens: int | None = None
    daily_cost_usd: float | None = None

    @classmethod
    def parse(cls, data: Mapping[str, object], where: str) -> LimitSettings:
        """Read the limit fields of a TOML table (unknown fields are not checked here)."""
        concurrent = _optional(
            data.get("concurrent_streams"), f"{where}.concurrent_streams", integer=True
        )
        daily = _optional(data.get("daily_tokens"), f"{where}.daily_tokens", integer=True)
        return cls(
            requests_per_minute=_optional(
                data.get("requests_per_minute"), f"{where}.requests_per_minute"
            ),
            tokens_per_minute=_optional(
                data.get("tokens_per_minute"), f"{where}.tokens_per_minute"
            ),
            concurrent_streams=None if concurrent is None else int(concurrent),
            daily_tokens=None if daily is None else int(daily),
            daily_cost_usd=_optional(data.get("daily_cost_usd"), f"{where}.daily_cost_usd"),
        )

    def over(self, defaults: LimitSettings) -> LimitSettings:
        """These limits, with unset ones taken from `defaults`."""
        return LimitSettings(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(defaults, f.name)
                for f in fields(self)
            }
        )


_LIMIT_FIELDS = frozenset(f.name for f in fields(LimitSettings))


@dataclass(frozen=True, slots=True)
class KeySettings:
    """One gateway API key, stored hashed.

    Attributes:
        name: a label for logs and errors (never the key itself).
        sha256: hex SHA-256 of the key (`hash_key`).
        limits: this key's limits; unset ones fall back to `GatewaySettings.limits`.
        models: the models this key may use; None allows every served model.
        role: `user`, or `admin` (may read every key's usage).
    """

    name: str
    sha256: str = field(repr=False)
    limits: LimitSettings = field(default_factory=LimitSettings)
    models: tuple[str, ...] | None = None
    role: str = "user"

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ConfigError(f"key {self.name!r}: role must be user or admin, got {self.role!r}")
        digest = self.sha256
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(
                f"key {self.name!r}: sha256 must be 64 lowercase hex digits (hash_key(key))"
            )


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """One upstream route of the gateway (see core.routes.Route).

    Attributes:
        name: unique label; also usable in a request's `fallbacks`.
        base_url: the OpenAI-format base URL.
        api_key: the upstream key (from `api_key_env` when set); never shown.
        model: the model to ask for on this route; None keeps the request's.
        dialect: how the route continues a broken answer.
        context_tokens: the model's context window (None: DeepSeek's 128K); gateway
            sessions trim their history to it.
    """

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    dialect: str = "deepseek"
    context_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("every gateway route needs a non-empty name")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"route {self.name!r}: base_url must start with http:// or https://, "
                f"got {self.base_url[:60]!r}"
            )
        if self.dialect not in _DIALECTS:
            raise ConfigError(
                f"route {self.name!r}: dialect must be one of {', '.join(_DIALECTS)}, "
                f"got {self.dialect!r}"
            )
        if self.context_tokens is not None and self.context_tokens < 1024:
            raise ConfigError(
                f"route {self.name!r}: context_tokens must be >= 1024, got {self.context_tokens}"
            )


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The gateway's answer cache (file table `[gateway.cache]`, env
    `UNBROKEN_GATEWAY_CACHE_*`); off until `store` is set.

    Attributes:
        store: "" (off), `memory`, `sqlite:///PATH` or a `redis://` URL.
        ttl_s: how long an answer is kept.
        max_bytes: the memory backend's bound.
        degrade: serve cached answers, marked stale, while the upstream is down.
        degrade_after_failures: answers in a row that failed before any output before the
            upstream counts as down.
        probe_after_s: while down, how often one request probes the upstream (and the
            Retry-After of a 503 for an uncached request).
        serve_models, serve_keys: models and key names whose hits are answered from the
            cache without an upstream call (FAQ traffic).
        serve_max_temperature: the highest temperature served from the cache.
        pace_s: seconds between replayed chunks of a hit (0: all at once).
        store_tool_calls: also store answers that end in tool calls.
    """

    store: str = ""
    ttl_s: float = 24 * 3600.0
    max_bytes: int = 64 * 1024 * 1024
    degrade: bool = True
    degrade_after_failures: int = 2
    probe_after_s: float = 5.0
    serve_models: tuple[str, ...] = ()
    serve_keys: tuple[str, ...] = ()
    serve_max_temperature: float = 0.0
    pace_s: float = 0.02
    store_tool_calls: bool = False

    def __post_init__(self) -> None:
        for name in ("ttl_s", "probe_after_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gateway.cache.{name} must be > 0, got {getattr(self, name)}")
        if self.pace_s < 0 or self.max_bytes <= 0 or self.degrade_after_failures < 1:
            raise ConfigError(
                "gateway.cache needs pace_s >= 0, max_bytes > 0 and degrade_after_failures >= 1"
            )

    @property
    def enabled(self) -> bool:
        """True when a store is configured."""
        return bool(self.store)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Settings of `unbroken serve` (file table `[gateway]`, env `UNBROKEN_GATEWAY_*`).

    Attributes:
        host, port: where to listen.
        routes: upstream routes in order; empty means one route `default` on the top-level
            `base_url` with the top-level `api_key`.
        models: the model names clients may ask for on every route (and `/v1/models`
            lists); empty (the default) with no `model_list` serves what the upstream's
            `/models` lists (see gateway/routing.py), or passes any name through when the
            upstream has no `/models`.
        model_list: public names (aliases, wildcards) mapped to ordered upstream targets,
            with prices and context sizes (`[[gateway.model_list]]`).
        model_refresh_s: how often discovered model names are fetched again.
        log_format: `text` or `json` (the access log and every other log line).
        access_log: write one line per request (logger `unbroken.access`).
        otel_endpoint: an OTLP/HTTP traces endpoint (`http://collector:4318/v1/traces`);
            empty disables the exporter (the `[otel]` extra).
        keys: gateway API keys (hashed). With none, the gateway serves without
            authentication, and only on loopback unless `allow_unauthenticated`.
        limits: default per-key limits (the anonymous caller's too).
        allow_unauthenticated: allow binding a non-loopback address without keys.
        store: `memory` or a `redis://` / `rediss://` URL for limits, counters and keys.
        sessions: where `/v1/sessions` keeps conversations: `memory`, `sqlite` (a file in
            the data directory), `sqlite:PATH`, or a `redis://` URL.
        keys_in_store: also accept keys kept in the store (`unbroken keys create`); implies
            that every API request needs a key.
        key_cache_s: how long a stored key's lookup is cached (a revoked key stops working
            within it).
        cors_origins: browser origins allowed to call the API (`*` for any).
        forward_headers: request headers passed upstream (names, or prefixes ending in
            `*`); Authorization, Host and hop-by-hop headers never are.
        max_body_bytes: the largest request body accepted.
        keepalive_s: idle seconds before a `: keep-alive` comment is sent downstream.
        send_timeout_s: how long one downstream write may block (a client that stopped
            reading) before its upstream request is cancelled.
        stream_buffer_bytes: upstream bytes read ahead of a slow client, per stream.
        drain_timeout_s: on SIGTERM, how long in-flight requests may finish.
        gzip_min_bytes: non-stream responses at least this big are gzipped when asked.
        slot_lease_s: how long a concurrency slot is held without renewal (a crashed
            instance's slots expire after this).
        connect_s, headers_s, first_token_s, idle_s: upstream stream timers (see
            `unbroken.Timeouts`: headers and first token run from the request, idle only
            between data events after the first token).
        failover_s: the cap on headers_s and first_token_s when a fallback route exists.
        retry_attempts, max_resumes, retry_wait_initial_s, retry_wait_max_s: upstream retries.
        max_head_bytes: the largest request line plus headers (431 past it).
        max_headers: the most request header fields (431 past it).
        head_timeout_s: how long a connection may take to send a whole request head
            (408, then the connection is closed).
        body_timeout_s: the longest pause between two pieces of a request body (408).
        max_connections: open connections per process; more are answered 503 and closed.
        max_connections_per_client: open connections per client address.
        upstream_connections: connections to the upstreams open at once per process (a
            request waits for a free one up to `headers_s`); 0 sizes the pool from
            `max_connections` and the open-files limit (gateway/upstream.py `pool_size`).
        drain_grace_s: on SIGTERM, how long the listener keeps accepting (new chats get
            503 with Retry-After, `/readyz` 503) before draining starts.
        reserve_tokens: the completion tokens a request without `max_tokens` reserves
            against token limits until its usage is known.
        store_failure: `closed` (a request the store cannot check is refused with 503) or
            `open` (it is served unlimited) while the store is unreachable.
        sessions_per_key, sessions_per_minute: how many sessions one key may hold, and
            create per minute.
        session_max_bytes, session_max_messages: how big one session may grow (its stored
            messages as JSON); a turn past either is refused with 413.
        retry_budget_ratio, retry_budget_min_per_s, retry_budget_window_s: the retry budget
            of each route (see `unbroken.RetryBudget`), kept per route and per key, so one
            key's failing traffic cannot spend the others' recovery; a spent budget paces
            retries, it does not fail them.
        stream_ttl_s: how long a streamed answer's log stays readable after it ended.
        stream_max_bytes, streams_max_bytes: the log's bound per stream and in total.
        resumable: answers keep generating when their client disconnects (per request:
            `"unbroken": {"resumable": true}` or `X-Unbroken-Resumable: 1`).
        detach_grace_s: how long a detached answer waits for a reconnect before its
            upstream is cancelled.
        stream_lease_s: how long a dead instance's answers wait before another instance
            takes them over (the writer renews its lease about every second).
        ws_queue_frames: frames queued per WebSocket connection before a client that does
            not read is cut (after `send_timeout_s`).
        ws_ping_interval_s, ws_ping_timeout_s: WebSocket heartbeat: a ping this often, and
            the connection closed when its pong is this late.
        cache: the answer cache (`[gateway.cache]`).
        widget_secret: the HS256 secret of widget tokens (JWTs the shop's backend mints for
            shoppers, docs/web.md); never shown. At least 32 characters.
        widget_jwks: a JWKS file of the public keys of widget tokens (RS256, ES256, EdDSA).
        widget_issuer, widget_audience: required `iss` / `aud` of widget tokens, when set.
        widget_max_ttl_s: the longest lifetime (`exp` - now) a widget token may claim.
        widget_limits: the limits of each widget token subject (`sub`), over `limits`.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_GATEWAY_PORT
    routes: tuple[RouteSettings, ...] = ()
    models: tuple[str, ...] = ()
    model_list: tuple[ModelSettings, ...] = ()
    model_refresh_s: float = 300.0
    log_format: str = "text"
    access_log: bool = True
    otel_endpoint: str = ""
    keys: tuple[KeySettings, ...] = ()
    limits: LimitSettings = field(default_factory=LimitSettings)
    allow_unauthenticated: bool = False
    store: str = "memory"
    sessions: str = "memory"
    keys_in_store: bool = False
    key_cache_s: float = 5.0
    cors_origins: tuple[str, ...] = ()
    forward_headers: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    # 3.5 s idle + a check every second at most: a keep-alive at least every 5 s, also
    # while the upstream is silent and the answer is being healed, so read timeouts hold.
    keepalive_s: float = 3.5
    send_timeout_s: float = 30.0
    stream_buffer_bytes: int = 256 * 1024
    drain_timeout_s: float = 30.0
    gzip_min_bytes: int = 1024
    slot_lease_s: float = 600.0
    connect_s: float = 10.0
    headers_s: float = 120.0
    first_token_s: float = 120.0
    idle_s: float = 20.0
    failover_s: float = 14.0
    retry_attempts: int = 8
    max_resumes: int = 5
    retry_wait_initial_s: float = 0.25
    retry_wait_max_s: float = 8.0
    max_head_bytes: int = 32 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096
    max_connections_per_client: int = 1024
    upstream_connections: int = 0
    drain_grace_s: float = 5.0
    reserve_tokens: int = 4096
    store_failure: str = "closed"
    sessions_per_key: int = 100
    sessions_per_minute: float = 30.0
    session_max_bytes: int = 1024 * 1024
    session_max_messages: int = 1000
    retry_budget_ratio: float = 2.0
    retry_budget_min_per_s: float = 1.0
    retry_budget_window_s: float = 60.0
    stream_ttl_s: float = 600.0
    stream_max_bytes: int = 64 * 1024 * 1024
    streams_max_bytes: int = 1024 * 1024 * 1024
    resumable: bool = False
    detach_grace_s: float = 30.0
    stream_lease_s: float = 3.0
    ws_queue_frames: int = 256
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    cache: CacheSettings = field(default_factory=CacheSettings)
    widget_secret: str | None = field(default=None, repr=False)
    widget_jwks: str | None = None
    widget_issuer: str | None = None
    widget_audience: str | None = None
    widget_max_ttl_s: float = 3600.0
    widget_limits: LimitSettings = field(default_factory=LimitSettings)

    def __post_init__(self) -> None:
        self._check_guard()
        if self.widget_secret is not None and len(self.widget_secret) < 32:
            raise ConfigError(
                "gateway widget_secret must be at least 32 characters (HS256 needs a key as "
                "long as its hash); generate one with `openssl rand -hex 32`"
            )
        if self.widget_max_ttl_s <= 0:
            raise ConfigError(f"gateway widget_max_ttl_s must be > 0, got {self.widget_max_ttl_s}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway port must be within [0, 65535], got {self.port}")
        if self.store != "memory" and not self.store.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"gateway store must be 'memory' or a redis:// URL, got {self.store[:60]!r}"
            )
        for name in (
            "keepalive_s",
            "send_timeout_s",
            "drain_timeout_s",
            "slot_lease_s",
            "stream_ttl_s",
            "detach_grace_s",
            "ws_ping_interval_s",
            "ws_ping_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gateway {name} must be > 0, got {getattr(self, name)}")
        if self.ws_queue_frames < 1:
            raise ConfigError(f"gateway ws_queue_frames must be >= 1, got {self.ws_queue_frames}")
        if self.max_body_bytes < 1024 or self.stream_buffer_bytes < 4096:
            raise ConfigError("gateway max_body_bytes must be >= 1024, stream_buffer_bytes >= 4096")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError(f"gateway log_format must be text or json, got {self.log_format!r}")
        if self.model_refresh_s <= 0:
            raise ConfigError(f"gateway model_refresh_s must be > 0, got {self.model_refresh_s}")
        if self.sessions not in ("memory", "sqlite") and not self.sessions.startswith(
            ("sqlite:", "redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                "gateway sessions must be 'memory', 'sqlite', 'sqlite:PATH' or a redis:// "
                f"URL, got {self.sessions[:60]!r}"
            )
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ConfigError(f"gateway route names must be unique, got {names}")
        digests = [k.sha256 for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ConfigError("two gateway keys have the same hash")
        if self.retry_attempts < 1:
            raise ConfigError(f"gateway retry_attempts must be >= 1, got {self.retry_attempts}")
        for name in ("connect_s", "headers_s", "first_token_s", "idle_s", "failover_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gateway {name} must be > 0, got {getattr(self, name)}")
        if self.retry_budget_ratio < 0 or self.retry_budget_min_per_s < 0:
            raise ConfigError(
                "gateway retry_budget_ratio and retry_budget_min_per_s must be >= 0, got "
                f"{self.retry_budget_ratio} and {self.retry_budget_min_per_s}"
            )
        if self.retry_budget_window_s <= 0:
            raise ConfigError(
                f"gateway retry_budget_window_s must be > 0, got {self.retry_budget_window_s}"
            )
        if self.stream_lease_s < 1.5:
            # renewed every ~1 s: a shorter lease would expire between two renewals
            raise ConfigError(f"gateway stream_lease_s must be >= 1.5, got {self.stream_lease_s}")
        if self.stream_max_bytes < 1024 or self.streams_max_bytes < self.stream_max_bytes:
            raise ConfigError(
                "gateway stream_max_bytes must be >= 1024 and streams_max_bytes >= "
                f"stream_max_bytes, got {self.stream_max_bytes} and {self.streams_max_bytes}"
            )

    def _check_guard(self) -> None:
        for name in ("head_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gateway {name} must be > 0, got {getattr(self, name)}")
        for name in (
            "max_headers",
            "max_connections",
            "max_connections_per_client",
            "sessions_per_key",
            "session_max_messages",
            "session_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"gateway {name} must be >= 1, got {getattr(self, name)}")
        if self.upstream_connections < 0:
            raise ConfigError(
                "gateway upstream_connections must be >= 1, or 0 to size the pool from "
                f"max_connections and the open-files limit, got {self.upstream_connections}"
            )
        if self.max_head_bytes < 1024:
            raise ConfigError(f"gateway max_head_bytes must be >= 1024, got {self.max_head_bytes}")
        if self.sessions_per_minute <= 0:
            raise ConfigError(
                f"gateway sessions_per_minute must be > 0, got {self.sessions_per_minute}"
            )
        if self.drain_grace_s < 0 or self.reserve_tokens < 1:
            raise ConfigError("gateway drain_grace_s must be >= 0 and reserve_tokens >= 1")
        if self.store_failure not in ("open", "closed"):
            raise ConfigError(
                f"gateway store_failure must be 'open' or 'closed', got {self.store_failure!r:.40}"
            )

    @property
    def is_loopback(self) -> bool:
        """True when `host` is a loopback address."""
        return _is_loopback(self.host)

    @property
    def has_widget_tokens(self) -> bool:
        """True when widget tokens (a secret or a JWKS file) are configured."""
        return bool(self.widget_secret or self.widget_jwks)

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address without keys unless explicitly allowed.

        Raises:
            ConfigError: keys are missing for a public bind; the message says what to do.
        """
        if (
            not self.keys
            and not self.keys_in_store
            and not self.has_widget_tokens
            and not self.is_loopback
            and not self.allow_unauthenticated
        ):
            raise ConfigError(
                f"refusing to serve {self.host} without gateway keys: anyone who can reach "
                "it could spend your upstream credit; add [[gateway.keys]] (or "
                "UNBROKEN_GATEWAY_KEY), or pass --allow-unauthenticated to accept the risk"
            )


@dataclass(frozen=True, slots=True)
class Settings:
    """Process-wide settings; every field has a safe default.

    Attributes:
        api_key: the upstream key (`DEEPSEEK_API_KEY`); never logged or shown in a repr.
        base_url: the upstream base URL (`UNBROKEN_BASE_URL`).
        max_event_bytes: the largest SSE event accepted (`UNBROKEN_MAX_EVENT_BYTES`).
        gateway: the gateway's settings.
        proxy_env: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (upper or lower
            case) as found in the environment, for the gateway's upstream transport.
    """

    api_key: str | None = None
    base_url: str = DEFAULT_BASE_URL
    max_event_bytes: int = 16 * 1024 * 1024
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    proxy_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.max_event_bytes < 1024:
            raise ConfigError(
                f"UNBROKEN_MAX_EVENT_BYTES must be >= 1024, got {self.max_event_bytes}"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"UNBROKEN_BASE_URL must start with http:// or https://, got {self.base_url[:60]!r}"
            )

    def __repr__(self) -> str:
        key = "None" if self.api_key is None else "'***'"
        return (
            f"Settings(api_key={key}, base_url={self.base_url!r}, "
            f"max_event_bytes={self.max_event_bytes})"
        )

    def upstream_routes(self) -> tuple[RouteSettings, ...]:
        """The gateway's upstream routes (the configured ones, or one on `base_url`)."""
        if self.gateway.routes:
            return self.gateway.routes
        return (RouteSettings("default", self.base_url, self.api_key),)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `DEEPSEEK_API_KEY` and `UNBROKEN_*` variables.

        Raises:
            ConfigError: a variable is malformed; the message names it.
        """
        env = os.environ if environ is None else environ
        return cls(
            api_key=env.get("DEEPSEEK_API_KEY") or None,
            base_url=env.get("UNBROKEN_BASE_URL") or DEFAULT_BASE_URL,
            max_event_bytes=_int(env, "UNBROKEN_MAX_EVENT_BYTES", 16 * 1024 * 1024),
            gateway=_gateway_env(GatewaySettings(), env),
            proxy_env=_proxy_env(env),
        )

    @classmethod
    def load(
        cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from a TOML file (`path`, else `UNBROKEN_CONFIG` if set), then
        let `DEEPSEEK_API_KEY` and `UNBROKEN_*` variables override it.

        Raises:
            ConfigError: the file is missing or malformed, or a value is out of range; the
                message names the file, key or variable.
        """
        env = os.environ if environ is None else environ
        where = path if path is not None else env.get("UNBROKEN_CONFIG") or None
        data: dict[str, Any] = {}
        if where is not None:
            try:
                with open(where, "rb") as handle:
                    data = tomllib.load(handle)
            except OSError as exc:
                raise ConfigError(
                    f"cannot read config file {str(where)!r}: {exc.strerror}"
                ) from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {str(where)!r} is not valid TOML: {exc}") from None
        return _from_mapping(data, env)


# -- TOML ------------------------------------------------------------------------------------

_TOP_KEYS = frozenset({"base_url", "api_key", "api_key_env", "max_event_bytes", "gateway"})
_GATEWAY_SCALARS: dict[str, Literal["str", "int", "float", "bool", "list"]] = {
    "host": "str",
    "port": "int",
    "allow_unauthenticated": "bool",
    "store": "str",
    "sessions": "str",
    "keys_in_store": "bool",
    "key_cache_s": "float",
    "cors_origins": "list",
    "forward_headers": "list",
    "models": "list",
    "max_body_bytes": "int",
    "keepalive_s": "float",
    "send_timeout_s": "float",
    "stream_buffer_bytes": "int",
    "drain_timeout_s": "float",
    "gzip_min_bytes": "int",
    "slot_lease_s": "float",
    "connect_s": "float",
    "headers_s": "float",
    "first_token_s": "float",
    "idle_s": "float",
    "failover_s": "float",
    "retry_attempts": "int",
    "max_resumes": "int",
    "retry_wait_initial_s": "float",
    "retry_wait_max_s": "float",
    "max_head_bytes": "int",
    "max_headers": "int",
    "head_timeout_s": "float",
    "body_timeout_s": "float",
    "max_connections": "int",
    "max_connections_per_client": "int",
    "upstream_connections": "int",
    "drain_grace_s": "float",
    "reserve_tokens": "int",
    "store_failure": "str",
    "sessions_per_key": "int",
    "sessions_per_minute": "float",
    "session_max_bytes": "int",
    "session_max_messages": "int",
    "retry_budget_ratio": "float",
    "retry_budget_min_per_s": "float",
    "retry_budget_window_s": "float",
    "model_refresh_s": "float",
    "log_format": "str",
    "access_log": "bool",
    "otel_endpoint": "str",
    "stream_ttl_s": "float",
    "stream_max_bytes": "int",
    "streams_max_bytes": "int",
    "resumable": "bool",
    "detach_grace_s": "float",
    "stream_lease_s": "float",
    "ws_queue_frames": "int",
    "ws_ping_interval_s": "float",
    "ws_ping_timeout_s": "float",
    "widget_secret": "str",
    "widget_jwks": "str",
    "widget_issuer": "str",
    "widget_audience": "str",
    "widget_max_ttl_s": "float",
}
_GATEWAY_TABLES = frozenset({"routes", "keys", "limits", "model_list", "cache", "widget_limits"})


def _unknown(table: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(
            f"unknown key(s) in {where}: {', '.join(extra)}; known: {', '.join(sorted(allowed))}"
        )


def _scalar(value: object, kind: str, name: str) -> object:
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r:.60}")
        return value
    if kind == "bool":
        return _bool(value, name)
    if kind == "list":
        return _strings(value, name)
    number = _number(value, name, integer=kind == "int")
    return int(number) if kind == "int" else number


def _secret(table: Mapping[str, object], env: Mapping[str, str], where: str) -> str | None:
    ref = table.get("api_key_env")
    if ref is not None:
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"{where}.api_key_env must name an environment variable")
        return env.get(ref) or None
    literal = table.get("api_key")
    if literal is not None and not isinstance(literal, str):
        raise ConfigError(f"{where}.api_key must be a string")
    return literal or None


def _routes(items: object, env: Mapping[str, str]) -> tuple[RouteSettings, ...]:
    if not isinstance(items, list):
        raise ConfigError("gateway.routes must be an array of tables ([[gateway.routes]])")
    routes = []
    allowed = frozenset(
        {"name", "base_url", "api_key", "api_key_env", "model", "dialect", "context_tokens"}
    )
    for i, item in enumerate(items):
        where = f"gateway.routes[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        _unknown(item, allowed, where)
        name, base_url = item.get("name"), item.get("base_url")
        model, dialect = item.get("model"), item.get("dialect", "deepseek")
        if not isinstance(name, str) or not isinstance(base_url, str):
            raise ConfigError(f"{where} needs string `name` and `base_url`")
        if model is not None and not isinstance(model, str):
            raise ConfigError(f"{where}.model must be a string")
        if not isinstance(dialect, str):
            raise ConfigError(f"{where}.dialect must be a string")
        context = item.get("context_tokens")
        if context is not None and (not isinstance(context, int) or isinstance(context, bool)):
            raise ConfigError(f"{where}.context_tokens must be an integer")
        routes.append(
            RouteSettings(name, base_url, _secret(item, env, where), model, dialect, context)
        )
    return tuple(routes)


def _keys(items: object) -> tuple[KeySettings, ...]:
    if not isinstance(items, list):
        raise ConfigError("gateway.keys must be an array of tables ([[gateway.keys]])")
    keys = []
    allowed = frozenset({"name", "sha256", "models", "role"}) | _LIMIT_FIELDS
    for i, item in enumerate(items):
        where = f"gateway.keys[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        _unknown(item, allowed, where)
        name, digest = item.get("name", f"key{i}"), item.get("sha256")
        if not isinstance(name, str) or not isinstance(digest, str):
            raise ConfigError(f"{where} needs a string `sha256` (hash_key of the key)")
        models, role = item.get("models"), item.get("role", "user")
        if not isinstance(role, str):
            raise ConfigError(f"{where}.role must be user or admin")
        keys.append(
            KeySettings(
                name,
                digest.lower(),
                LimitSettings.parse(item, where),
                None if models is None else _strings(models, f"{where}.models"),
                role,
            )
        )
    return tuple(keys)


_CACHE_FIELDS: dict[str, Literal["str", "int", "float", "bool", "list"]] = {
    "store": "str",
    "ttl_s": "float",
    "max_bytes": "int",
    "degrade": "bool",
    "degrade_after_failures": "int",
    "probe_after_s": "float",
    "serve_models": "list",
    "serve_keys": "list",
    "serve_max_temperature": "float",
    "pace_s": "float",
    "store_tool_calls": "bool",
}


def _cache(table: object, base: CacheSettings, where: str, *, env: bool = False) -> CacheSettings:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table ([{where}])")
    _unknown(table, frozenset(_CACHE_FIELDS), f"[{where}]")
    changes: dict[str, Any] = {
        name: _scalar(table[name], kind, f"{where}_{name.upper()}" if env else f"{where}.{name}")
        for name, kind in _CACHE_FIELDS.items()
        if name in table
    }
    return replace(base, **changes) if changes else base


def _from_mapping(data: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    _unknown(data, _TOP_KEYS, "the config file")
    gateway_table = data.get("gateway", {})
    if not isinstance(gateway_table, dict):
        raise ConfigError("gateway must be a table ([gateway])")
    _unknown(gateway_table, frozenset(_GATEWAY_SCALARS) | _GATEWAY_TABLES, "[gateway]")
    changes: dict[str, Any] = {
        name: _scalar(gateway_table[name], kind, f"gateway.{name}")
        for name, kind in _GATEWAY_SCALARS.items()
        if name in gateway_table
    }
    if "routes" in gateway_table:
        changes["routes"] = _routes(gateway_table["routes"], env)
    if "keys" in gateway_table:
        changes["keys"] = _keys(gateway_table["keys"])
    if "model_list" in gateway_table:
        route_names = tuple(r.name for r in changes.get("routes", ())) or ("default",)
        changes["model_list"] = parse_model_list(gateway_table["model_list"], route_names)
    if "limits" in gateway_table:
        limits = gateway_table["limits"]
        if not isinstance(limits, dict):
            raise ConfigError("gateway.limits must be a table")
        _unknown(limits, _LIMIT_FIELDS, "[gateway.limits]")
        changes["limits"] = LimitSettings.parse(limits, "gateway.limits")
    if "cache" in gateway_table:
        changes["cache"] = _cache(gateway_table["cache"], CacheSettings(), "gateway.cache")
    if "widget_limits" in gateway_table:
        limits = gateway_table["widget_limits"]
        if not isinstance(limits, dict):
            raise ConfigError("gateway.widget_limits must be a table")
        _unknown(limits, _LIMIT_FIELDS, "[gateway.widget_limits]")
        changes["widget_limits"] = LimitSettings.parse(limits, "gateway.widget_limits")
    gateway = _gateway_env(GatewaySettings(**changes), env)
    base_url = data.get("base_url", DEFAULT_BASE_URL)
    if not isinstance(base_url, str):
        raise ConfigError("base_url must be a string")
    max_event = int(
        _number(data.get("max_event_bytes", 16 * 1024 * 1024), "max_event_bytes", integer=True)
    )
    return Settings(
        api_key=env.get("DEEPSEEK_API_KEY") or _secret(data, env, "the config file"),
        base_url=env.get("UNBROKEN_BASE_URL") or base_url,
        max_event_bytes=_int(env, "UNBROKEN_MAX_EVENT_BYTES", max_event),
        gateway=gateway,
        proxy_env=_proxy_env(env),
    )


# -- environment -----------------------------------------------------------------------------

_ENV_LIMITS = {
    "UNBROKEN_GATEWAY_RPM": "requests_per_minute",
    "UNBROKEN_GATEWAY_TPM": "tokens_per_minute",
    "UNBROKEN_GATEWAY_CONCURRENT_STREAMS": "concurrent_streams",
    "UNBROKEN_GATEWAY_DAILY_TOKENS": "daily_tokens",
    "UNBROKEN_GATEWAY_DAILY_COST_USD": "daily_cost_usd",
}


def _env_keys(raw: str) -> tuple[KeySettings, ...]:
    keys = []
    for i, part in enumerate(p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, digest = part.partition("=")
        if not sep:
            name, digest = f"env{i}", part
        keys.append(KeySettings(name.strip(), digest.strip().lower()))
    return tuple(keys)


def _gateway_env(gateway: GatewaySettings, env: Mapping[str, str]) -> GatewaySettings:
    changes: dict[str, Any] = {}
    for name, kind in _GATEWAY_SCALARS.items():
        variable = f"UNBROKEN_GATEWAY_{name.upper()}"
        raw = env.get(variable)
        if raw is not None and raw != "":
            changes[name] = _scalar(raw, kind, variable)
    keys = list(gateway.keys)
    if env.get("UNBROKEN_GATEWAY_KEYS"):
        keys.extend(_env_keys(env["UNBROKEN_GATEWAY_KEYS"]))
    if env.get("UNBROKEN_GATEWAY_KEY"):
        keys.append(KeySettings("env", hash_key(env["UNBROKEN_GATEWAY_KEY"])))
    if len(keys) != len(gateway.keys):
        changes["keys"] = tuple(keys)
    limit_changes: dict[str, Any] = {}
    for variable, name in _ENV_LIMITS.items():
        raw = env.get(variable)
        if raw is not None and raw != "":
            integer = name in ("concurrent_streams", "daily_tokens")
            value = _optional(raw, variable, integer=integer)
            limit_changes[name] = int(value) if integer and value is not None else value
    if limit_changes:
        changes["limits"] = replace(gateway.limits, **limit_changes)
    cache_env = {
        name: env[variable]
        for name in _CACHE_FIELDS
        if env.get(variable := f"UNBROKEN_GATEWAY_CACHE_{name.upper()}")
    }
    if cache_env:
        changes["cache"] = _cache(cache_env, gateway.cache, "UNBROKEN_GATEWAY_CACHE", env=True)
    return replace(gateway, **changes) if changes else gateway


def _proxy_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    found = []
    for name in _PROXY_VARIABLES:
        value = env.get(name) or env.get(name.lower())
        if value:
            found.append((name, value))
    return tuple(found)


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """UNBROKEN_DEBUG=1: the CLI shows tracebacks instead of one-line errors."""
    env = os.environ if environ is None else environ
    return env.get("UNBROKEN_DEBUG", "") not in ("", "0", "false", "no")


def env_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """DEEPSEEK_API_KEY, for the SDK clients (which need nothing else from the env, so a
    malformed gateway variable never breaks a client)."""
    env = os.environ if environ is None else environ
    return env.get("DEEPSEEK_API_KEY") or None


def env_client(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(key, base URL) for an SDK client built without them: DEEPSEEK_API_KEY and
    DEEPSEEK_BASE_URL, else OPENAI_BASE_URL, as code written for openai sets it. The
    OPENAI_API_KEY is taken only with a base URL from the environment that is not
    DeepSeek's, so an OpenAI key is never sent to another provider by default."""
    env = os.environ if environ is None else environ
    base = env.get("DEEPSEEK_BASE_URL") or env.get("OPENAI_BASE_URL") or None
    key = env.get("DEEPSEEK_API_KEY") or None
    if key is None and base is not None and "deepseek.com" not in base:
        key = env.get("OPENAI_API_KEY") or None
    return key, base


def openai_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """OPENAI_API_KEY, for the CLI talking to a --base-url (a gateway's key, say)."""
    env = os.environ if environ is None else environ
    return env.get("OPENAI_API_KEY") or None


def data_home(environ: Mapping[str, str] | None = None) -> str | None:
    """XDG_DATA_HOME, where the CLI keeps its session database, if set."""
    env = os.environ if environ is None else environ
    return env.get("XDG_DATA_HOME") or None
