"""The error tree: openai's names and ours both catch the same failures."""

from __future__ import annotations

import pytest

import unbroken
from unbroken.errors import (
    RetriesExhausted,
    UpstreamStatusError,
    UpstreamTimeout,
    retries_exhausted,
    status_error_class,
)

# (status, openai's class name) from openai-python's `_make_status_error`, as a literal table.
STATUS_NAMES = [
    (400, "BadRequestError"),
    (401, "AuthenticationError"),
    (403, "PermissionDeniedError"),
    (404, "NotFoundError"),
    (409, "ConflictError"),
    (422, "UnprocessableEntityError"),
    (429, "RateLimitError"),
    (500, "InternalServerError"),
    (503, "InternalServerError"),
    (418, "UpstreamStatusError"),
]


@pytest.mark.parametrize(("status", "name"), STATUS_NAMES)
def test_status_class_is_openais(status: int, name: str) -> None:
    """Each status maps to the class openai raises for it, which is also ours."""
    cls = status_error_class(status)
    assert cls.__name__ == name
    error = cls("x", status_code=status)
    assert isinstance(error, unbroken.APIStatusError)
    assert isinstance(error, unbroken.APIError)
    assert isinstance(error, unbroken.UpstreamStatusError)
    assert isinstance(error, unbroken.UnbrokenError)


def test_timeouts_and_connection_errors_have_openai_names() -> None:
    """A timer that fired is an APITimeoutError, and so an APIConnectionError."""
    timeout = UpstreamTimeout("t", phase="idle", timeout_s=1.0)
    assert isinstance(timeout, unbroken.APITimeoutError)
    assert isinstance(timeout, unbroken.APIConnectionError)
    reset = unbroken.UpstreamConnectError("reset")
    assert isinstance(reset, unbroken.APIConnectionError)
    assert not isinstance(reset, unbroken.APITimeoutError)


def test_giving_up_on_429s_is_still_a_rate_limit_error() -> None:
    """RetriesExhausted after 429s is caught by `except RateLimitError` and keeps the body."""
    last = status_error_class(429)(
        "slow down",
        status_code=429,
        body={"error": {"message": "slow down", "param": "model"}},
        request_id="req-1",
        error_code="rate_limit_exceeded",
    )
    error = retries_exhausted("gave up", attempts=4, last=last)
    assert isinstance(error, RetriesExhausted)
    assert isinstance(error, unbroken.RateLimitError)
    assert not isinstance(error, unbroken.NotFoundError)
    assert (error.attempts, error.status_code, error.request_id) == (4, 429, "req-1")
    assert error.param == "model"
    assert error.code == "rate_limit_exceeded"
    assert str(error) == "gave up"
    assert type(retries_exhausted("again", attempts=2, last=last)) is type(error)


def test_giving_up_on_timeouts_keeps_the_phase() -> None:
    """A combined error for a timeout carries the phase (its __init__ differs)."""
    last = UpstreamTimeout("t", phase="first_token", timeout_s=3.0)
    error = retries_exhausted("gave up", attempts=3, last=last)
    assert isinstance(error, UpstreamTimeout)
    assert unbroken.APITimeoutError in type(error).__mro__
    assert error.phase == "first_token"


def test_giving_up_on_a_non_api_error_is_plain() -> None:
    """Only API errors are combined; anything else gives a plain RetriesExhausted."""
    error = retries_exhausted("gave up", attempts=2, last=unbroken.ProtocolError("bad"))
    assert type(error) is RetriesExhausted
    base = UpstreamStatusError("x", status_code=None)
    assert base.param is None
    assert base.type is None
