"""The gateway's upstream pool size: `gateway.upstream_connections`, or sized from the
connection cap and the open-files limit, validated with errors that name the key."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from unbroken.errors import ConfigError
from unbroken.gateway.app import upstream_transport
from unbroken.gateway.upstream import MIN_POOL, SPARE_FDS, pool_size, spares_wanted
from unbroken.settings import GatewaySettings, Settings


def test_a_configured_size_is_used_as_is() -> None:
    assert pool_size(10_000, 4096, open_files=1024) == 10_000
    assert pool_size(3, 4096, open_files=1_000_000) == 3


@pytest.mark.parametrize(
    ("max_connections", "open_files", "expected"),
    [
        # Room for both sides: one upstream connection per downstream one.
        (4096, 1_048_576, 4096),
        (10_000, 1_048_576, 10_000),
        # Each side gets at most half of the open-files limit, less spares.
        (10_000, 20_000, (20_000 - SPARE_FDS) // 2),
        (4096, 1024, (1024 - SPARE_FDS) // 2),
        # Never below the minimum, even when the limit is tiny.
        (4096, 100, MIN_POOL),
    ],
)
def test_the_automatic_size_fits_the_open_files_limit(
    max_connections: int, open_files: int, expected: int
) -> None:
    assert pool_size(0, max_connections, open_files=open_files) == expected


def test_the_automatic_size_reads_the_hard_limit() -> None:
    """Without an explicit limit the process's hard RLIMIT_NOFILE is the budget (the server
    raises the soft limit to it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = (
        4096
        if hard == resource.RLIM_INFINITY
        else max(MIN_POOL, min(4096, (hard - SPARE_FDS) // 2))
    )
    assert pool_size(0, 4096) == expected


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="upstream_connections must be >= 0"):
        pool_size(-1, 4096)
    with pytest.raises(ConfigError, match="gateway upstream_connections must be >= 1, or 0"):
        GatewaySettings(upstream_connections=-5)


def test_the_setting_reaches_the_transport(tmp_path: Path) -> None:
    """From the config file and from the environment to the gateway's transport."""
    config = tmp_path / "unbroken.toml"
    config.write_text("[gateway]\nupstream_connections = 12000\n", encoding="utf-8")
    settings = Settings.load(config, {})
    assert settings.gateway.upstream_connections == 12000
    assert "max=12000" in repr(upstream_transport(settings))
    env = Settings.load(None, {"UNBROKEN_GATEWAY_UPSTREAM_CONNECTIONS": "77"})
    assert "max=77" in repr(upstream_transport(env))
    default = Settings.load(None, {})
    expected = pool_size(0, default.gateway.max_connections)
    assert f"max={expected}" in repr(upstream_transport(default))


def test_a_bad_value_in_the_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "unbroken.toml"
    config.write_text("[gateway]\nupstream_connections = 'many'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"gateway\.upstream_connections"):
        Settings.load(config, {})
    config.write_text("[gateway]\nupstream_connections = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"gateway\.upstream_connections must be an integer >= 0"):
        Settings.load(config, {})


@pytest.mark.parametrize(
    ("connect_s", "gap_s", "expected"),
    [
        # The requests expected while one connection is being opened.
        (0.015, 0.004, 4),
        (0.050, 0.004, 13),
        (0.001, 0.004, 1),
        # Requests slower than connects: none beyond the one that replaces a taken one.
        (0.001, 1.0, 1),
        # No connect measured yet.
        (0.0, 0.004, 0),
        # Requests all at once: as many as the caller's bound lets it open.
        (0.001, 0.0, 1 << 30),
    ],
)
def test_spares_cover_the_requests_expected_during_one_connect(
    connect_s: float, gap_s: float, expected: int
) -> None:
    assert spares_wanted(connect_s, gap_s) == expected
