"""A gateway's stream hub with one producer at a time, for the producer's unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from unbroken.gateway.app import Gateway
from unbroken.gateway.streams import Producer, StreamHub
from unbroken.settings import GatewaySettings, RouteSettings, Settings


def _gateway() -> Gateway:
    settings = Settings(
        gateway=GatewaySettings(routes=(RouteSettings("a", "http://127.0.0.1:9/v1"),))
    )
    return Gateway(settings)


async def new_producer(hub: StreamHub, stream_id: str) -> Producer:
    """A producer for a new, not resumable stream `stream_id` in `hub`'s log."""
    log = hub.log
    lease = await log.create(
        stream_id,
        caller="k",
        request=b"{}",
        resumable=False,
        owner=hub.instance,
        now=1.0,
        lease_s=60.0,
    )
    return Producer(hub, stream_id, lease.epoch, resumable=False)


def run_hub(body: Callable[[StreamHub], Awaitable[None]]) -> None:
    """Run `body` with a fresh gateway's hub, closed after it."""

    async def main() -> None:
        gateway = _gateway()
        try:
            await body(gateway.streams)
        finally:
            await gateway.streams.aclose()

    asyncio.run(main())


async def log_events(hub: StreamHub, stream_id: str) -> list[bytes]:
    """The payloads of `stream_id`'s events in `hub`'s log."""
    batch = await hub.log.read(stream_id, 0, limit=100, max_bytes=1 << 20)
    return [payload for _, payload in batch.events]
