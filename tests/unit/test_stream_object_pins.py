"""What a live answer's hub objects hold (gateway/streams.py `Producer`, gateway/relay.py
`StreamRelay`, gateway/app.py's forwarded headers): no flag nobody waits on, one str of the
request id; and what those flags did still works (readers waiting for the first event, writes
waiting for a keep-alive)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.producing import new_producer, run_hub
from tests.unit.test_producer_end import _chunk, _Upstream
from unbroken.core.wire import ChatCompletion
from unbroken.gateway.accesslog import RequestRecord
from unbroken.gateway.relay import StreamRelay
from unbroken.gateway.streams import StreamHub


def test_a_producer_makes_its_first_flag_only_when_asked() -> None:
    """Unasked, no flag for the first event is ever made; asked before the first append,
    it wakes at that append; asked after, it is set."""

    async def body(hub: StreamHub) -> None:
        producer = await new_producer(hub, "strm_" + "6" * 32)
        release = asyncio.Event()

        class Held(_Upstream):
            async def __anext__(self) -> Any:
                await release.wait()
                return await super().__anext__()

        upstream = Held([_chunk("hel"), _chunk("lo")], ChatCompletion(id="a"))

        async def open_stream() -> Any:
            return upstream

        hub._spawn(producer, open_stream)
        await asyncio.sleep(0)
        assert producer._first is None
        waiting = asyncio.ensure_future(producer.first.wait())
        await asyncio.sleep(0)
        assert not waiting.done()
        release.set()
        assert await asyncio.wait_for(waiting, 5)
        assert producer.task is not None
        await producer.task
        assert producer.first.is_set()

        quiet = await new_producer(hub, "strm_" + "7" * 32)
        hub._spawn(quiet, lambda: _open(_Upstream([_chunk("x")], ChatCompletion(id="b"))))
        assert quiet.task is not None
        await quiet.task
        assert quiet._first is None
        assert quiet.first.is_set()

    run_hub(body)


async def _open(upstream: _Upstream) -> Any:
    return upstream


def test_a_relay_holds_no_idle_flag_between_keepalives() -> None:
    """The keep-alive lock: a write waits for a keep-alive being written, and no flag is
    held before or after one."""

    class Ex:
        started = True

        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.gate = asyncio.Event()

        async def send(self, message: dict[str, Any]) -> None:
            if not self.sent:
                await self.gate.wait()  # the keep-alive's write blocks a while
            self.sent.append(message["body"])

    async def main() -> None:
        ex = Ex()
        relay = StreamRelay(ex, lambda text: text, keepalive_s=15.0, send_timeout_s=10.0)  # type: ignore[arg-type]  # the exchange's send only
        assert _idle(relay) is None
        keepalive = asyncio.ensure_future(relay._keepalive())
        await asyncio.sleep(0)
        assert _idle(relay) is not None
        write = asyncio.ensure_future(relay._write(b"data: x\n\n"))
        await asyncio.sleep(0)
        assert not write.done()
        ex.gate.set()
        await asyncio.wait_for(asyncio.gather(keepalive, write), 5)
        assert ex.sent == [b": keep-alive\n", b"data: x\n\n"]
        assert _idle(relay) is None

    asyncio.run(main())


def _idle(relay: StreamRelay) -> object:
    return relay._idle


def test_the_upstream_request_id_is_the_access_records_str() -> None:
    """The X-Request-ID sent upstream is the access record's own str (not a second copy
    held per live answer)."""

    async def body(hub: StreamHub) -> None:
        record = RequestRecord.begin("0123456789abcdef0123456789abcdef", "POST", "/v1/x")
        try:
            ex: Any = type("Ex", (), {"scope": {"headers": []}})()
            headers = hub.gateway._forwarded(ex, record.request_id.encode())
            assert headers["X-Request-ID"] is record.request_id
        finally:
            record.finish(200)

    run_hub(body)
