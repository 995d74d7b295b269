"""Relaying one answer downstream: SSE for streams, one JSON body otherwise, while a
sidecar task watches the client.

Theory of operation
-------------------
Two tasks per request. The *handler* (the ASGI task) pulls chunks from the SDK's
`AsyncStream` and writes each as one `data:` event; it is the only writer except for
keep-alives. The *sidecar* waits for the client's `http.disconnect` and ticks about once a
second. Its jobs:
  * client gone -> cancel the handler's scope: the SDK stream closes its upstream
    connection at once (the upstream request is cancelled within one tick at most);
  * a write blocked longer than `send_timeout_s` (the client stopped reading and the
    server's buffer is full) -> cut the connection and cancel the handler: the gateway
    never buffers more than the server's write buffer plus the transport's read-ahead;
  * nothing written for `keepalive_s` -> write `: keep-alive` (sending the 200 headers
    first when the upstream has not answered yet), but only while the handler is not
    writing: `busy` is the one-writer lock, checked and set between awaits.
The headers are sent with the first chunk, so an upstream that fails fast still gets a
real HTTP error status; after that, a failure is an OpenAI-style `data: {"error":...}`
event and the stream ends without `[DONE]`, which every SDK reports as an error.

`events()` relays a stream log instead of an SDK stream (gateway/streams.py): each event
gets its `id:` line, and the log's own last events (`[DONE]`, or an error) end it. While
the reader has caught up with a producer on this instance, the relay's `LiveSink` takes the
producer's new events from the producer's own task and writes them straight to the
connection (gateway/direct.py), so a live answer costs no wake-up of the reader's task and
no ASGI send per event; when the client stops draining (the transport pauses) or a
keep-alive is being written, the sink refuses and the reader goes back to reading the log
and `send`, which waits for the client (and the sidecar cuts it past `send_timeout_s`).
Under the gateway's own server, a reader whose sink the producer took does not even wait
in a task: it *detaches* (gateway/detach.py) - `events()` lets `Parked` through with the
relay's state kept (its sidecar stays on the tick wheel, `_stop` wakes the reader) and
goes on `resumed` in the new task that continues the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Protocol

import anyio
import msgspec

from unbroken._flag import Flag
from unbroken._native import mypyc_attr
from unbroken.client import AsyncStream
from unbroken.client._engine import OneTaker
from unbroken.core.wire import Answer, ChatCompletion
from unbroken.errors import UnbrokenError
from unbroken.gateway.asgi import Exchange, Message, ResponseHooks
from unbroken.gateway.detach import Detached, Parked
from unbroken.gateway.direct import (  # the framing `LiveSink.feed_one` spells out
    _ID_LINES,
    _SIZE_LINES,
    DirectBody,
    _holding,
    _long_frame,
)
from unbroken.gateway.problems import GatewayError, Scrubber, from_unbroken
from unbroken.gateway.scopes import cancel_scope
from unbroken.stores.streamlog import LogHandle, MemoryStreamLog

__all__ = [
    "EventSink",
    "HeadSink",
    "LiveSink",
    "ProducerCore",
    "RelayResult",
    "StreamRelay",
    "Waiter",
]

logger = logging.getLogger(__name__)

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx and similar proxies buffer responses unless told not to.
    (b"x-accel-buffering", b"no"),
]
# One comment line, no blank line after it: a blank line after an `id:` was ever seen makes
# the official openai SDK's decoder dispatch an event with empty data (its #2722), which it
# then fails to parse as JSON. A bare comment line is ignored by every SSE reader.
_KEEPALIVE = b": keep-alive\n"
_DONE = b"data: [DONE]\n\n"
# A relay's response headers once they were sent.
_SENT: list[tuple[bytes, bytes]] = []
# The payload of a stream log's last event (gateway/streams.py `DONE`).
_DONE_PAYLOAD = b"[DONE]"


@dataclass(slots=True)
class RelayResult:
    """How a relay ended.

    Attributes:
        reason: `complete`, `error`, `client_gone`, `slow_client` or `shutdown`.
        completion: the whole answer, or what arrived of it (with billed usage), if any.
        n_chunks: chunks written downstream.
        n_keepalives: keep-alive comments written.
        n_direct: of the chunks, those the live fast path wrote (`LiveSink`).
    """

    reason: str
    completion: ChatCompletion | None
    n_chunks: int = 0
    n_keepalives: int = 0
    n_direct: int = 0


class StreamRelay:
    """Relays one answer to one client (see the theory of operation above).

    Args:
        ex: the exchange.
        scrub: removes secrets from error messages.
        keepalive_s: idle time before a keep-alive comment.
        send_timeout_s: longest a write may block.
        renew: called about every `renew_every_s` while the request runs (slot leases).
        renew_every_s: its period.
        on_complete: called with the whole answer before its last byte is written, so
            usage is booked before the client can send its next request.
        headers: more response headers of the event stream.
    """

    # One per live answer: no instance dict (~1 KB with this many attributes).
    __slots__ = (
        "_busy",
        "_chore",
        "_ex",
        "_headers",
        "_hooks",
        "_idle",
        "_keepalive_s",
        "_last_renew",
        "_last_write",
        "_loop",
        "_n_direct",
        "_n_sent",
        "_on_complete",
        "_parked",
        "_reason",
        "_renew",
        "_renew_every_s",
        "_scope",
        "_scrub",
        "_send_timeout_s",
        "_sending_since",
        "_slot",
        "_streaming",
        "_tick_s",
        "_wheel",
        "_wrote",
        "n_keepalives",
        "result",
    )

    def __init__(
        self,
        ex: Exchange,
        scrub: Scrubber,
        *,
        keepalive_s: float,
        send_timeout_s: float,
        renew: Callable[[], Awaitable[None]] | None = None,
        renew_every_s: float = 60.0,
        on_complete: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        # First, the fields a `LiveSink` reads and writes for each relayed chunk: compiled,
        # the fields lie in the order first set, and these then share the object's first
        # cache line (a busy gateway's chunk finds it cold).
        self._busy = False
        self._reason: str | None = None
        # Written by the `LiveSink`: events, and whether any since the sidecar's last tick
        # (the sidecar keeps the time, so a direct write reads no clock).
        self._n_direct = 0
        self._wrote = False
        self._ex = ex
        self._headers = list(_SSE_HEADERS) + (headers or [])
        self._scrub = scrub
        self._keepalive_s = keepalive_s
        self._send_timeout_s = send_timeout_s
        self._renew = renew
        self._renew_every_s = renew_every_s
        self._on_complete = on_complete
        # What `_stop` cancels: the relay's body (`_run` swaps in an anyio scope).
        self._scope: anyio.CancelScope | _TaskScope = _TaskScope()
        self._loop = asyncio.get_running_loop()
        # Unset while a keep-alive is written (writers wait for it); None otherwise, as set:
        # a Flag only for a keep-alive's write, not one per live answer (48 bytes).
        self._idle: Flag | None = None
        self._sending_since = 0.0
        self._last_write = self._loop.time()
        self._streaming = True
        # A detached reader (gateway/detach.py): the events it wrote before, and the waiter
        # that resumes it (woken by `_stop`).
        self._n_sent = 0
        self._parked: Detached | None = None
        self.n_keepalives = 0
        self.result: RelayResult | None = None
        # The sidecar (see `_watch`): its period, the server's hooks, the tick wheel it is
        # on and its slot there, the keep-alive or renewal it runs, and when it last renewed.
        self._tick_s = min(1.0, keepalive_s / 2, send_timeout_s / 4)
        self._hooks: ResponseHooks | None = None
        self._wheel: _TickWheel | None = None
        self._slot = 0
        self._chore: asyncio.Task[None] | None = None
        self._last_renew = self._last_write

    def sink(self) -> LiveSink | None:
        """The direct path for a producer on this instance, when the server offers one."""
        direct = self._ex.direct_body()
        return None if direct is None else LiveSink(self, direct)

    def head_sink(self) -> HeadSink | None:
        """The first events' direct path for a producer on this instance (see `HeadSink`),
        when the server offers it."""
        return None if self._ex.hooks() is None else HeadSink(self, self._ex.direct_body())

    # -- writing -----------------------------------------------------------------------------

    async def _start_sse(self) -> None:
        await self._ex.start(200, self._headers)
        self._sent()

    def _sent(self) -> None:
        """The response's head is out: its headers, and the request's, are not held for the
        answer's life (~200 and ~500 bytes)."""
        self._headers = _SENT
        self._ex.started_streaming()

    async def _write(self, data: bytes, more: bool = True) -> None:
        if self._busy:
            await self._idle_wait()
        ex = self._ex
        self._busy = True
        self._sending_since = now = self._loop.time()
        try:
            if ex.started:
                await ex.send({"type": "http.response.body", "body": data, "more_body": more})
            elif data and more:
                await ex.start_with(200, self._headers, data)  # the head in the same write
                self._sent()
            else:
                await self._start_sse()
                await ex.send({"type": "http.response.body", "body": data, "more_body": more})
        finally:
            self._busy = False
            self._sending_since = 0.0
            self._last_write = now

    # -- the sidecar -------------------------------------------------------------------------

    def _watch(self) -> asyncio.Task[None] | None:
        """Start the sidecar: when the server offers `ResponseHooks` (gateway/guard.py), a
        disconnect callback and a place on the loop's tick wheel (`_TickWheel`), else a task
        parked in `receive()` (the task, its receiver and their cancellation cost ~20 us per
        request)."""
        hooks = self._ex.hooks()
        if hooks is None:
            return self._loop.create_task(self._sidecar())
        self._hooks = hooks
        hooks.watch(self)
        self._wheel = _TickWheel.of(self._loop, self._tick_s)
        self._slot = self._wheel.add(self)
        return None

    def _off_wheel(self) -> None:
        wheel = self._wheel
        if wheel is not None:
            self._wheel = None
            wheel.remove(self, self._slot)

    def _unwatch(self, sidecar: asyncio.Task[None] | None) -> None:
        """Stop the sidecar (its chore, if one runs, is cancelled; `_stopped` waits for it)."""
        if sidecar is not None:
            sidecar.cancel()
            return
        if self._hooks is not None:
            self._hooks.unwatch()
        self._off_wheel()
        if self._chore is not None:
            self._chore.cancel()

    async def _stopped(self, sidecar: asyncio.Task[None] | None) -> None:
        """Wait for the sidecar stopped by `_unwatch` (re-raising what it failed with)."""
        task = sidecar if sidecar is not None else self._chore
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def client_gone(self) -> None:
        """The client disconnected (`ResponseHooks.watch`)."""
        self._stop("client_gone")
        self._off_wheel()

    def _on_tick(self, now: float) -> bool:
        """The sidecar's tick (from its `_TickWheel`); False ends its ticks."""
        chore = self._chore
        if chore is not None and chore.done() and not chore.cancelled() and chore.exception():
            # A failed keep-alive or renewal ends the sidecar, as it ended the task version;
            # `_stopped` re-raises it.
            self._wheel = None
            return False
        if not self._checks(now):
            self._wheel = None
            return False
        if chore is None or chore.done():
            keepalive = self._keepalive_due(now)
            renew = self._renew is not None and self._renew_due(now)
            if keepalive or renew:
                self._chore = self._loop.create_task(self._chores(keepalive, renew))
        return True

    async def _chores(self, keepalive: bool, renew: bool) -> None:
        if keepalive:
            await self._keepalive()
        if renew and self._renew is not None:
            await self._renew()

    def _checks(self, now: float) -> bool:
        """A tick's checks; False when the client was cut for not reading."""
        if self._wrote:
            # The sink wrote since the last tick, a tick ago at most: taken as a tick ago
            # (not `now`, which let the keep-alive after a silence slip a tick: 5.1 s gaps
            # with keepalive_s 3.5), so one follows within keepalive_s and a tick.
            self._wrote = False
            self._last_write = max(self._last_write, now - self._tick_s)
        if self._sending_since and now - self._sending_since > self._send_timeout_s:
            transport = self._ex.transport()
            if transport is not None:
                transport.abort()
            self._stop("slow_client")
            return False
        return True

    def _keepalive_due(self, now: float) -> bool:
        return self._streaming and not self._busy and now - self._last_write >= self._keepalive_s

    def _renew_due(self, now: float) -> bool:
        if now - self._last_renew >= self._renew_every_s:
            self._last_renew = now
            return True
        return False

    async def _sidecar(self) -> None:
        receiver: asyncio.Future[Message] = asyncio.ensure_future(self._ex.receive())
        try:
            while True:
                done, _ = await asyncio.wait({receiver}, timeout=self._tick_s)
                if done:
                    if receiver.result()["type"] == "http.disconnect":
                        self._stop("client_gone")
                        return
                    receiver = asyncio.ensure_future(self._ex.receive())
                    continue
                now = self._loop.time()
                if not self._checks(now):
                    return
                if self._keepalive_due(now):
                    await self._keepalive()
                renew = self._renew
                if renew is not None and self._renew_due(now):
                    await renew()
        finally:
            receiver.cancel()

    async def _keepalive(self) -> None:
        self._busy = True
        idle = self._idle = Flag()
        try:
            with anyio.fail_after(self._send_timeout_s):
                if not self._ex.started:
                    await self._start_sse()
                await self._ex.send(
                    {"type": "http.response.body", "body": _KEEPALIVE, "more_body": True}
                )
            self.n_keepalives += 1
            self._last_write = self._loop.time()
        except TimeoutError:
            self._stop("slow_client")
        finally:
            self._busy = False
            self._idle = None
            idle.set()

    async def _idle_wait(self) -> None:
        """Until no keep-alive is being written."""
        idle = self._idle
        if idle is not None:
            await idle.wait()

    def stop(self, reason: str) -> None:
        """End the relay now (`shutdown` also tells the client why, in an error event)."""
        self._stop(reason)

    def _stop(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
        self._scope.cancel()
        parked = self._parked
        if parked is not None and not parked.done():
            # A detached reader has no task to cancel: it resumes, and ends at once.
            parked.set_result(None)

    async def _shutdown_event(self) -> None:
        # OSError: the client is gone (uvicorn's ClientDisconnected); RuntimeError: the
        # server refuses a message (the response already ended).
        with anyio.move_on_after(1.0), contextlib.suppress(OSError, RuntimeError):
            if self._busy:
                await self._idle_wait()
            if not self._ex.started:
                await self._ex.respond_error(_SHUTDOWN)
                return
            event = b"data: " + _SHUTDOWN.body() + b"\n\n"
            await self._ex.send({"type": "http.response.body", "body": event, "more_body": False})

    # -- relays ------------------------------------------------------------------------------

    async def stream(self, stream: AsyncStream, trailer: bool = True) -> RelayResult:
        """Relay `stream` as server-sent events.

        Raises:
            GatewayError: the answer failed before anything was written (the caller sends
                it as an HTTP error).
        """
        self._streaming = True
        return await self._run(stream, trailer)

    async def events(
        self, source: AsyncGenerator[list[tuple[int, bytes]], None], *, resumed: bool = False
    ) -> RelayResult:
        """Relay a stream log's events (lists of `(sequence number, payload)`, each list
        written at once), each with its `id:`. `Parked` from `source` passes through with
        the relay's state kept (its sidecar goes on); the relay goes on with `resumed` and
        the source that continues it (gateway/detach.py).

        Raises:
            GatewayError: `source` failed before anything was written (the caller sends it
                as an HTTP error).
        """
        self._streaming = True
        self._parked = None
        sidecar = None if resumed else self._watch()
        n = self._n_sent
        result: RelayResult | None = None
        error: GatewayError | None = None
        parked = False
        try:
            with self._scope:
                try:
                    write = self._write
                    ended = False
                    async for batch in source:
                        # `[DONE]` is a log's last event: the response ends in the same
                        # write (one write less per answer).
                        ended = batch[-1][1] == _DONE_PAYLOAD
                        n += len(batch)
                        await write(
                            _frame(batch[0]) if len(batch) == 1 else _frames(batch), not ended
                        )
                        if ended:
                            break
                        # Not held while the next batch is awaited (a live answer's reader
                        # waits there for most of its life): ~490 bytes with its frame.
                        del batch
                    if not ended:
                        await write(b"", False)
                    n += self._n_direct
                    result = RelayResult("complete", None, n, self.n_keepalives)
                except GatewayError as exc:
                    n += self._n_direct
                    result = RelayResult("error", None, n, self.n_keepalives)
                    await self._idle_wait()
                    if self._ex.started:
                        await self._write(b"data: " + exc.body() + b"\n\n", False)
                    else:
                        error = exc
        except Parked as exc:
            # The reader detaches: the sidecar and the counts stay for its resumption.
            parked = True
            self._n_sent = n
            self._parked = exc.detached
            exc.detached.relay = self
            raise
        finally:
            if not parked:
                self._unwatch(sidecar)
                # Not shielded: no cancellation is pending past the scope, and a log's
                # follower (StreamHub.follow_batches) awaits nothing when closed.
                await source.aclose()
                await self._stopped(sidecar)
        if self._reason == "shutdown":
            await self._shutdown_event()
        if self._reason is not None:
            if result is None:
                n += self._n_direct
            result = RelayResult(self._reason, None, n, self.n_keepalives)
        if result is not None:
            result.n_direct = self._n_direct
        self.result = result
        if error is not None and self._reason is None:
            raise error
        assert result is not None  # noqa: S101 - set unless cancelled, handled above
        return result

    async def json(self, stream: AsyncStream) -> RelayResult:
        """Fold `stream` and send the completion as one JSON body.

        Raises:
            GatewayError: the answer failed.
        """
        self._streaming = False
        return await self._run(stream, False)

    async def _run(self, stream: AsyncStream, trailer: bool) -> RelayResult:
        # The SDK's stream runs anyio code, whose cancellation needs an anyio scope.
        scope = cancel_scope()
        if self._scope.cancel_called:
            scope.cancel()
        self._scope = scope
        sidecar = self._watch()
        n = 0
        result: RelayResult | None = None
        error: GatewayError | None = None
        try:
            with scope:
                try:
                    if self._streaming:
                        encode = msgspec.json.encode
                        write = self._write
                        async for chunk in stream:
                            await write(b"data: " + encode(chunk) + b"\n\n")
                            n += 1
                        completion = await stream.final()
                        if self._on_complete is not None:
                            await self._on_complete(completion)
                        tail = _trailer(completion) if trailer else b""
                        await write(tail + _DONE, False)
                    else:
                        completion = await stream.final()
                        if self._on_complete is not None:
                            await self._on_complete(completion)
                        # The keep-alive lock also guards this single write.
                        await self._idle_wait()
                        await self._ex.respond(200, msgspec.json.encode(completion))
                    result = RelayResult("complete", completion, n, self.n_keepalives)
                except UnbrokenError as exc:
                    error = from_unbroken(exc, self._scrub)
                    partial = exc.partial if isinstance(exc.partial, ChatCompletion) else None
                    result = RelayResult("error", partial, n, self.n_keepalives)
                    logger.info(
                        "answer failed: %s (%s)", error.code, type(exc).__name__, extra={"n": n}
                    )
                    await self._idle_wait()
                    if self._ex.started:
                        event = b"data: " + error.body() + b"\n\n"
                        await self._write(event, False)
                        error = None
        finally:
            self._unwatch(sidecar)
            with cancel_scope(shield=True):
                await _aclose(stream)
            await self._stopped(sidecar)
        if self._reason == "shutdown":
            await self._shutdown_event()
        if self._reason is not None:
            result = RelayResult(self._reason, _partial(stream), n, self.n_keepalives)
        self.result = result
        if error is not None and self._reason is None:
            raise error
        assert result is not None  # noqa: S101 - set unless cancelled, handled above
        return result


# Slots of a tick wheel (see `_TickWheel`): how many times a tick its timer fires.
WHEEL_SLOTS = 8


class _TickWheel:
    """One loop timer for the sidecars of every relay with the same tick period: it fires
    `WHEEL_SLOTS` times a period and ticks one slot's relays each time, so each relay is
    ticked once a period (its first tick about a period after it joined) and the work is
    spread over the period.

    Why: a timer per relay, re-armed every tick, held ~700 bytes per live answer (a uvloop
    TimerHandle and UVTimer, a bound method; bench/stream_memory.py), and cost a call_at a
    tick each.
    """

    __slots__ = ("_cursor", "_handle", "_key", "_loop", "_n", "_slots", "_step")

    # The wheels of the running loops, by (loop, period); a wheel leaves when it empties.
    _wheels: ClassVar[dict[tuple[asyncio.AbstractEventLoop, float], _TickWheel]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, period_s: float) -> None:
        self._loop = loop
        self._key = (loop, period_s)
        self._step = period_s / WHEEL_SLOTS
        self._slots: list[dict[StreamRelay, None]] = [{} for _ in range(WHEEL_SLOTS)]
        self._cursor = 0  # the slot the timer ticks next
        self._handle: asyncio.TimerHandle | None = None
        self._n = 0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, period_s: float) -> _TickWheel:
        """The wheel of `loop` for `period_s`."""
        wheel = cls._wheels.get((loop, period_s))
        if wheel is None:
            wheel = cls._wheels[(loop, period_s)] = cls(loop, period_s)
        return wheel

    def add(self, relay: StreamRelay) -> int:
        """Tick `relay` from about a period from now on; its slot (for `remove`)."""
        slot = (self._cursor - 1) % WHEEL_SLOTS  # the slot ticked last from now
        self._slots[slot][relay] = None
        self._n += 1
        if self._handle is None:
            self._handle = self._loop.call_later(self._step, self._turn)
        return slot

    def remove(self, relay: StreamRelay, slot: int) -> None:
        """Stop ticking `relay` (no-op when it is not on the wheel)."""
        if relay in self._slots[slot]:
            del self._slots[slot][relay]
            self._left()

    def _left(self) -> None:
        self._n -= 1
        if self._n == 0:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            if self._wheels.get(self._key) is self:
                del self._wheels[self._key]

    def _turn(self) -> None:
        self._handle = None
        slot = self._slots[self._cursor]
        self._cursor = (self._cursor + 1) % WHEEL_SLOTS
        if slot:
            now = self._loop.time()
            for relay in list(slot):
                if relay not in slot:
                    continue
                try:
                    keep = relay._on_tick(now)
                except Exception:
                    # One relay's failure must not stop the ticks (keep-alives, slow-client
                    # cuts) of every other relay on the wheel: that one is no longer ticked.
                    logger.exception("a relay's tick failed; its sidecar stops")
                    keep = False
                if not keep:
                    del slot[relay]
                    self._left()
        if self._n and self._handle is None:
            self._handle = self._loop.call_later(self._step, self._turn)


