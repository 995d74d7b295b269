"""gateway/streams.py `StreamHub.start` with `start_now` on the memory log: the producer's
first step (to its upstream write) runs before the log is created, and the create follows
in the same step. An answer that fails in that first step still ends its log with the
error; a log that cannot be made fails the start and gives the producer up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.producing import log_events, run_hub
from unbroken.client import AsyncStream
from unbroken.core.streamlog import Lease
from unbroken.errors import StoreError, UpstreamError
from unbroken.gateway.keys import Caller
from unbroken.gateway.request import ChatRequest
from unbroken.gateway.streams import StreamHub
from unbroken.settings import LimitSettings
from unbroken.stores.streamlog import MemoryStreamLog

CALLER = Caller("k:test", "test", LimitSettings(), None)


def _request() -> ChatRequest:
    return ChatRequest(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        fallbacks=[],
        extra={},
    )


def test_the_log_is_made_in_the_start_with_the_request_kept() -> None:
    async def body(hub: StreamHub) -> None:
        producer = await hub.start(
            CALLER,
            _request(),
            {"X-Request-ID": "r1"},
            resumable=False,
            renew_slot=None,
            start_now=True,
        )
        try:
            # Made before `start` returned, before any upstream byte could be read.
            info = await hub.log.info(producer.stream_id)
            assert info is not None
            assert info.caller == "k:test"
            assert producer._created is None  # nothing left to wait for
            # The SDK stream's decoder template, shared with the log made after the first
            # step that offered it (the log keeps no copy of its own).
            assert isinstance(hub.log, MemoryStreamLog)
            source = hub.log._streams[producer.stream_id].events.source
            assert isinstance(source, AsyncStream)
            assert producer.task is not None
            assert not producer.task.done()
        finally:
            producer.stop("stopped")
            assert producer.task is not None
            await asyncio.gather(producer.task, return_exceptions=True)

    run_hub(body)


def test_an_answer_that_fails_in_its_first_step_ends_its_log_with_the_error() -> None:
    def refuse(stream: AsyncStream) -> Any:
        raise UpstreamError("no route can take it", status_code=503)

    async def body(hub: StreamHub) -> None:
        producer = await hub.start(
            CALLER,
            _request(),
            {},
            resumable=False,
            renew_slot=None,
            wrap=refuse,
            start_now=True,
        )
        assert producer.task is not None
        await producer.task
        assert producer.failure is not None
        events = await log_events(hub, producer.stream_id)
        assert len(events) == 1
        assert b"no route can take it" in events[0]
        info = await hub.log.info(producer.stream_id)
        assert info is not None
        assert info.ended

    run_hub(body)


class _Refusing(MemoryStreamLog):
    """A memory log whose creates fail (a store error)."""

    async def create(self, stream_id: str, **kwargs: Any) -> Lease:
        raise StoreError("no room for a new stream")


def test_a_log_not_made_fails_the_start_and_stops_the_producer() -> None:
    async def body(hub: StreamHub) -> None:
        hub.log = _Refusing()
        with pytest.raises(StoreError, match="no room"):
            await hub.start(
                CALLER, _request(), {}, resumable=False, renew_slot=None, start_now=True
            )
        # The producer was given up: its task ends without a log, and the hub forgets it.
        (producer,) = hub.producers
        assert producer.reason == "fenced"
        assert producer.task is not None
        await producer.task
        assert producer.finished
        assert hub.producers == []

    run_hub(body)
