"""Settings: env and TOML loading, validation messages that name the key, secrets kept
out of reprs, the gateway's safe-by-default exposure check."""

from __future__ import annotations

from pathlib import Path

import pytest

from unbroken.errors import ConfigError
from unbroken.settings import (
    DEFAULT_BASE_URL,
    GatewaySettings,
    KeySettings,
    LimitSettings,
    RouteSettings,
    Settings,
    hash_key,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "unbroken.example.toml"


def test_from_env_keeps_the_client_fields() -> None:
    """from_env reads the upstream key and URL as before; defaults otherwise."""
    settings = Settings.from_env({"DEEPSEEK_API_KEY": "sk-x", "UNBROKEN_BASE_URL": "http://h:1"})
    assert settings.api_key == "sk-x"
    assert settings.base_url == "http://h:1"
    assert Settings.from_env({}).base_url == DEFAULT_BASE_URL
    assert "sk-x" not in repr(settings)


def test_gateway_env_variables() -> None:
    """UNBROKEN_GATEWAY_* set gateway fields, limits and keys (plain or hashed)."""
    env = {
        "UNBROKEN_GATEWAY_PORT": "9000",
        "UNBROKEN_GATEWAY_CORS_ORIGINS": "https://a.example, https://b.example",
        "UNBROKEN_GATEWAY_ALLOW_UNAUTHENTICATED": "true",
        "UNBROKEN_GATEWAY_KEEPALIVE_S": "2.5",
        "UNBROKEN_GATEWAY_RPM": "60",
        "UNBROKEN_GATEWAY_CONCURRENT_STREAMS": "4",
        "UNBROKEN_GATEWAY_KEY": "sk-plain",
        "UNBROKEN_GATEWAY_KEYS": f"ops={hash_key('sk-ops')}",
    }
    g = Settings.from_env(env).gateway
    assert g.port == 9000
    assert g.cors_origins == ("https://a.example", "https://b.example")
    assert g.allow_unauthenticated is True
    assert g.keepalive_s == 2.5
    assert g.limits == LimitSettings(requests_per_minute=60, concurrent_streams=4)
    assert {k.name: k.sha256 for k in g.keys} == {
        "ops": hash_key("sk-ops"),
        "env": hash_key("sk-plain"),
    }


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"UNBROKEN_GATEWAY_PORT": "http"}, "UNBROKEN_GATEWAY_PORT must be a number"),
        ({"UNBROKEN_GATEWAY_PORT": "70000"}, "port must be within"),
        ({"UNBROKEN_GATEWAY_RPM": "-1"}, "UNBROKEN_GATEWAY_RPM must be a number >= 0"),
        ({"UNBROKEN_GATEWAY_ALLOW_UNAUTHENTICATED": "maybe"}, "must be true or false"),
        ({"UNBROKEN_GATEWAY_STORE": "postgres://x"}, "redis:// URL"),
        ({"UNBROKEN_GATEWAY_KEYS": "a=notahash"}, "64 lowercase hex"),
        ({"UNBROKEN_MAX_EVENT_BYTES": "10"}, ">= 1024"),
    ],
)
def test_bad_env_names_the_variable(env: dict[str, str], words: str) -> None:
    """A malformed variable raises ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert words in str(info.value)


def test_toml_file(tmp_path: Path) -> None:
    """A TOML file sets routes (keys from env), keys with limits, defaults; env wins."""
    config = tmp_path / "u.toml"
    config.write_text(
        f"""
base_url = "http://top:1"
api_key_env = "TOP_KEY"
[gateway]
host = "127.0.0.2"
models = ["deepseek-chat"]
forward_headers = ["x-mock-*"]
[gateway.limits]
tokens_per_minute = 1000
daily_cost_usd = 0
[[gateway.routes]]
name = "main"
base_url = "http://main:1"
api_key_env = "MAIN_KEY"
[[gateway.routes]]
name = "backup"
base_url = "http://backup:1/v1"
model = "deepseek-v4-flash"
dialect = "vllm"
[[gateway.keys]]
name = "team"
sha256 = "{hash_key("sk-team")}"
requests_per_minute = 10
models = ["deepseek-chat"]
""",
        encoding="utf-8",
    )
    env = {"TOP_KEY": "sk-top", "MAIN_KEY": "sk-main", "UNBROKEN_GATEWAY_PORT": "7001"}
    settings = Settings.load(config, env)
    g = settings.gateway
    assert settings.api_key == "sk-top"
    assert settings.base_url == "http://top:1"
    assert g.host == "127.0.0.2"
    assert g.port == 7001
    assert g.limits == LimitSettings(tokens_per_minute=1000)
    assert g.routes == (
        RouteSettings("main", "http://main:1", "sk-main"),
        RouteSettings("backup", "http://backup:1/v1", None, "deepseek-v4-flash", "vllm"),
    )
    assert settings.upstream_routes() == g.routes
    assert g.keys == (
        KeySettings(
            "team", hash_key("sk-team"), LimitSettings(requests_per_minute=10), ("deepseek-chat",)
        ),
    )
    assert "sk-main" not in repr(g)
    merged = g.keys[0].limits.over(g.limits)
    assert merged == LimitSettings(requests_per_minute=10, tokens_per_minute=1000)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[gateway]\nprot = 1\n", "unknown key(s) in [gateway]: prot"),
        ("[gateway]\nport = 'x'\n", "gateway.port must be a number"),
        ("nonsense = 1\n", "unknown key(s) in the config file: nonsense"),
        ("[[gateway.routes]]\nname = 'a'\n", "gateway.routes[0] needs string"),
        ("[[gateway.routes]]\nname='a'\nbase_url='ftp://x'\n", "http:// or https://"),
        ("[[gateway.keys]]\nname = 'a'\n", "gateway.keys[0] needs a string `sha256`"),
        ("[gateway.limits]\nrpm = 1\n", "unknown key(s) in [gateway.limits]"),
        ("[gateway\n", "is not valid TOML"),
    ],
)
def test_bad_toml_names_the_key(tmp_path: Path, text: str, words: str) -> None:
    """A malformed file raises ConfigError naming the key and the problem."""
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Settings.load(config, {})
    assert words in str(info.value)


def test_missing_file_and_unconfigured_load(tmp_path: Path) -> None:
    """A missing file is a ConfigError; no file at all is the defaults."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(tmp_path / "nope.toml", {})
    assert Settings.load(None, {}) == Settings()
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.load(None, {"UNBROKEN_CONFIG": str(tmp_path / "x")})


def test_exposure_is_safe_by_default() -> None:
    """Without keys only loopback is served, unless explicitly allowed."""
    GatewaySettings(host="127.0.0.1").check_exposure()
    GatewaySettings(host="::1").check_exposure()
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0"):
        GatewaySettings(host="0.0.0.0").check_exposure()  # noqa: S104 - refused, never bound
    GatewaySettings(host="0.0.0.0", allow_unauthenticated=True).check_exposure()  # noqa: S104
    keyed = GatewaySettings(host="10.1.2.3", keys=(KeySettings("k", hash_key("sk")),))
    keyed.check_exposure()


def test_example_config_loads() -> None:
    """docs/unbroken.example.toml is a valid config."""
    settings = Settings.load(EXAMPLE, {"DEEPSEEK_API_KEY": "sk"})
    assert settings.gateway.routes
    assert settings.gateway.keys
