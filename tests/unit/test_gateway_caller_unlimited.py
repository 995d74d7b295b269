"""gateway/keys.py `Caller.unlimited`: a caller with no limit set is admitted without the
limiter (gateway/app.py `_Booking.admit`); any limit set sends it through the limiter."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from unbroken.gateway.app import Gateway, _Booking
from unbroken.gateway.keys import ANONYMOUS, Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import ChatRequest
from unbroken.settings import GatewaySettings, LimitSettings, RouteSettings, Settings

LIMITS = [f.name for f in dataclasses.fields(LimitSettings)]


def test_a_caller_without_limits_is_unlimited() -> None:
    assert Caller("k:a", "a", LimitSettings()).unlimited
    assert ANONYMOUS.unlimited


@pytest.mark.parametrize("name", LIMITS)
def test_any_limit_set_makes_a_caller_limited(name: str) -> None:
    limits = LimitSettings(**{name: 1})
    assert not Caller("k:a", "a", limits).unlimited
    # Not part of its identity: equal callers compare equal whatever was worked out.
    assert Caller("k:a", "a", limits) == Caller("k:a", "a", limits)


def _request() -> ChatRequest:
    return ChatRequest("deepseek-chat", [{"role": "user", "content": "hi"}], True, [], {})


def test_an_unlimited_callers_admission_is_the_limiters() -> None:
    async def main() -> None:
        gateway = Gateway(
            Settings(gateway=GatewaySettings(routes=(RouteSettings("a", "http://127.0.0.1:9/v1"),)))
        )
        caller = Caller("k:a", "a", LimitSettings())
        booking = await _Booking.admit(gateway, caller, _request(), None)
        expected = await gateway.limiter.admit(caller, 0, 0.0)
        # The same admission as the limiter's: no lease, nothing reserved, checked.
        assert booking.admission.caller is caller
        assert dataclasses.replace(booking.admission, day=expected.day) == expected
        await booking.book(None)
        assert booking.booked

    asyncio.run(main())


def test_a_limited_caller_is_refused_by_the_limiter() -> None:
    async def main() -> None:
        gateway = Gateway(
            Settings(gateway=GatewaySettings(routes=(RouteSettings("a", "http://127.0.0.1:9/v1"),)))
        )
        caller = Caller("k:b", "b", LimitSettings(concurrent_streams=1))
        first = await _Booking.admit(gateway, caller, _request(), None)
        assert first.admission.lease is not None  # a slot taken from the store
        with pytest.raises(GatewayError, match="concurrency limit"):
            await _Booking.admit(gateway, caller, _request(), None)
        await first.book(None)

    asyncio.run(main())
