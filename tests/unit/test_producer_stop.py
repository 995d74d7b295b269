"""gateway/streams.py `Producer.stop`: the producer's task is cancelled natively, once,
only while it produces; `run` takes that cancellation back and ends the answer as asked,
and any other cancellation goes on (a shutdown's)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.producing import log_events, new_producer, run_hub
from unbroken.client import AsyncStream
from unbroken.gateway.streams import DONE, Producer, StreamHub


async def _stuck(hub: StreamHub, digit: str) -> tuple[Producer, asyncio.Task[None]]:
    """A producer whose upstream was asked and never answers, and its task (waiting there)."""
    asked = asyncio.Event()

    async def open_stream() -> AsyncStream:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    producer = hub._spawn(await new_producer(hub, "strm_" + digit * 32), open_stream)
    await asked.wait()
    assert producer.task is not None
    return producer, producer.task


def test_a_stop_while_the_upstream_is_asked_ends_the_log_with_a_stop_finish() -> None:
    async def body(hub: StreamHub) -> None:
        producer, task = await _stuck(hub, "1")
        producer.stop("stopped")
        await task
        assert not task.cancelled()
        assert task.cancelling() == 0  # taken back: its clean-up ran uncancelled
        assert producer.finished
        events = await log_events(hub, producer.stream_id)
        assert b'"finish_reason":"stop"' in events[0]
        assert events[-1] == DONE
        assert (await hub.log.info(producer.stream_id)).ended  # type: ignore[union-attr]

    run_hub(body)


def test_a_stop_before_the_task_runs_never_asks_the_upstream() -> None:
    async def body(hub: StreamHub) -> None:
        calls: list[int] = []

        async def open_stream() -> AsyncStream:
            calls.append(1)
            raise AssertionError("asked")

        producer = hub._spawn(await new_producer(hub, "strm_" + "2" * 32), open_stream)
        producer.stop("stopped")  # the task has not run a step yet
        assert producer.task is not None
        await producer.task
        assert calls == []
        assert (await log_events(hub, producer.stream_id))[-1] == DONE

    run_hub(body)


def test_a_stop_from_the_producers_own_task_lands_at_its_next_await() -> None:
    async def body(hub: StreamHub) -> None:
        box: dict[str, Any] = {}
        reached: list[str] = []

        async def open_stream() -> AsyncStream:
            box["producer"].stop("abandoned")  # e.g. a callback run by the task itself
            reached.append("after stop")
            await asyncio.sleep(5)
            reached.append("not cancelled")
            raise AssertionError("unreachable")

        box["producer"] = producer = await new_producer(hub, "strm_" + "3" * 32)
        hub._spawn(producer, open_stream)
        assert producer.task is not None
        await asyncio.wait_for(producer.task, 2)
        assert reached == ["after stop"]
        assert producer.reason == "abandoned"
        info = await hub.log.info(producer.stream_id)
        assert info is not None
        assert not info.ended  # abandoned: the log stays open for a takeover
        assert info.lease is not None
        assert info.lease.expires_at == 0  # and its lease free

    run_hub(body)


def test_another_cancellation_is_not_taken_for_a_stop() -> None:
    async def body(hub: StreamHub) -> None:
        producer, task = await _stuck(hub, "4")
        task.cancel()  # not `stop`: a shutdown cancelling every task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert producer.reason is None
        assert producer.finished
        assert await log_events(hub, producer.stream_id) == []

    run_hub(body)


def test_a_stop_and_another_cancellation_together_go_on_as_the_other() -> None:
    async def body(hub: StreamHub) -> None:
        producer, task = await _stuck(hub, "5")
        producer.stop("stopped")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert producer.finished

    run_hub(body)
