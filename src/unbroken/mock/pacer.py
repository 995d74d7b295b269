"""One timer per event loop for the mock's plain timed streams. Imports the standard library
and mock siblings.

Why: a stream that wakes its own task for every event (a future, a `call_later`, a task step
through several awaits, then an ASGI message through uvicorn's `send`) cost the mock more CPU
per chunk than the gateway it serves costs per relayed chunk, on the same cores. A stream with
no fault planned and no write shaping has nothing to decide between two events, so the
`Pacer` sends its events from timer callbacks straight to the connection's transport, framed
as uvicorn frames them, while the stream's handler waits on one future for the whole answer.

Theory of operation: each stream waits in the slot of the millisecond grid (of the loop's
clock) at or after its next event's due time, never before it; one `call_at` serves the
earliest slot, and its callback takes every stream of every slot that is due, so all streams
due within the same millisecond share one timer. A stream's step writes what is due as the
awaited path does (the same due times, the same coalescing into writes of up to
`send_bytes`), so the bytes and the schedule are the same: an event never goes before its
due time, and at most a slot (1 ms) later than a timer of its own would have sent it. The
pacer gives the stream back to its handler (sets its future) when the answer is written,
when the connection is closing, or when the transport still buffers more than its
high-water mark: a slow reader then continues on the awaited path, which waits for the
transport to drain, and comes back to the pacer once the writes flow again. A client that
leaves wakes the handler through the exchange's disconnect watch; the pacer drops the
stream at its next slot.
"""

from __future__ import annotations

import asyncio
import heapq
import math

from unbroken.mock.exchange import Exchange, Transport
from unbroken.mock.stats import MockStats

__all__ = ["PacedStream", "Pacer"]

# Slots per second of the pacer's grid: streams due within the same millisecond share a wake.
SLOTS_PER_S = 1000.0
# How far past a slot's time an event counts as due: float rounding only. The slot is never
# before the event's due time, so (unlike the awaited path's wake-ups, which allow 1 ms for
# timers that fire early) no event goes early.
DUE_SLACK_S = 1e-6
# An HTTP/1.1 chunk of a body: exactly what uvicorn's `send` writes for one body message.
CHUNK = b"%x\r\n%b\r\n"
# The high-water mark assumed when a transport does not tell its own (asyncio's default).
DEFAULT_HIGH_WATER = 64 * 1024


class PacedStream:
    """A stream's state while the pacer sends it (the handler reads `sent` back).

    Args:
        ex: the exchange (its response started, no write shaping).
        transport: the connection's transport (`Exchange.chunked_transport`).
        events: the encoded events of the whole answer.
        sent: events already written.
        t_first: loop time of the first event; token_s: seconds between two tokens (> 0).
        n_tokens: events due one per token (the rest come with the last token).
        limit: the most bytes coalesced into one write.
        stats: the server's counters (`chunks_sent` is counted per write).
    """

    __slots__ = (
        "events",
        "ex",
        "high",
        "limit",
        "n_bytes",
        "n_events",
        "n_tokens",
        "sent",
        "stats",
        "t_first",
        "token_s",
        "transport",
        "waiter",
        "write",
    )

    def __init__(
        self,
        ex: Exchange,
        transport: Transport,
        events: list[bytes],
        sent: int,
        t_first: float,
        token_s: float,
        n_tokens: int,
        limit: int,
        stats: MockStats,
    ) -> None:
        self.ex = ex
        self.write = transport.write
        self.events = events
        self.sent = sent
        self.n_events = len(events)
        self.t_first = t_first
        self.token_s = token_s
        self.n_tokens = n_tokens
        self.limit = limit
        self.stats = stats
        self.waiter: asyncio.Future[None] | None = None
        # Body bytes written (added to the exchange's count when the handler resumes).
        self.n_bytes = 0
        self.transport = transport
        high = DEFAULT_HIGH_WATER
        limits = getattr(transport, "get_write_buffer_limits", None)
        if callable(limits):
            high = int(limits()[1])
        self.high = high

    def step(self, now: float) -> int:
        """Write every event due at `now`; the slot of the next one, or 0 when the stream
        leaves the pacer (written, closing, or its transport over the high-water mark)."""
        transport = self.transport
        if transport.is_closing():
            return 0
        sent = self.sent
        t_first = self.t_first
        if now >= t_first:
            token_s = self.token_s
            n_tokens = self.n_tokens
            # The awaited path's due count (respond.send_stream), without its early margin.
            k = int((now - t_first + DUE_SLACK_S) / token_s) + 1
            due = self.n_events if k >= n_tokens else 1 + k
            events = self.events
            limit = self.limit
            while sent < due:
                if transport.get_write_buffer_size() > self.high:
                    self.sent = sent
                    return 0  # a slow reader: the awaited path waits for the drain
                if due == sent + 1 or len(events[sent]) >= limit:
                    end = sent + 1
                    data = events[sent]
                else:
                    size = 0
                    end = sent
                    while end < due and size < limit:
                        size += len(events[end])
                        end += 1
                    data = b"".join(events[sent:end])
                # One HTTP/1.1 chunk: what uvicorn's `send` writes for this body.
                self.write(CHUNK % (len(data), data))
                self.n_bytes += len(data)
                self.stats.chunks_sent += end - sent
                sent = end
            self.sent = sent
            if sent >= self.n_events:
                return 0
            # The next event is due at t_first + (sent - 1) x token_s: its slot.
            return math.ceil(
                (t_first + ((sent if sent < n_tokens else n_tokens) - 1) * token_s) * SLOTS_PER_S
            )
        return math.ceil(t_first * SLOTS_PER_S)


