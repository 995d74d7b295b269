"""An answer's record at its end: the memory log's appends of the role chunk, the usage
chunk and the last events, its reads of the open block (the text, the last events), its
fencing after an end, a lease change or a forget; the usage book and the Prometheus hook's
sums (stores/packed.py, stores/streamlog.py, stores/memory.py, gateway/usage.py,
instrumentation.py)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tests.support import DecodedSource, answer_record, text_payload
from unbroken.core.accumulator import join_text
from unbroken.core.pricing import PriceTable
from unbroken.core.streamlog import Retention
from unbroken.core.wire import PromptTokensDetails, Usage, chunk_text
from unbroken.gateway import usage as usage_module
from unbroken.gateway.usage import UsageBook, day_of
from unbroken.instrumentation import PrometheusHook
from unbroken.stores.memory import MemoryStore
from unbroken.stores.packed import BLOCK_EVENTS, PackedEvents
from unbroken.stores.streamlog import (
    FencedError,
    LogFullError,
    MemoryStreamLog,
    UnknownStreamError,
)

USAGE = text_payload("").replace(b'"usage":null', b'"usage":{"total_tokens":3}')
FINAL = b'{"choices":[],"unbroken":{"stream_id":"strm_1"}}'
DONE = b"[DONE]"


class _Decoded(DecodedSource):
    """The template source of a relayed answer (the upstream's chunks only)."""

    def feed(self, payload: bytes) -> None:
        if payload not in (FINAL, DONE):
            super().feed(payload)


def _answer(texts: list[str]) -> list[bytes]:
    return [text_payload("", role=True), *map(text_payload, texts), USAGE, FINAL, DONE]


def test_the_first_text_chunk_takes_the_sources_template() -> None:
    """With a source, the answer's first text chunk is kept as its middle under the
    decoder's own template objects (the role chunk alone is whole); every range and the
    text read back as decoded, open and sealed."""
    model = _answer(["one", " two", ' "three"\n', "\\"])
    source = _Decoded()
    packed = PackedEvents()
    packed.source = source
    for payload in model:
        source.feed(payload)
        packed.add(payload)
    shared = source.text_template()
    assert shared is not None
    assert packed._head is shared[0]
    assert packed._tail is shared[1]
    assert packed._whole == 0b1110000_1  # the role chunk; the usage chunk and the last two
    n = len(model)
    for sealed in (False, True):
        for first in range(1, n + 1):
            for last in range(first, n + 1):
                assert packed.get(first, last) == model[first - 1 : last]
                for index, reasoning in ((0, False), (0, True), (1, False)):
                    got = join_text(packed.text(first, last, index, reasoning))
                    want = join_text(chunk_text(model[first - 1 : last], index, reasoning))
                    assert got == want, (sealed, first, last)
        packed.seal()


def test_a_source_without_a_template_or_another_one_is_not_taken() -> None:
    """A source with no template yet, or one the chunk does not fit (another answer's),
    leaves the log to learn its own from two chunks."""
    model = _answer([f"w{i}" for i in range(BLOCK_EVENTS + 4)])
    other = _Decoded()
    other.feed(text_payload("x").replace(b"chatcmpl-0", b"chatcmpl-9"))
    for source in (_Decoded(), other):
        packed = PackedEvents()
        packed.source = source
        packed.extend(model)
        assert (packed._head, packed._tail) != other.text_template()
        assert packed.get(1, len(model)) == model
        packed.seal()
        assert packed.get(1, len(model)) == model


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(
                st.sampled_from(_answer(["a", "b\\", '"'])),
                st.builds(text_payload, st.text(max_size=4)),
                st.binary(max_size=40),
            ),
        ),
        max_size=3 * BLOCK_EVENTS,
    ),
    st.booleans(),
)
def test_events_added_either_way_read_back(adds: list[tuple[bool, bytes]], sealed: bool) -> None:
    """`add_other` (what `append_one` calls for an event it found off the template) keeps
    any event, on the template or not, mixed with `add`'s."""
    packed = PackedEvents()
    for other, payload in adds:
        if other:
            packed.add_other(payload)
        else:
            packed.add(payload)
    if sealed:
        packed.seal()
    model = [payload for _, payload in adds]
    for first in range(1, len(model) + 1):
        assert packed.get(first, len(model)) == model[first - 1 :]
        assert join_text(packed.text(first, len(model), 0, False)) == join_text(
            chunk_text(model[first - 1 :], 0, False)
        )


async def _create(log: MemoryStreamLog, stream_id: str) -> int:
    lease = await log.create(
        stream_id, caller="c", request=b"{}", resumable=True, owner="me", now=1.0, lease_s=3.0
    )
    return lease.epoch


