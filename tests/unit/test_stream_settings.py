"""The stream log's settings: defaults, env, and the values refused."""

from __future__ import annotations

import pytest

from unbroken.errors import ConfigError
from unbroken.settings import GatewaySettings, Settings


def test_defaults_and_env() -> None:
    """Defaults as documented; UNBROKEN_GATEWAY_* sets each."""
    g = GatewaySettings()
    assert (g.stream_ttl_s, g.resumable, g.detach_grace_s, g.stream_lease_s) == (
        600.0,
        False,
        30.0,
        3.0,
    )
    env = {
        "UNBROKEN_GATEWAY_STREAM_TTL_S": "60",
        "UNBROKEN_GATEWAY_RESUMABLE": "true",
        "UNBROKEN_GATEWAY_DETACH_GRACE_S": "5",
        "UNBROKEN_GATEWAY_STREAM_LEASE_S": "2",
        "UNBROKEN_GATEWAY_STREAM_MAX_BYTES": "4096",
        "UNBROKEN_GATEWAY_STREAMS_MAX_BYTES": "8192",
    }
    g = Settings.from_env(env).gateway
    assert (g.stream_ttl_s, g.resumable, g.detach_grace_s, g.stream_lease_s) == (
        60.0,
        True,
        5.0,
        2.0,
    )
    assert (g.stream_max_bytes, g.streams_max_bytes) == (4096, 8192)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stream_lease_s": 1.0}, "stream_lease_s must be >= 1.5"),
        ({"stream_ttl_s": 0}, "stream_ttl_s must be > 0"),
        ({"detach_grace_s": -1}, "detach_grace_s must be > 0"),
        ({"stream_max_bytes": 100}, "stream_max_bytes must be >= 1024"),
        ({"stream_max_bytes": 4096, "streams_max_bytes": 2048}, "streams_max_bytes >="),
    ],
)
def test_bad_values_are_refused(changes: dict[str, float], message: str) -> None:
    """Each bad value is a ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=message):
        GatewaySettings(**changes)  # type: ignore[arg-type]  # test data
