"""WebSocket clients that lose their connection and resume, for the WebSocket tests and
`bench/ws.py`: each client opens `/v1/chat/ws` through a TCP fault proxy that cuts its
first connection at a chosen byte offset, reconnects (not cut) and sends `resume` with the
last event id it holds; its answer is then compared with a fault-free reference."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

__all__ = ["WsRun", "cut_first_connections", "run_ws_loss"]

# The first connection of each client carries this header; the proxy cuts only those.
FIRST = b"x-attempt: 1"


def cut_first_connections(seed: int, low: int, high: int) -> Any:
    """A FaultProxy `cut` function: a random offset in [low, high) for first connections."""
    rng = random.Random(seed)

    def cut(index: int, head: bytes) -> int | None:
        return rng.randrange(low, high) if FIRST in head.lower() else None

    return cut


@dataclass
class WsRun:
    """What the clients got."""

    answers: list[str] = field(default_factory=list)
    events: list[list[int]] = field(default_factory=list)
    reconnects: int = 0
    gaps_s: list[float] = field(default_factory=list)  # loss to next chunk


def _text(frame: dict[str, Any]) -> str:
    choices = frame["data"].get("choices") or []
    return "".join((c.get("delta") or {}).get("content") or "" for c in choices)


async def _client(proxied: str, direct: str, body: dict[str, Any], run: WsRun) -> None:
    events: list[int] = []
    parts: list[str] = []
    stream_id = ""
    lost_at: float | None = None
    url, headers = proxied, {"X-Attempt": "1"}
    frame: dict[str, Any] = {"type": "create", "id": "r", "body": body}
    while True:
        try:
            async with connect(url, additional_headers=headers, open_timeout=20) as ws:
                await ws.send(json.dumps(frame))
                while True:
                    got = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if got["type"] == "started":
                        stream_id = got["stream_id"]
                    elif got["type"] == "chunk":
                        if lost_at is not None:
                            run.gaps_s.append(time.monotonic() - lost_at)
                            lost_at = None
                        events.append(int(got["event"]))
                        parts.append(_text(got))
                    elif got["type"] == "done":
                        run.answers.append("".join(parts))
                        run.events.append(events)
                        return
                    else:
                        raise AssertionError(f"unexpected frame {got}")
        except (ConnectionClosed, OSError):
            if not stream_id:
                raise
            run.reconnects += 1
            lost_at = time.monotonic()
            url, headers = direct, {}
            after = str(events[-1]) if events else "0"
            frame = {"type": "resume", "id": "r", "stream_id": stream_id, "after": after}


async def run_ws_loss(
    proxied: str, direct: str, bodies: list[dict[str, Any]], concurrency: int
) -> WsRun:
    """Run one client per body, `concurrency` at a time; answers come back in body order."""
    run = WsRun()
    results: list[WsRun] = [WsRun() for _ in bodies]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await _client(proxied, direct, bodies[i], results[i])

    await asyncio.gather(*(one(i) for i in range(len(bodies))))
    for r in results:
        run.answers += r.answers
        run.events += r.events
        run.reconnects += r.reconnects
        run.gaps_s += r.gaps_s
    return run