class LiveSink:
    """A relay's direct path from a producer on this instance (see the theory of operation;
    gateway/streams.py `Producer.park` feeds it).

    Attributes:
        last: the id of the last event written.
    """

    __slots__ = ("_direct", "_live", "_relay", "last")

    def __init__(self, relay: StreamRelay, direct: DirectBody) -> None:
        self._relay = relay
        self._direct = direct
        self.last = 0
        self._live = True  # (a `HeadSink` is not until its response starts)

    def ready(self) -> bool:
        """Whether events may be written directly now."""
        relay = self._relay
        return not relay._busy and relay._reason is None and self._direct.writable()

    def feed(self, first: int, payloads: Sequence[bytes]) -> bool:
        """Write events `first`, `first + 1`, ... in one write; False when they may not be
        written directly now (nothing was written: the reader takes over again)."""
        relay = self._relay
        if relay._busy or relay._reason is not None:
            return False
        if len(payloads) == 1:
            written = self._direct.write_event(first, payloads[0])
        else:
            written = self._direct.write(_frames(enumerate(payloads, first)))
        if not written:
            return False
        self.last = first + len(payloads) - 1
        relay._n_direct += len(payloads)
        relay._wrote = True
        return True

    def feed_one(self, seq: int, payload: bytes) -> bool:
        """`feed` of the one event `seq`: a relayed chunk's hot path (no sequence). While
        the body is open (`DirectBody._open`), `DirectBody.write_event` is spelt out
        here: a call and its loads less per relayed chunk (bench/hotpath.py --bytecodes);
        the bytes written and the checks are its own (tests/unit/test_fused_path.py and
        tests/integration/test_gateway_direct_state.py pin them)."""
        if not self._live:
            return self.feed(seq, (payload,))  # a `HeadSink` whose response has not started
        relay = self._relay
        if relay._busy or relay._reason is not None:
            return False
        body = self._direct
        if not body._open:  # (not streaming yet, or its state changed: the full checks)
            if not body.write_event(seq, payload):
                return False
        else:
            transport = body._transport
            if transport.is_closing():
                return False
            try:  # `write_event`'s framing tables
                head = _ID_LINES[seq]
                # (Compiled, a %-format of bytes only is one concatenation: no tuple.)
                frame = b"%b%b%b\n\n\r\n" % (
                    _SIZE_LINES[len(head) + len(payload) + 2],
                    head,
                    payload,
                )
            except IndexError:
                frame = _long_frame(seq, payload)
            if not _holding.n:
                transport.write(frame)
            else:
                body._hold(frame)
        self.last = seq
        relay._n_direct += 1
        relay._wrote = True
        return True


