"""Pure pieces of the gateway's hardening: its settings are checked, loopback host names
are recognised, JSON depth is bounded, page queries are parsed and lists are paged."""

from __future__ import annotations

import pytest

from unbroken.errors import ConfigError
from unbroken.gateway.exposure import is_loopback_host
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import MAX_JSON_DEPTH, decode_json
from unbroken.gateway.session_limits import Page, page_query, paged
from unbroken.settings import GatewaySettings, Settings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("head_timeout_s", 0),
        ("body_timeout_s", -1),
        ("max_headers", 0),
        ("max_connections", 0),
        ("max_connections_per_client", 0),
        ("max_head_bytes", 100),
        ("drain_grace_s", -1),
        ("reserve_tokens", 0),
        ("store_failure", "maybe"),
        ("sessions_per_key", 0),
        ("sessions_per_minute", 0),
        ("session_max_bytes", 0),
    ],
)
def test_bad_hardening_settings_name_the_setting(field: str, value: object) -> None:
    """Each hardening knob refuses a bad value with an error naming it."""
    with pytest.raises(ConfigError, match=field):
        GatewaySettings(**{field: value})  # type: ignore[arg-type]  # wrong on purpose


def test_hardening_settings_come_from_the_environment() -> None:
    """UNBROKEN_GATEWAY_* variables set the new knobs."""
    settings = Settings.from_env(
        {
            "UNBROKEN_GATEWAY_HEAD_TIMEOUT_S": "2.5",
            "UNBROKEN_GATEWAY_STORE_FAILURE": "open",
            "UNBROKEN_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "7",
        }
    )
    g = settings.gateway
    assert (g.head_timeout_s, g.store_failure, g.max_connections_per_client) == (2.5, "open", 7)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("LOCALHOST:8788", True),
        ("app.localhost", True),
        ("127.0.0.1", True),
        ("127.9.9.9:1", True),
        ("[::1]:8788", True),
        ("::1", True),
        ("localhost.evil.example", False),
        ("evil.example", False),
        ("10.0.0.1:80", False),
        ("[::2]", False),
        ("", False),
    ],
)
def test_loopback_host_names(host: str, expected: bool) -> None:
    """Loopback names and addresses, with or without a port; nothing else."""
    assert is_loopback_host(host) is expected


def test_json_depth_is_bounded() -> None:
    """MAX_JSON_DEPTH levels decode; one more is a 400, however the nesting is spelled."""
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_json(ok) is not None
    for raw in (
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
        b"[" * 50_000 + b"]" * 50_000,
    ):
        with pytest.raises(GatewayError) as refused:
            decode_json(raw)
        assert refused.value.status == 400
        assert refused.value.code == "invalid_json"
    # Brackets inside strings are not nesting.
    assert decode_json(b'["' + b"[" * 1000 + b'"]') == ["[" * 1000]


def test_page_queries() -> None:
    """limit within [1, most] and an optional cursor; anything else is a 400 on `limit`."""
    assert page_query(b"", 20, 100) == Page(20, None)
    assert page_query(b"limit=5&after=sess_1", 20, 100) == Page(5, "sess_1")
    assert page_query(b"after=", 20, 100) == Page(20, "")
    # "%C2%B3" is "³": a digit to str.isdigit(), not to int().
    for bad in (b"limit=0", b"limit=101", b"limit=x", b"limit=", b"limit=%C2%B3", b"limit=1&" * 30):
        with pytest.raises(GatewayError) as refused:
            page_query(bad, 20, 100)
        assert refused.value.status == 400


def test_paging_walks_a_list_once() -> None:
    """Following last_id visits every item once; an unknown cursor is an empty last page."""
    ids = [f"s{i}" for i in range(7)]
    seen: list[str] = []
    after = None
    while True:
        page = paged(ids, ids, Page(3, after))
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids
    assert paged(ids, ids, Page(3, "gone")) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