def test_an_answers_events_go_in_and_come_back() -> None:
    """Appended as a producer appends them (the chunks one by one, the usage chunk in an
    `append_now` of one, the last two at the end): numbered in order, read back the same,
    the text as decoded, the bytes counted; one event through `append_now` is
    `append_one`'s."""

    async def main() -> None:
        logs = MemoryStreamLog(), MemoryStreamLog()
        model = _answer(["a", "b", "c"])
        for log in logs:
            epoch = await _create(log, "s")
            source = _Decoded()
            log.share_template("s", source)
            for i, payload in enumerate(model[:-2], 1):
                source.feed(payload)
                if log is logs[0]:
                    assert log.append_one("s", epoch, payload, 2.0) == i
                else:
                    assert log.append_now("s", epoch, [payload], 2.0, end=False) == i
            assert log.text_now("s", 0, len(model) - 2, 0, False) == ["abc"]
            log.share_template("s", None)
            assert await log.append("s", epoch, model[-2:], 3.0, end=True) == len(model)
            assert log.events_now("s", 4, len(model)) == list(enumerate(model[4:], 5))
            info = await log.info("s")
            assert info is not None
            assert info.ended
            assert info.n_bytes == sum(map(len, model)) == log.total_bytes
            assert (await log.read("s", 0, limit=99, max_bytes=1 << 20)).events == list(
                enumerate(model, 1)
            )
        assert logs[0]._streams["s"].events.get(1, len(model)) == model

    asyncio.run(main())


def test_appends_are_fenced_after_an_end_a_takeover_or_a_forget() -> None:
    """The fast path's one check holds what the three did: an ended log takes nothing
    (also after its lease was released), a taken-over log takes only the new epoch, a
    forgotten log takes nothing."""

    async def main() -> None:
        log = MemoryStreamLog()
        epoch = await _create(log, "ended")
        log.append_one("ended", epoch, b"x", 1.0)
        log.append_now("ended", epoch, [FINAL, DONE], 1.0, end=True)
        await log.release("ended", "me", epoch)
        assert await log.acquire("ended", "other", 9.0, 3.0) is None
        with pytest.raises(FencedError):
            log.append_one("ended", epoch, b"y", 2.0)
        with pytest.raises(FencedError):
            log.append_now("ended", epoch, [b"y"], 2.0, end=False)
        with pytest.raises(FencedError):
            log.append_now("ended", epoch, [b"y", b"z"], 2.0, end=True)

        epoch = await _create(log, "taken")
        log.append_one("taken", epoch, b"x", 1.0)
        lease = await log.acquire("taken", "other", 9.0, 3.0)  # the first lease expired
        assert lease is not None
        assert lease.epoch == epoch + 1
        with pytest.raises(FencedError):
            log.append_one("taken", epoch, b"y", 9.5)
        assert log.append_one("taken", lease.epoch, b"y", 9.5) == 2
        await log.release("taken", "other", lease.epoch)  # released, still the writer's
        assert log.append_one("taken", lease.epoch, b"z", 9.6) == 3

        epoch = await _create(log, "gone")
        log.append_one("gone", epoch, b"x", 1.0)
        log._forget(log._streams["gone"])
        with pytest.raises(FencedError):
            log.append_one("gone", epoch, b"y", 2.0)

    asyncio.run(main())


def test_a_held_handle_is_fenced_as_the_id_is() -> None:
    """A writer's handle (`append_to`), taken while it held the lease, is fenced as
    `append_one` by id is: after the log's end, another writer's takeover (whose appends
    through its own handle go on), a forget, and the tombstone's removal; the bounds hold
    for it too, and what it appends is what the id's reads give back."""

    async def main() -> None:
        log = MemoryStreamLog(Retention(max_stream_bytes=1024, max_total_bytes=4096))
        with pytest.raises(UnknownStreamError):
            log.handle("none")
        epoch = await _create(log, "s")
        handle = log.handle("s")
        assert log.append_to(handle, epoch, b"abc", 1.0) == 1
        assert log.append_one("s", epoch, b"de", 1.0) == 2
        assert log.append_to(handle, epoch, b"f", 1.5) == 3
        assert log.events_now("s", 0, 3) == [(1, b"abc"), (2, b"de"), (3, b"f")]
        info = await log.info("s")
        assert info is not None
        assert (info.n_events, info.n_bytes, info.updated_at) == (3, 6, 1.5)
        assert log.total_bytes == 6
        with pytest.raises(LogFullError):  # 6 + 1019 > 1024: nothing appended
            log.append_to(handle, epoch, b"x" * 1019, 2.0)
        assert log.total_bytes == 6
        waiter = asyncio.create_task(log.wait("s", 3, 10.0))
        await asyncio.sleep(0)  # (parked on the stream's flag)
        assert log.append_to(handle, epoch, b"g", 2.0) == 4
        await asyncio.wait_for(waiter, 1.0)  # woken by the handle's append

        lease = await log.acquire("s", "other", 9.0, 3.0)  # the first lease expired
        assert lease is not None
        with pytest.raises(FencedError):
            log.append_to(handle, epoch, b"y", 9.5)
        theirs = log.handle("s")
        assert theirs is handle  # one record per log: the epoch is what fences
        assert log.append_to(theirs, lease.epoch, b"y", 9.5) == 5

        log.append_now("s", lease.epoch, [DONE], 9.6, end=True)
        with pytest.raises(FencedError):
            log.append_to(theirs, lease.epoch, b"z", 9.7)

        epoch = await _create(log, "gone")
        handle = log.handle("gone")
        log._forget(handle)
        with pytest.raises(FencedError):
            log.append_to(handle, epoch, b"x", 2.0)
        await log.sweep(1e12)  # the tombstone too: the id is unknown now
        with pytest.raises(UnknownStreamError):
            log.append_to(handle, epoch, b"x", 2.0)

    asyncio.run(main())