class _TaskScope:
    """`anyio.CancelScope`'s cancellation for a body that runs no anyio code (`events()`):
    `cancel()` cancels the task once, and the scope swallows that cancellation where it
    ends, as `asyncio.timeout` does. An anyio scope's creation, entry and exit cost ~8 us
    a request; this ~1 us."""

    __slots__ = ("_cancelling", "_inside", "_task", "cancel_called")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._inside = False
        self.cancel_called = False

    def __enter__(self) -> _TaskScope:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - entered in a task
        self._task = task
        self._cancelling = task.cancelling()
        self._inside = True
        if self.cancel_called:
            task.cancel()
        return self

    def cancel(self) -> None:
        """Cancel the body (now if it runs, else as soon as it starts)."""
        if self.cancel_called:
            return
        self.cancel_called = True
        if self._inside and self._task is not None:
            self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._inside = False
        task = self._task
        # Not held past the body: a detached reader's ended task (gateway/detach.py).
        self._task = None
        if not self.cancel_called or task is None:
            return False
        # Ours alone: a cancellation from outside (server shutdown) goes on.
        return task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError


class HeadSink(LiveSink):
    """A relay's direct path from the first events of an answer on: the producer's first
    append writes the status line, the headers and those events in one write from the
    producer's own task (gateway/guard.py `CycleHooks.start_now`), so the first token
    reaches the client without waiting for the reader's task to wake (a loop iteration,
    busy under load); from then on it is a `LiveSink` (when the server offers the direct
    body), so the reader is not woken for the second append either: parked on it before
    the first token, a detachable reader ends its task at once (gateway/detach.py).

    Attributes:
        last: the id of the last event written.
    """

    __slots__ = ("_can_live",)

    def __init__(self, relay: StreamRelay, direct: DirectBody | None) -> None:
        # `LiveSink.__init__`'s fields; without a direct body, the response's start only.
        self._relay = relay
        if direct is not None:  # unset without one: read only when `_can_live`
            self._direct = direct
        self.last = 0
        self._can_live = direct is not None
        self._live = False  # the response has started: events go as a `LiveSink`'s

    def ready(self) -> bool:
        """Whether the response can start here now, or (started) events be written."""
        relay = self._relay
        if self._live or relay._ex.started:
            return self._can_live and LiveSink.ready(self)
        return not relay._busy and relay._reason is None

    def feed(self, first: int, payloads: Sequence[bytes]) -> bool:
        """Start the response with events `first`, `first + 1`, ..., or write them as a
        `LiveSink` once it has started; False when it cannot (nothing was written: the
        reader takes over)."""
        if self._live:
            return LiveSink.feed(self, first, payloads)
        relay = self._relay
        if relay._ex.started:
            # Started by the reader (a keep-alive before the first token): on as a LiveSink.
            if not self._can_live:
                return False
            self._live = True
            return LiveSink.feed(self, first, payloads)
        if relay._busy or relay._reason is not None:
            return False
        data = _frames(enumerate(payloads, first))
        try:
            started = relay._ex.start_now(200, relay._headers, data)
        except RuntimeError:  # the server refused the message: the reader's write will say
            return False
        if not started:
            return False
        relay._sent()
        self.last = first + len(payloads) - 1
        relay._n_direct += len(payloads)
        # Its time, not the sidecar's next tick: once a request, and the keep-alive that
        # may follow a silence is then due `keepalive_s` after this write, not a tick later.
        relay._last_write = relay._loop.time()
        self._live = self._can_live
        return True


