"""How the async driver closes an attempt's response: at once when its body can close
without waiting (the gateway's upstream responses), else through `aclose()` under a
cancel shield (`client._engine._close_now`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from unbroken.client._engine import _close_now


class _Body(httpx.AsyncByteStream):
    def __init__(self) -> None:
        self.closes = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b""

    async def aclose(self) -> None:
        self.closes += 1


class _AtOnce(_Body):
    def close_now(self) -> None:
        self.closes += 1


def test_a_body_that_closes_at_once_is_closed_once() -> None:
    body = _AtOnce()
    response = httpx.Response(200, stream=body)
    assert _close_now(response)
    assert response.is_closed
    assert body.closes == 1
    assert _close_now(response)  # closed already: as aclose(), nothing more
    assert body.closes == 1


def test_any_other_body_is_left_to_aclose() -> None:
    body = _Body()
    response = httpx.Response(200, stream=body)
    assert not _close_now(response)
    assert not response.is_closed
    assert body.closes == 0