class Pacer:
    """Sends the plain timed streams of one event loop from one timer (see the module)."""

    def __init__(self) -> None:
        self._slots: dict[int, list[PacedStream]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.held = 0

    @property
    def is_idle(self) -> bool:
        """True when no stream waits on the pacer and no timer is armed."""
        return self.held == 0 and self._timer is None and not self._heap

    def serves(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether streams of `loop` may use the pacer: the loop it serves, or another one
        once that loop is closed or the pacer idle (an app served again after its server
        stopped; what a closed loop left on the pacer is dropped)."""
        served = self._loop
        if loop is not served:
            if served is not None and not served.is_closed() and not self.is_idle:
                return False
            self._slots.clear()
            self._heap.clear()
            self._timer = None
            self.held = 0
            self._loop = loop
        return True

    async def send(self, stream: PacedStream) -> None:
        """Send `stream` until it is written, its connection closes, its transport backs
        up, or its client leaves; `stream.sent` tells how far it got.

        Raises:
            Closed: the client left (or the server is shutting down).
        """
        ex = stream.ex
        slot = stream.step(ex.loop.time())
        if not slot:
            ex.n_bytes += stream.n_bytes
            return
        waiter = ex.park()
        stream.waiter = waiter
        try:
            self._add(stream, slot)
            await waiter
        finally:
            stream.waiter = None
            ex.n_bytes += stream.n_bytes
            if not waiter.done():  # cancelled: the pacer drops it at its slot
                waiter.cancel()
        ex.unpark()

    def _add(self, stream: PacedStream, slot: int) -> None:
        self.held += 1
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.append(stream)
            return
        self._slots[slot] = [stream]
        heapq.heappush(self._heap, slot)
        timer = self._timer
        if timer is None or slot < self._armed:
            if timer is not None:
                timer.cancel()
            self._arm(stream.ex.loop, slot)

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        self._armed = slot
        self._timer = loop.call_at(slot / SLOTS_PER_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        # Slots up to now; the float error of slot / SLOTS_PER_S is far below the margin.
        last = int(now * SLOTS_PER_S + 1e-6)
        heap = self._heap
        slots = self._slots
        pop = heapq.heappop
        push = heapq.heappush
        while heap and heap[0] <= last:
            for stream in slots.pop(pop(heap)):
                self.held -= 1
                waiter = stream.waiter
                if waiter is None or waiter.done():
                    continue  # its handler left (client gone, cancelled)
                try:
                    slot = stream.step(now)
                except Exception as exc:  # the handler's to report, not every stream's
                    waiter.set_exception(exc)
                    continue
                if not slot:
                    waiter.set_result(None)
                    continue
                if slot <= last:  # float rounding: a slot this tick took is never taken again
                    slot = last + 1
                self.held += 1
                bucket = slots.get(slot)
                if bucket is None:
                    slots[slot] = [stream]
                    push(heap, slot)
                else:
                    bucket.append(stream)
        if heap:
            self._arm(loop, heap[0])