class EventSink(Protocol):
    """A reader that takes a producer's events as they are appended (`LiveSink`)."""

    last: int

    def ready(self) -> bool:
        """Whether it can take events now."""

    def feed(self, first: int, payloads: Sequence[bytes]) -> bool:
        """Take events `first`, `first + 1`, ...; False when it cannot (it took none)."""

    def feed_one(self, seq: int, payload: bytes) -> bool:
        """`feed` of the one event `seq` (the relay's hot path: no sequence per event)."""


class Waiter(Protocol):
    """What a parked reader waits on: an `asyncio.Future[None]`, or a detached reader
    (gateway/detach.py `Detached`)."""

    def done(self) -> bool:
        """Whether it was woken."""

    def set_result(self, result: None) -> None:
        """Wake it."""


# Bound once: compiled, `time.time()` looks the module and its attribute up at each call.
_time: Final = time.time


@mypyc_attr(allow_interpreted_subclasses=True)
class ProducerCore:
    """What a relayed chunk runs through of an answer's producer (gateway/streams.py
    `Producer`, its subclass, holds the rest): the log append of the chunk and the write
    to its live readers, `take_one`. Here, not in gateway/streams.py, so that it is
    compiled with the relay's sinks (tools/compile_native.py): interpreted, it was ~60
    bytecodes a relayed chunk (bench/hotpath.py --bytecodes).

    Attributes:
        stream_id: the stream.
        epoch: the lease epoch its appends carry.
        n_events: events in the log.
        degraded: the log failed mid-answer (store outage): the rest lives in `tail` only.
        reason: why it stopped early (stopped, abandoned, fenced...), or None.
        tail: the payloads of the last events appended, the last being event `n_events`.
    """

    __slots__ = (
        "_handle",
        "_log",
        "_n_waiting",
        "_sink",
        "_sinks",
        "_tail_max",
        "_unset",
        "degraded",
        "epoch",
        "n_events",
        "reason",
        "stream_id",
        "tail",
    )

    def __init__(
        self,
        stream_id: str,
        epoch: int,
        n_events: int,
        log: MemoryStreamLog | None,
        tail_max: int,
        tail: list[bytes],
    ) -> None:
        self.stream_id = stream_id
        self.epoch = epoch
        self.n_events = n_events
        # The memory log, whose `append_one` takes each chunk (None with a remote log: its
        # appends are batched); held as the log, so that the call is a native one.
        self._log = log
        # Its log's record, which `_take_one` appends to (no lookup by id per chunk):
        # taken at the first append (the log may be created after the producer).
        self._handle: LogHandle | None = None
        self._tail_max = tail_max  # 0: no tail kept (the memory log's readers read it)
        self.tail = tail
        self.degraded = False
        self.reason: str | None = None
        # Readers handed off to the producer (`Producer.park`): the first in `_sink`, any
        # others in `_sinks` (with the futures they park on).
        self._sink: EventSink | None = None
        self._sinks: dict[EventSink, Waiter] | None = None
        self._n_waiting = 0  # readers waiting in `Producer.wait`
        self._unset = True  # `Producer.first` not set by an append yet

    def take_one(self, payload: bytes) -> bool:
        """`Producer._take` of one chunk as its upstream bytes (the SDK stream's `one`
        sink): the hot path of a relayed chunk, the log append and the live readers' write
        in one call, no list or tuple per chunk (bench/hotpath.py). False when it is not
        taken here: the stream yields it and the producer appends it."""
        return _take_one(self, payload)

    def one_taker(self) -> OneTaker:
        """`take_one` as a native object of its own (see `client._engine.OneTaker`): the
        SDK's fast lane calls it natively (a method of this class, which interpreted code
        subclasses, is called through Python's call protocol even from compiled code)."""
        return _Taker(self)

    def _feed_one_more(self, n: int, payload: bytes, taken: bool) -> None:
        """`take_one`'s feed past the first sink (which took event `n`, or not)."""
        raise NotImplementedError  # (`Producer`'s)

    def _wake_readers(self) -> None:
        """Readers waiting for events wake; `first` is set by the first append."""
        raise NotImplementedError  # (`Producer`'s)


