"""gateway/streams.py `_TextLink`: the SDK stream reads the producer's text through it
while the producer lives; once cut (the producer ended), a read is a clear error, not a
read of a log the producer no longer stands for."""

from __future__ import annotations

import pytest

from tests.unit.producing import new_producer, run_hub
from unbroken.gateway.streams import StreamHub, _TextLink


def test_the_link_reads_the_producers_text_until_cut() -> None:
    async def body(hub: StreamHub) -> None:
        producer = await new_producer(hub, "strm_" + "7" * 32)
        link = _TextLink(producer)
        assert link.text_mark() == producer.text_mark() == 0
        assert link.text_since(0, None, 0, False) == producer.text_since(0, None, 0, False)
        link.producer = None
        with pytest.raises(RuntimeError, match="producer has ended"):
            link.text_mark()
        with pytest.raises(RuntimeError, match="producer has ended"):
            link.text_since(0, None, 0, False)

    run_hub(body)
