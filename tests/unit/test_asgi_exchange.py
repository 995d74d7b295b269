"""gateway.asgi.Exchange: the ASGI callables it was given are the ones it calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from unbroken.gateway.asgi import Exchange
from unbroken.gateway.problems import GatewayError


class _Server:
    """A server's request cycle: `receive` and `send`, and another sender."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def send(self, message: Any) -> None:
        self.sent.append(("send", message))

    async def wrapped_send(self, message: Any) -> None:
        self.sent.append(("wrapped", message))


def _exchange(receive: Any, send: Any) -> Exchange:
    return Exchange({"type": "http", "headers": []}, receive, send, [], 1024)


def _run(step: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await step

    return asyncio.run(main())


def test_the_servers_own_methods_are_called_through_the_server() -> None:
    server = _Server()
    ex = _exchange(server.receive, server.send)
    _run(ex.send({"type": "http.response.body"}))
    assert server.sent == [("send", {"type": "http.response.body"})]
    assert _run(ex.receive())["body"] == b"x"
    assert ex._io is server  # held as the server, not as two bound methods


def test_any_other_callables_are_kept_and_called_as_given() -> None:
    """A send that is another method of the receive's object (a wrapper), or a plain
    function, is called itself, never the object's `send`."""
    server = _Server()
    ex = _exchange(server.receive, server.wrapped_send)
    _run(ex.send({"type": "a"}))
    seen: list[Any] = []

    async def send(message: Any) -> None:
        seen.append(message)

    plain = _exchange(server.receive, send)
    _run(plain.send({"type": "b"}))
    assert server.sent == [("wrapped", {"type": "a"})]
    assert seen == [{"type": "b"}]


def _body_in(parts: list[bytes]) -> Any:
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return receive


def test_a_body_is_read_whole_from_one_message_or_several() -> None:
    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent")

    assert _run(_exchange(_body_in([b"whole"]), send).read_body(100)) == b"whole"
    assert _run(_exchange(_body_in([b"a", b"", b"bc"]), send).read_body(100)) == b"abc"
    for parts in ([b"x" * 101], [b"x" * 60, b"x" * 41]):
        with pytest.raises(GatewayError) as info:
            _run(_exchange(_body_in(parts), send).read_body(100))
        assert info.value.status == 413