class _Taker(OneTaker):
    """A producer's `take_one` for the SDK's fast lane (`ProducerCore.one_taker`); it
    holds the producer, which holds nothing of it (no reference cycle)."""

    __slots__ = ("_core",)

    def __init__(self, core: ProducerCore) -> None:
        self._core = core

    def take_one(self, payload: bytes) -> bool:
        return _take_one(self._core, payload)


def _take_one(core: ProducerCore, payload: bytes) -> bool:
    """`ProducerCore.take_one`: a function, so that `_Taker` calls it natively."""
    log = core._log
    if log is None or core.degraded or core.reason is not None:
        return False
    handle = core._handle
    try:
        if handle is None:
            handle = core._handle = log.handle(core.stream_id)
        n = log.append_to(handle, core.epoch, payload, _time())
    except UnbrokenError:
        return False
    # `Producer._appended` spelt out for one payload: this runs once per relayed chunk.
    if core._tail_max:  # not with the memory log (its open block holds the events)
        tail = core.tail
        tail.append(payload)
        if len(tail) > core._tail_max:
            del tail[0]
    core.n_events = n
    sink = core._sink
    if sink is not None:
        if isinstance(sink, LiveSink):
            # A relay's sink: called natively (the protocol's call looks it up by name).
            taken = sink.feed_one(n, payload)
        else:
            taken = sink.feed_one(n, payload)
        if not taken or core._sinks:
            core._feed_one_more(n, payload, taken)
    if core._n_waiting or core._unset:  # rarely: no call per chunk otherwise
        core._wake_readers()
    return True


