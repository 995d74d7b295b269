"""stores/streamlog.py `MemoryStreamLog`: an ended log's last block is sealed (compressed)
at the hub's tick (`seal_ended`), not at its end; it reads the same before and after."""

from __future__ import annotations

import asyncio

from tests.support import text_payload
from unbroken.stores.packed import BLOCK_EVENTS
from unbroken.stores.streamlog import MAX_UNSEALED, MemoryStreamLog

_payload = text_payload


FINAL = b'{"choices":[],"unbroken":{"content_sha256":"' + b"0" * 64 + b'"}}'


async def _answer(log: MemoryStreamLog, stream_id: str, n_tokens: int) -> list[bytes]:
    """An answer logged as the producer logs it: chunk by chunk, then the last events."""
    lease = await log.create(
        stream_id, caller="c", request=b"{}", resumable=False, owner="me", now=1.0, lease_s=3.0
    )
    payloads = [_payload("", role=True), *(_payload(f" tok{i}\n") for i in range(n_tokens))]
    for payload in payloads:
        log.append_one(stream_id, lease.epoch, payload, 1.0)
    end = [_payload("").replace(b'"usage":null', b'"usage":{"total_tokens":3}'), FINAL, b"[DONE]"]
    log.append_now(stream_id, lease.epoch, end[:1], 1.0, end=False)
    log.append_now(stream_id, lease.epoch, end[1:], 1.0, end=True)
    return payloads + end


async def _read_all(log: MemoryStreamLog, stream_id: str) -> list[tuple[int, bytes]]:
    batch = await log.read(stream_id, 0, limit=10_000, max_bytes=1 << 30)
    assert batch.ended
    return batch.events


def test_an_ended_log_is_sealed_at_the_tick_and_reads_the_same() -> None:
    async def main() -> None:
        log = MemoryStreamLog()
        payloads = await _answer(log, "s1", 3 * BLOCK_EVENTS + 4)
        events = log._streams["s1"].events
        # Ended, its last block still open: nothing was compressed at the answer's end.
        assert len(events._ends) * BLOCK_EVENTS < len(events)
        assert events.source is None
        before = await _read_all(log, "s1")
        assert [p for _, p in before] == payloads
        text = "".join(log.text_now("s1", 0, len(payloads), 0, False) or [])
        size = len(events._packed)
        assert log.seal_ended() == 1
        assert len(events._ends) * BLOCK_EVENTS >= len(events)  # every block sealed
        assert len(events._packed) < size  # compressed
        assert await _read_all(log, "s1") == before  # the replay is byte for byte the same
        assert "".join(log.text_now("s1", 0, len(payloads), 0, False) or []) == text
        assert text == "".join(f" tok{i}\n" for i in range(3 * BLOCK_EVENTS + 4))
        assert log.seal_ended() == 0  # once

    asyncio.run(main())


def test_a_forgotten_log_is_not_sealed_and_the_list_is_bounded() -> None:
    async def main() -> None:
        log = MemoryStreamLog()
        await _answer(log, "gone", BLOCK_EVENTS + 3)
        log._forget(log._streams["gone"])
        assert log.seal_ended() == 1
        assert len(log._streams["gone"].events) == 0
        # Without a ticker, the logs waiting for their seal stay bounded.
        for i in range(MAX_UNSEALED + 1):
            await _answer(log, f"s{i}", 1)
        assert len(log._unsealed) <= MAX_UNSEALED

    asyncio.run(main())