def test_a_wait_is_woken_by_the_next_append_after_one_timed_out() -> None:
    """A reader whose wait timed out leaves the stream's flag behind; the next append sets
    it harmlessly, and a later wait is woken by the append after it."""

    async def main() -> None:
        log = MemoryStreamLog()
        epoch = await _create(log, "s")
        await log.wait("s", 0, 0.01)  # times out: nothing appended
        assert log.append_one("s", epoch, b"a", 1.0) == 1
        waiter = asyncio.create_task(log.wait("s", 1, 10.0))
        await asyncio.sleep(0)  # (the waiter parks on the flag)
        assert not waiter.done()
        log.append_one("s", epoch, b"b", 1.0)
        await asyncio.wait_for(waiter, 1.0)

    asyncio.run(main())


def test_usage_adds_up_per_key_model_and_day() -> None:
    """Each answer adds a request, its tokens (DeepSeek's cache hits, or OpenAI's cached
    tokens) and its cost to the fields of its key and model, exactly; the field names made
    for a key and model are bounded."""

    async def main() -> None:
        store = MemoryStore()
        book = UsageBook(store, PriceTable())
        now = 1_790_000_000.0
        deepseek = Usage(
            prompt_tokens=10, completion_tokens=4, total_tokens=14, prompt_cache_hit_tokens=6
        )
        openai = Usage(
            prompt_tokens=8,
            completion_tokens=2,
            total_tokens=10,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=3),
        )
        bare = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        await book.record("alice", "m", deepseek, 0.1, now)
        await book.record("alice", "m", openai, 0.2, now)
        await book.record("alice", "m", None, 0.0, now)
        await book.record("bob", "m", bare, 0.3, now)
        table = await store.get_usage(day_of(now))
        sep = "\x1f"
        assert table == {
            f"alice{sep}m{sep}requests": 3.0,
            f"alice{sep}m{sep}prompt_tokens": 18.0,
            f"alice{sep}m{sep}cached_tokens": 9.0,
            f"alice{sep}m{sep}completion_tokens": 6.0,
            f"alice{sep}m{sep}cost_usd": 0.1 + 0.2 + 0.0,
            f"bob{sep}m{sep}requests": 1.0,
            f"bob{sep}m{sep}prompt_tokens": 1.0,
            f"bob{sep}m{sep}cached_tokens": 0.0,
            f"bob{sep}m{sep}completion_tokens": 1.0,
            f"bob{sep}m{sep}cost_usd": 0.3,
        }

    asyncio.run(main())


def test_the_usage_field_names_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_module, "_MAX_FIELDS", 2)

    async def main() -> None:
        store = MemoryStore()
        book = UsageBook(store, PriceTable())
        for key in ("a", "b", "c", "a"):
            await book.record(key, "m", None, 1.0, 0.0)
            assert len(book._fields) <= 2
        table = await store.get_usage(day_of(0.0))
        assert table["a\x1fm\x1frequests"] == 2.0
        assert table["c\x1fm\x1fcost_usd"] == 1.0

    asyncio.run(main())


def test_a_routes_first_token_times_and_the_active_answers_add_up() -> None:
    """The time to first token is one series per route, whatever the model and outcome
    of the answers that observed it; the active answers are those started less those
    ended, at every collection."""
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    for _ in range(5):
        hook.on_stream_start()
    hook.on_answer(answer_record("complete", 0.2, "m1"))
    hook.on_answer(answer_record("complete", 0.7, "m2"))
    hook.on_answer(answer_record("error", None, "m2"))
    assert registry.get_sample_value("unbroken_active_streams") == 2
    ttft = "unbroken_time_to_first_token_seconds"
    assert registry.get_sample_value(f"{ttft}_count", {"route": "r"}) == 2
    assert registry.get_sample_value(f"{ttft}_sum", {"route": "r"}) == pytest.approx(0.9)
    hook.on_answer(answer_record("error", 0.1, "m1"))
    hook.on_stream_start()
    assert registry.get_sample_value("unbroken_active_streams") == 2
    assert registry.get_sample_value(f"{ttft}_count", {"route": "r"}) == 3
    bucket = {"route": "r", "le": "0.25"}
    assert registry.get_sample_value(f"{ttft}_bucket", bucket) == 2