def _frame(event: tuple[int, bytes]) -> bytes:
    """The SSE frame of one log event (its id and data)."""
    return b"id: %d\ndata: %b\n\n" % event


def _frames(events: Iterable[tuple[int, bytes]]) -> bytes:
    """The SSE frames of log events, joined for one write."""
    return b"".join(map(_frame, events))


_SHUTDOWN = GatewayError(
    503,
    "the gateway is shutting down and cut this answer; send the request again",
    type="server_error",
    code="shutting_down",
)


async def _aclose(stream: AsyncStream) -> None:
    try:
        await stream.aclose()
    except (UnbrokenError, OSError) as exc:
        # The upstream connection is going away anyway; a failure to close it politely is
        # worth a line, not an error for a client that has its answer (or left).
        logger.debug("closing the upstream stream failed: %s", type(exc).__name__)


def _partial(stream: AsyncStream) -> ChatCompletion | None:
    try:
        return stream.current()
    except UnbrokenError:  # the answer may be in any state when the client left
        return None


def _trailer(completion: Answer) -> bytes:
    # An SSE comment (ignored by every client) that tells a curious human what it took.
    meta = completion.unbroken
    return (
        f": unbroken route={meta.route} attempts={len(meta.attempts)} retries={meta.retries} "
        f"resumes={meta.resumes} fallbacks={meta.fallbacks}\n\n"
    ).encode()
