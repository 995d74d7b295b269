"""The gateway's error table: every SDK error maps to one status and OpenAI-shaped body,
upstream auth details and keys never show, Retry-After is whole seconds."""

from __future__ import annotations

import json
import re

import pytest

from unbroken.errors import (
    ConfigError,
    InvalidRequestError,
    ProtocolError,
    RateLimited,
    RetriesExhausted,
    StoreError,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from unbroken.gateway.problems import GatewayError, Scrubber, error_body, from_unbroken

KEY = "sk-upstream-secret-abcdef"
SCRUB = Scrubber([KEY, None, ""])


def status(code: int, message: str = "boom", **kw: object) -> UpstreamStatusError:
    # **kw carries kind / retry_after_s, typed loosely here for the table's brevity.
    return UpstreamStatusError(message, status_code=code, route="main", **kw)  # type: ignore[arg-type]


def exhausted(cause: UnbrokenError) -> RetriesExhausted:
    error = RetriesExhausted("gave up", attempts=3)
    error.__cause__ = cause
    return error


TABLE: list[tuple[UnbrokenError, int, str, str]] = [
    (
        status(400, "bad max_tokens", kind="bad_request"),
        400,
        "invalid_request_error",
        "bad_request",
    ),
    (status(422, "bad temperature"), 422, "invalid_request_error", "upstream_rejected"),
    (  # a message that is passed on keeps its text but loses key tails and keys
        status(400, f"bad request from ****cdef, i.e. {KEY}, or sk-other0123"),
        400,
        "invalid_request_error",
        "upstream_rejected",
    ),
    (
        status(401, "Authentication Fails, Your api key: ****cdef is invalid"),
        502,
        "upstream_error",
        "upstream_auth_failed",
    ),
    (status(403), 502, "upstream_error", "upstream_auth_failed"),
    (status(402, "Insufficient Balance"), 503, "upstream_error", "upstream_insufficient_balance"),
    (status(429, "slow down", retry_after_s=7.0), 429, "rate_limit_error", "upstream_rate_limited"),
    (status(503, "overloaded"), 502, "upstream_error", "upstream_error"),
    (exhausted(status(503, "overloaded")), 502, "upstream_error", "upstream_error"),
    (
        UpstreamTimeout("idle", phase="idle", timeout_s=60.0),
        504,
        "upstream_error",
        "upstream_timeout_idle",
    ),
    (UpstreamConnectError("refused"), 502, "upstream_error", "upstream_error"),
    (ProtocolError("bad bytes"), 502, "upstream_error", "upstream_error"),
    (InvalidRequestError("n must be positive"), 400, "invalid_request_error", "invalid_request"),
    (RateLimited("local", retry_after_s=2.0), 429, "rate_limit_error", "rate_limit_exceeded"),
    (StoreError("redis down"), 503, "server_error", "store_unavailable"),
    (ConfigError("bad"), 500, "server_error", "config_error"),
    (UnbrokenError("odd"), 502, "upstream_error", "upstream_error"),
]


@pytest.mark.parametrize(("error", "code", "kind", "name"), TABLE)
def test_status_table(error: UnbrokenError, code: int, kind: str, name: str) -> None:
    """Each SDK error has one status, type and code; bodies never carry the key."""
    mapped = from_unbroken(error, SCRUB)
    assert (mapped.status, mapped.type, mapped.code) == (code, kind, name)
    body = json.loads(mapped.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert KEY not in mapped.message
    # No key tail (`****cdef`) nor sk- key survives: only the `***` placeholder may.
    assert re.search(r"\*{2,}[A-Za-z0-9_-]|sk-[A-Za-z0-9_-]", mapped.message) is None
    assert "cdef" not in mapped.message


def test_exhausted_names_the_attempts() -> None:
    """After retries the message says how many attempts were made."""
    assert from_unbroken(exhausted(status(500)), SCRUB).message.startswith("after 3 attempts")


def test_scrubber_removes_keys_and_tails() -> None:
    """Known keys, key tails and sk- shaped tokens are replaced."""
    text = f"key {KEY} tail ****cd15 other sk-abcdefgh123 fine"
    assert SCRUB(text) == "key *** tail *** other *** fine"


def test_retry_after_is_whole_seconds() -> None:
    """Retry-After rounds up, never below 1, capped at a day; extra headers follow."""
    assert GatewayError(429, "x", retry_after_s=0.2).headers() == [(b"retry-after", b"1")]
    assert GatewayError(429, "x", retry_after_s=1.5).headers() == [(b"retry-after", b"2")]
    assert GatewayError(429, "x", retry_after_s=1e9).headers() == [(b"retry-after", b"86400")]
    allow = GatewayError(405, "x", headers=[(b"allow", b"GET")])
    assert allow.headers() == [(b"allow", b"GET")]
    assert json.loads(error_body("m", "t")) == {
        "error": {"message": "m", "type": "t", "param": None, "code": None}
    }
