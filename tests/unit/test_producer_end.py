"""gateway/streams.py `Producer.run` at the end of an answer: the usage chunk that ends it
goes to the live readers with the final event and [DONE] (they take the three from the log
in the write that ends their response), not in a write of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tests.unit.producing import log_events, new_producer, run_hub
from unbroken.core.wire import ChatCompletion, ChatCompletionChunk, ChunkChoice, Delta, Usage
from unbroken.gateway.streams import DONE, StreamHub


class _Upstream:
    """A stand-in for the SDK's answer stream (the upstream): `chunks`, then `completion`."""

    def __init__(self, chunks: list[ChatCompletionChunk], completion: ChatCompletion) -> None:
        self._chunks = chunks
        self._completion = completion

    def __aiter__(self) -> _Upstream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def final(self) -> ChatCompletion:
        return self._completion

    def current(self) -> ChatCompletion:
        return self._completion

    async def aclose(self) -> None:
        return None


class _Sink:
    """A live reader's sink: records the ids of the events it was fed."""

    def __init__(self) -> None:
        self.last = 0
        self.fed: list[int] = []

    def ready(self) -> bool:
        return True

    def feed(self, first: int, payloads: Sequence[bytes]) -> bool:
        self.fed += range(first, first + len(payloads))
        self.last = self.fed[-1]
        return True

    def feed_one(self, seq: int, payload: bytes) -> bool:
        return self.feed(seq, [payload])


def _chunk(content: str | None = None, usage: Usage | None = None) -> ChatCompletionChunk:
    choices = [] if content is None else [ChunkChoice(delta=Delta(content=content))]
    return ChatCompletionChunk(id="a", choices=choices, usage=usage)


def test_the_usage_chunk_goes_to_live_readers_with_the_final_event() -> None:
    async def body(hub: StreamHub) -> None:
        stream_id = "strm_" + "5" * 32
        producer = await new_producer(hub, stream_id)
        usage = Usage(3, 2, 5)
        upstream = _Upstream(
            [_chunk("hel"), _chunk("lo"), _chunk(usage=usage)], ChatCompletion(id="a")
        )

        async def open_stream() -> Any:
            return upstream

        sink = _Sink()
        hub._spawn(producer, open_stream)
        woken = producer.park(sink, 0)  # a live reader, parked before the first token
        assert woken is not None
        assert producer.task is not None
        await producer.task
        assert woken.done()
        assert sink.fed == [1, 2]  # the content chunks, as they came
        events = await log_events(hub, stream_id)
        assert len(events) == 5
        assert b'"usage"' in events[2]
        assert b'"prompt_tokens":3' in events[2]
        assert b'"unbroken"' in events[3]
        assert events[4] == DONE

    run_hub(body)
