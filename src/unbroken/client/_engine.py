"""Engine: the items of one answer for AsyncClient - the retry loop around `AnswerRun`
and each attempt's HTTP exchange - as one object stepped by `__anext__`, not a chain of
async generators. Also the attempt's helpers: the fast lane (chunks relayed from the
connection's data callback), the stream timer, closing and reading a response.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import logging
import math
import socket
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
)
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import httpx

from unbroken._wait import WAITING, WOKEN, SlotWait
from unbroken.client._common import AnswerRun
from unbroken.client._driver import MAX_ERROR_BODY_BYTES, Exchange, attempt_ended
from unbroken.client._reconnect import OPT_IN, Reconnects
from unbroken.client.cache import CacheEvent
from unbroken.core.attempt import Attempt
from unbroken.core.events import ControlEvent
from unbroken.core.flow import AttemptOutcome, Connect, Sleep
from unbroken.core.stream import split_events
from unbroken.core.wire import ChatCompletionChunk, decode_chunk
from unbroken.errors import TimeoutPhase

if TYPE_CHECKING:
    from unbroken.client.async_ import AsyncClient, AsyncStream

__all__ = ["Engine", "Items", "OneTaker", "StreamItem"]

logger = logging.getLogger("unbroken.client.async_")

StreamItem = ChatCompletionChunk | ControlEvent | CacheEvent


class Items(Protocol):
    """What AsyncStream, AsyncChatStream and the answer cache iterate: an `Engine`, or an
    async generator over one (the cache's)."""

    def __aiter__(self) -> AsyncIterator[StreamItem]: ...

    def __anext__(self) -> Awaitable[StreamItem]: ...

    def aclose(self) -> Coroutine[Any, Any, None]: ...


# The phases of an Engine (see its theory of operation).
_START = 0  # not stepped yet
_ACTION = 1  # the run's next action is due (a Sleep or a Connect)
_LANE = 2  # the body streams through the fast lane
_READ = 3  # the body is read by awaiting each read
_ENDING = 4  # the body ended, broke or timed out: judge the attempt
_CLOSE = 5  # the attempt's last chunks were taken: close its response, then act on
_SOCKET = 6  # the attempt runs over the WebSocket transport (its own generator)
_DONE = 7  # over: StopAsyncIteration from now on

# `_out` when nothing is due (never appended to: items are given out of lists of their own).
_NOTHING: list[Any] = []
# A fast lane's `pending` when nothing waits to be yielded (never appended to).
_NO_CHUNKS: list[ChatCompletionChunk] = []


class Engine:
    """The items of one answer (async): its chunks, and with `with_events` its control
    events, as `async for` gives them.

    Theory of operation: one object per answer holds what the generators `_run` (the
    retry loop) and `_attempt` (one HTTP attempt) held in their frames, and `__anext__`
    steps it through phases: START -> ACTION (take the run's made-up chunks and events;
    sleep for a Sleep; for a Connect, send and wait for the headers, reading an error
    body to its end) -> LANE or READ (the body: through the fast lane, from the
    connection's data callback, or read by read; a broken body of an unbroken gateway
    reconnects to its log) -> ENDING (judge the attempt) -> CLOSE (once its last chunks
    were taken: close the response, give the outcome to the run) -> ACTION, or DONE when
    the run has no next action. Items due wait in `_out` (reversed, popped), and each
    step that has some returns them first. Closing or cancelling the stream, or an
    error, runs what the generators' `finally` blocks ran: the stream timer stops, the
    response is closed, an unbroken gateway is told to stop an answer the consumer left
    (no outcome yet), and the run records a cancelled answer. Why: a live answer holds
    one suspended frame (this `__anext__`, waiting on the fast lane's future) instead of
    five, and a request costs no generator hand-offs (bench/sdk_request.py).
    """

    # A gateway holds one per live answer: no instance dict.
    __slots__ = (
        "_action",
        "_attempt",
        "_client",
        "_events",
        "_fired",
        "_lane",
        "_out",
        "_outcome",
        "_phase",
        "_reader",
        "_reconnects",
        "_reported",
        "_response",
        "_result",
        "_run",
        "_stream",
        "_sub",
        "_timer",
    )

    def __init__(self, client: AsyncClient, run: AnswerRun, *, with_events: bool) -> None:
        self._client = client
        self._run = run
        self._events = with_events
        self._phase = _START
        self._out: list[Any] = _NOTHING
        self._action: Connect | Sleep | None = None
        self._stream: AsyncStream | None = None
        self._clear()

    def _clear(self) -> None:
        """Forget the attempt (it ended, or none runs)."""
        # The attempt's parts: each set before the phases that read it run, None otherwise.
        self._attempt: Attempt | None = None
        self._response: httpx.Response | None = None
        self._result: AttemptOutcome | None = None
        self._outcome: list[AttemptOutcome] | None = None
        self._sub: AsyncGenerator[ChatCompletionChunk, None] | None = None
        self._timer: _StreamTimer | None = None
        self._lane: _FastLane | None = None
        self._reader: AsyncIterator[bytes] | None = None
        self._reconnects: Reconnects | None = None
        self._fired: TimeoutPhase | None = None
        self._reported = False  # the attempt's outcome went to the run

    def attach(self, stream: AsyncStream) -> bool:
        """Shape the chunks for `stream` (its `shown` and `ended`): it iterates this engine
        directly. False (nothing changed) when the engine gives events too."""
        if self._events:
            return False
        self._stream = stream
        return True

    def detach(self) -> None:
        """Let go of the stream `attach` gave (it iterates this engine through its own
        `_next` from now on)."""
        self._stream = None

    def text_template(self) -> tuple[bytes, bytes] | None:
        """The attempt's text template (`ChatStreamDecoder.text_template`), if any."""
        attempt = self._attempt  # None between attempts (`_clear`)
        return None if attempt is None else attempt.decoder.text_template

    def __aiter__(self) -> Engine:
        return self

    def __anext__(self) -> Awaitable[StreamItem]:
        if self._run.chunk_sink is not None:
            # A fast lane may run (only with a sink): the answer's long wait on the lane's
            # future then happens in a small awaitable instead of a suspended `_next` frame
            # (bench/sdk_request.py --memory: ~220 bytes less per live stream).
            return _LaneWait(self)
        return self._next()

    async def _next(self, lane_exit: bool = False) -> StreamItem:
        """The next item. With `lane_exit`, `_AT_LANE` instead of waiting on the fast lane
        (for `_LaneWait`, which waits itself)."""
        while True:
            if self._out:
                item = self._due()
                if item is not _NONE:
                    return item  # type: ignore[no-any-return]  # from a list of items
            phase = self._phase
            if phase == _DONE:
                if self._stream is not None:
                    return self._stream.ended()
                raise StopAsyncIteration
            try:
                if phase == _LANE:
                    if lane_exit:
                        return _AT_LANE  # type: ignore[no-any-return]  # see the docstring
                    lane = self._lane
                    assert lane is not None  # noqa: S101 - set with the phase
                    waiter = lane.tap()
                    if waiter is None:
                        await self._read()  # bytes are buffered, or the body ended
                        continue
                    try:
                        await waiter
                    finally:
                        lane.untap()
                    self._took(lane)
                elif phase == _READ:
                    await self._read()
                elif phase == _START:
                    self._act(self._run.next_action(None, time.monotonic()))
                elif phase == _ACTION:
                    await self._begin()
                elif phase == _ENDING:
                    self._end()
                elif phase == _CLOSE:
                    await self._close()
                else:  # _SOCKET
                    await self._socket()
            except BaseException:
                await self._abandon()
                raise

    def _due(self) -> Any:
        """The next of the items due (`_out`), as the stream shows it; `_NONE` when it
        shows none of them (`_out` is then empty)."""
        out = self._out
        while out:
            item = out.pop()
            if not out:  # not held empty while the answer streams on (56 bytes)
                self._out = _NOTHING
            stream = self._stream
            if stream is None or item.usage is None:
                return item
            item = stream.shown(item)
            if item is not None:
                return item
        return _NONE

    async def _failed(self, exc: BaseException) -> StreamItem:
        """What `_next` does when a step raises `exc` (for `_LaneWait`)."""
        await self._abandon()
        raise exc

    async def _read_on(self) -> StreamItem:
        """The lane could not be tapped: one read, then on as `_next` (for `_LaneWait`)."""
        try:
            await self._read()
        except BaseException:
            await self._abandon()
            raise
        return await self._next(lane_exit=True)

    async def aclose(self) -> None:
        """Stop the answer: close its connection; the run records it as cancelled (once).
        Nothing happens to an answer never iterated."""
        if self._phase == _START:
            self._phase = _DONE
        elif self._phase != _DONE:
            await self._abandon()
        self._out = _NOTHING

    # -- the run's actions ------------------------------------------------------------------

    def _act(self, action: Connect | Sleep | None) -> None:
        run = self._run
        items: list[Any] = run.take_chunks()
        if action is None:
            self._phase = _DONE
            run.close(time.monotonic())  # a no-op: the run recorded its end
        else:
            if self._events:
                events = run.drain_events()
                if events:
                    items = [*items, *events]
            self._action = action
            self._phase = _ACTION
        if items:
            self._out = items[::-1]

    def _settle(self, result: AttemptOutcome) -> None:
        """The attempt is over: its outcome goes to the run, which says what is next."""
        self._clear()
        self._act(self._run.next_action(result, time.monotonic()))

    async def _begin(self) -> None:
        action = self._action
        self._action = None
        run = self._run
        if not isinstance(action, Connect):
            assert action is not None  # noqa: S101 - set with the ACTION phase
            await anyio.sleep(action.seconds)
            self._act(run.next_action(None, time.monotonic()))
            return
        limiter = run.config.limiter
        if limiter.active:
            tokens = run.reserve_tokens()
            # A bucket refills with time, not on an event: polling it is the design.
            while (wait := limiter.take(time.monotonic(), tokens)) > 0:  # noqa: ASYNC110
                await anyio.sleep(min(wait, 60.0))
        attempt = self._attempt = run.new_attempt(action.plan, time.monotonic())
        sockets = self._client._sockets
        if sockets is not None and run.endpoint == "chat" and not run.query:
            outcome = self._outcome = []
            self._sub = sockets.attempt(run, attempt, outcome)
            self._phase = _SOCKET
            return
        await self._open(attempt)

    # -- one HTTP attempt -------------------------------------------------------------------

    async def _open(self, attempt: Attempt) -> None:
        """Send the attempt's request; on to its body, or to the next action."""
        run = self._run
        # Not kept: what the body's end needs is the attempt's and the response's (one object
        # less per live answer, ~100 bytes).
        ex = Exchange(run, attempt, read_s=None, also=OPT_IN)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio)
            loop = None
        timer: _StreamTimer | None = None
        try:
            if loop is None:
                response = await self._client._headers(ex, attempt.expiry())
            else:
                # The attempt's one timer: it cancels this wait for the headers, then
                # aborts the response's connection (no asyncio.timeout of its own for the
                # headers: ~5 us and a timer handle less per attempt). Armed in the next
                # loop turn, after this step wrote the request (the send's first step
                # writes it): its expiries count from the attempt's start all the same,
                # and the upstream works on the request meanwhile (~190 bytecodes less
                # before the write).
                task = asyncio.current_task(loop)
                assert task is not None  # noqa: S101 - awaited in a task
                timer = self._timer = _StreamTimer(loop, attempt, None, task)
                loop.call_soon(timer._arm_soon, context=_TIMER_CONTEXT)
                cancelling = task.cancelling()
                try:
                    response = await self._client._send(ex)
                except asyncio.CancelledError:
                    # Ours when the timer fired and nobody else cancelled (as asyncio.timeout).
                    if timer.fired is None or task.uncancel() > cancelling:
                        raise
                    response = None
        except httpx.HTTPError as exc:
            if timer is not None:
                timer.cancel()
            self._settle(ex.failed(exc, time.monotonic()))
            return
        if response is None:  # the headers (or deadline) timer fired
            self._settle(ex.failed(None, time.monotonic()))
            return
        self._response = response
        if not ex.streaming(response, time.monotonic()):
            if timer is not None:
                timer.cancel()
                self._timer = None
            body = b""
            try:
                with anyio.move_on_after(_remaining(attempt.expiry())):
                    async for part in response.aiter_raw():
                        body += part
                        if len(body) >= MAX_ERROR_BODY_BYTES:
                            break
            except httpx.HTTPError:
                pass  # a partial error body still names the error
            self._result = ex.error_status(body, time.monotonic())
            self._phase = _CLOSE
            return
        if timer is not None and not timer.attach(response):
            timer.cancel()
            timer = self._timer = None
        # Only with a timer: the lane has no per-read timeout of its own.
        lane = self._lane = _FastLane.open(run, attempt, response) if timer is not None else None
        if lane is None:
            # Sent, and streaming: its messages and headers are not held as objects
            # meanwhile. (With a lane, once it is tapped: see `_LaneWait.send`.)
            run.pack_request(attempt.plan)
            self._phase = _READ
        else:
            self._phase = _LANE

    def _took(self, lane: _FastLane) -> None:
        taken: list[Any] = lane.taken()
        if taken:
            self._out = taken[::-1]
        attempt = self._attempt
        assert attempt is not None  # noqa: S101 - set with the LANE phase
        if attempt.decoder.error is not None:
            self._phase = _ENDING
        elif lane.refused:  # no lane for the rest of the attempt
            self._lane = None
            self._phase = _READ

    async def _read(self) -> None:
        """One read of the body (reconnecting to an unbroken gateway's log when it broke)."""
        attempt = self._attempt
        response = self._response
        assert attempt is not None  # noqa: S101 - set for READ
        assert response is not None  # noqa: S101
        reader = self._reader
        if reader is None:  # made when first read from: a tapped answer may never need it
            reader = self._reader = _raw_reader(response)
        timer = self._timer
        try:
            if timer is not None:
                data = await reader.__anext__()
            else:
                # No way to abort this response's connection from a timer: bound each
                # read by the next expiry instead (slower).
                expiry = attempt.expiry()
                with anyio.move_on_after(_remaining(expiry)) as scope:
                    data = await reader.__anext__()
                if scope.cancelled_caught and expiry is not None:
                    self._fired = expiry[1]
                    self._phase = _ENDING
                    return
        except (StopAsyncIteration, httpx.HTTPError) as exc:
            await self._broke(exc)
            return
        chunks: list[Any] = attempt.feed(data, time.monotonic())
        del data
        if chunks:
            self._out = chunks[::-1]
        # After [DONE] the body's end is read too (it follows at once), so the connection
        # goes back to the pool; a server that keeps streaming after [DONE] is cut by the
        # idle timer, and a complete stream stays complete.
        if attempt.decoder.error is not None:
            self._phase = _ENDING

    async def _broke(self, exc: BaseException) -> None:
        """The body ended or broke: the attempt ends, or goes on from a gateway's log."""
        attempt = self._attempt
        response = self._response
        assert attempt is not None  # noqa: S101 - set for READ
        assert response is not None  # noqa: S101
        route = attempt.plan.route
        if isinstance(exc, httpx.HTTPError):
            logger.debug("stream from route %s broke: %s", route.name, type(exc).__name__)
        decoder = attempt.decoder
        timer = self._timer
        if decoder.finished or (timer is not None and timer.fired):
            self._phase = _ENDING
            return
        # A gateway keeps the answer in its log: read on from there.
        if self._reconnects is None:  # from the headers of the attempt's response
            self._reconnects = Reconnects(self._run, route, response)
        again = await self._client._reconnect(self._reconnects, decoder)
        if again is None:
            self._phase = _ENDING
            return
        with anyio.CancelScope(shield=True):
            await response.aclose()
        self._response = again
        self._reader = _raw_reader(again)
        self._lane = None
        self._phase = _READ
        if timer is not None:
            timer.cancel()
            self._timer = _StreamTimer.start(attempt, again)

    def _lane_ended(self) -> None:
        """The lane's body ended whole (read to its end after `[DONE]`): the attempt is
        judged and closed here, as `_read` (the end read), `_broke`, `_end` and `_close`
        do it in steps, without a reader or a coroutine (for `_LaneWait`). Items due
        (the attempt's last chunks) are given first: the close then waits for the next
        step, as in `_next`; so does a close that cannot be done at once."""
        self._phase = _ENDING
        self._end()
        if self._out:
            return
        response = self._response
        result = self._result
        assert response is not None  # noqa: S101 - set for CLOSE
        assert result is not None  # noqa: S101
        if _close_now(response):
            self._reported = True
            self._settle(result)

    def _end(self) -> None:
        timer = self._timer
        fired = self._fired
        if timer is not None:
            timer.cancel()
            fired = fired or timer.fired
            self._timer = None
        attempt = self._attempt
        response = self._response
        assert attempt is not None  # noqa: S101 - set for ENDING
        assert response is not None  # noqa: S101
        chunks, self._result = attempt_ended(
            self._run, attempt, response.status_code, fired, time.monotonic()
        )
        self._phase = _CLOSE
        if chunks:
            self._out = chunks[::-1]

    async def _close(self) -> None:
        self._reported = True
        response = self._response
        result = self._result
        assert response is not None  # noqa: S101 - set for CLOSE
        assert result is not None  # noqa: S101
        if not _close_now(response):
            with anyio.CancelScope(shield=True):
                await response.aclose()
        self._settle(result)

    async def _socket(self) -> None:
        sub = self._sub
        outcome = self._outcome
        assert sub is not None  # noqa: S101 - set for SOCKET
        assert outcome is not None  # noqa: S101
        try:
            self._out = [await sub.__anext__()]
        except StopAsyncIteration:
            self._settle(outcome[0])

    async def _abandon(self) -> None:
        """What the generators' `finally` blocks ran when the answer stops early."""
        self._phase = _DONE
        self._out = _NOTHING
        try:
            if self._timer is not None:
                self._timer.cancel()
            sub = self._sub
            if sub is not None:
                with anyio.CancelScope(shield=True):
                    await sub.aclose()
            response = self._response
            if response is not None:
                if not _close_now(response):
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
                if not self._reported and response.status_code == 200:
                    # The consumer stopped the answer: a gateway would go on generating.
                    attempt = self._attempt
                    assert attempt is not None  # noqa: S101 - set with its response
                    route = attempt.plan.route
                    with anyio.CancelScope(shield=True):
                        await self._client._stop_remote(Reconnects(self._run, route, response))
        finally:
            self._clear()
            self._run.close(time.monotonic())


# What `Engine._next(lane_exit=True)` returns when the answer reached its fast lane.
_AT_LANE: Any = object()
# What `Engine._due` returns when no item is due.
_NONE: Any = object()


class _LaneWait(Coroutine[Any, Any, "StreamItem"]):
    """`Engine._next` while the answer streams through the fast lane, as the iterator an
    `await` drives (what `Engine.__anext__` returns then): it taps the lane, gives the
    awaiting task the lane's future, and once that is resolved takes the lane's chunks; a
    step it does not take itself (anything but yielding taken chunks and waiting again),
    an error or a cancellation goes on in a coroutine of the engine's (`_next`, `_read_on`,
    `_failed`), which this then drives. The same steps as `_next`, in ~64 bytes instead of
    a suspended coroutine's ~280 (a gateway holds one per live answer)."""

    __slots__ = ("_engine", "_inner", "_lane", "_waiter")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lane: _FastLane | None = None  # the lane waited on (with `_waiter`)
        self._waiter: _TapWait | None = None
        self._inner: Coroutine[Any, Any, StreamItem] | None = None

    def __await__(self) -> Generator[Any, Any, StreamItem]:
        # Itself: a coroutine-like iterator (a Coroutine, so `asyncio.create_task` takes it
        # as it took `__anext__`'s coroutine; not a native one, so `await` drives it).
        return self  # type: ignore[return-value]  # (no `cast` call per wait)

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        """One step (see the class): the future to wait on, or StopIteration(item)."""
        inner = self._inner
        if inner is not None:
            return self._pass(inner.send, value)
        engine = self._engine
        waiter = self._waiter
        if waiter is not None:
            try:
                waiter.result()  # woken: raises if the future was cancelled
                self._waiter = None
                lane = self._lane
                assert lane is not None  # noqa: S101 - set with the waiter
                lane.untap()
                engine._took(lane)
            except BaseException as exc:
                self._untap()
                return self._delegate(engine._failed(exc))
        # What `_next` gives before any step, given here without a coroutine of the
        # engine's (items due, such as a usage chunk the lane took, and the end; ~1 us each,
        # a few per answer): outside the `try`, as there.
        if engine._out:
            item = engine._due()
            if item is not _NONE:
                raise StopIteration(item)
        if engine._phase == _DONE:
            stream = engine._stream
            if stream is None:
                raise StopAsyncIteration
            raise StopIteration(stream.ended())
        # (What goes on in a coroutine is started after the `try`: its StopIteration is
        # the item, not an error of this step.)
        then: Coroutine[Any, Any, StreamItem] | None = None
        try:
            lane = engine._lane
            if engine._phase != _LANE or lane is None:
                waiter = None
                then = engine._next(lane_exit=True)
            else:
                waiter = lane.tap()
                # The attempt streams: its request is not held as objects meanwhile
                # (`Engine._open`): its headers are packed here, after the tap gave the
                # chunk sink the events that came with the response's head (in a gateway,
                # the client's first write), not on their way (its messages were packed
                # as the request was encoded, `Exchange.content`); a no-op once packed.
                attempt = engine._attempt
                assert attempt is not None  # noqa: S101 - set with the LANE phase
                if not lane.packed:  # (once: the attempt's request stays packed)
                    lane.packed = True
                    engine._run.pack_request(attempt.plan)
                if waiter is None:  # bytes are buffered, or the body ended
                    if lane.drained() and attempt.decoder.finished:
                        engine._lane_ended()
                    else:
                        then = engine._read_on()
        except BaseException as exc:
            self._untap()
            return self._delegate(engine._failed(exc))
        if waiter is None:
            if then is None:  # the attempt was judged here: on with what is due
                return self.send(None)
            return self._delegate(then)
        self._lane = lane
        self._waiter = waiter
        if waiter.done():
            return self.send(None)
        waiter._asyncio_future_blocking = True  # what `await future` yields to the task
        return waiter

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Raise into the wait (a cancellation): the engine abandons the answer, as
        `_next` does."""
        exc = typ if isinstance(typ, BaseException) else typ() if val is None else val
        if not isinstance(exc, BaseException):
            exc = typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        inner = self._inner
        if inner is not None:
            return self._pass(inner.throw, exc)
        if self._waiter is None:  # not started: raised as a coroutine not started would
            raise exc
        self._untap()
        return self._delegate(self._engine._failed(exc))

    def close(self) -> None:
        """Close the wait as a coroutine is closed (GeneratorExit raised in it)."""
        inner = self._inner
        if inner is not None:
            inner.close()
            return
        if self._waiter is None:
            return
        try:
            self.throw(GeneratorExit)
        except (GeneratorExit, StopIteration):
            return
        inner = self._inner
        if inner is not None:
            inner.close()
        raise RuntimeError("the engine's wait ignored GeneratorExit")

    def _untap(self) -> None:
        if self._waiter is not None and self._lane is not None:
            self._waiter = None
            self._lane.untap()

    def _delegate(self, inner: Coroutine[Any, Any, StreamItem]) -> Any:
        self._inner = inner
        self._waiter = None
        return self._pass(inner.send, None)

    def _pass(self, step: Callable[[Any], Any], arg: Any) -> Any:
        # One step of the engine's coroutine; when it reached the fast lane (`_AT_LANE`),
        # this waits there itself (the coroutine ended: no frame held while the answer
        # streams).
        try:
            return step(arg)
        except StopIteration as stop:
            if stop.value is not _AT_LANE:
                raise
        self._inner = None
        return self.send(None)


class _TapWait(SlotWait):
    """The fast lane's wait (`_FastLane.tap`), resolved by the connection and the lane
    (`done`, `set_result`) when a chunk must be yielded or the response ended: 80 bytes
    where a future is 144, held by a gateway per live answer for the answer's life."""

    __slots__ = ()

    not_over = "the lane's wait is not over"

    def set_result(self, result: None) -> None:
        """Resolve it (the response ended, or a chunk must be yielded)."""
        if self._state != WAITING:
            raise asyncio.InvalidStateError("the lane's wait is over already")
        self._end(WOKEN)

    def _end(self, state: int) -> asyncio.Handle | None:
        handle = super()._end(state)
        # Its task's wake-up let go at once: the lane keeps the wait until its next tap.
        self._fn = self._ctx = None
        return handle


class _Tappable(Protocol):
    """A network stream that hands body bytes to a callback as they arrive (the gateway's
    upstream connections, gateway/upstream.py)."""

    def tap(self, on_body: Callable[[bytes], None] | None, waiter: _TapWait | None) -> bool: ...

    def drained(self) -> bool:
        """The response is complete and all its body was handed on (a read would end)."""
        ...

    def hold_client_writes(self) -> bool:
        """Hold the writes to the clients (of the events the tap relays) until
        `release_client_writes`, so that each client gets one write for them; False
        (nothing to release) when they are held already."""
        ...

    def release_client_writes(self) -> None:
        """Make the writes `hold_client_writes` held."""
        ...


# Bound once: compiled, `time.monotonic()` looks the module and its attribute up at each
# call (the lane reads the clock once per relayed chunk).
_monotonic: Final = time.monotonic


class _FastLane:
    """Chunks decoded in the connection's data callback and given to the run's chunk sink
    there (`AsyncStream.set_chunk_sink`), while the engine waits for the response to end,
    for a chunk the sink does not take, or for one it must not (a usage chunk, shaped by
    the stream): those come back from `taken` in order, to be yielded.

    Why: a chunk read through the generators costs a task wake-up and five coroutine frames
    resumed and unwound; the gateway relays thousands of chunks a second through here
    (bench/gateway.py load at 32 streams of 5 ms tokens: 60 -> 46 us of CPU per chunk).
    """

    __slots__ = (
        "_attempt",
        "_conn",
        "_one",
        "_payload_sink",
        "_sink",
        "_waiter",
        "error",
        "packed",
        "pending",
        "refused",
    )

    def __init__(
        self,
        conn: _Tappable,
        attempt: Attempt,
        sink: Callable[[list[ChatCompletionChunk]], bool],
    ) -> None:
        # First, the fields `_on_body` reads for each relayed chunk: compiled, the fields
        # lie in the order first set, and these then share the object's first cache line.
        # Shared and empty until a chunk must be yielded (one list less per live answer).
        self.pending: list[ChatCompletionChunk] = _NO_CHUNKS
        self._attempt = attempt
        # One chunk read alone, as just its bytes (the hot path of a relayed chunk).
        self._one = sink.one if isinstance(sink, _PayloadSink) else None
        self._conn = conn
        self._sink = sink
        # A sink that also takes the chunks' upstream bytes (`set_chunk_sink`).
        self._payload_sink = sink.sink if isinstance(sink, _PayloadSink) else None
        self._waiter: _TapWait | None = None
        self.error: Exception | None = None
        self.refused = False  # the sink refused a chunk: no lane for the rest of the attempt
        self.packed = False  # the run's request was packed (`_LaneWait.send`)

    @classmethod
    def open(cls, run: AnswerRun, attempt: Attempt, response: httpx.Response) -> _FastLane | None:
        """A lane when the run has a chunk sink and the response's connection can be
        tapped, else None."""
        sink = run.chunk_sink
        conn = _network_stream(response)
        if sink is None or not callable(getattr(conn, "tap", None)):
            return None
        return cls(conn, attempt, sink)  # (tappable: checked above)

    def tap(self) -> _TapWait | None:
        """Tap the connection: the wait resolved when something must be yielded or the
        response ended (then `untap()` and `taken()`), or None when it cannot be tapped
        now (read it as usual)."""
        waiter = _TapWait(asyncio.get_running_loop())
        # Set first: the connection may hand buffered bytes to `_on_body` within `tap`.
        self._waiter = waiter
        # The lane itself, not its bound `_on_body`: a connection that knows lanes calls
        # `_on_body` natively (gateway/upstream.py), and no bound method is made per tap.
        if not self._conn.tap(self, waiter):
            self._waiter = None
            return None
        return waiter

    def drained(self) -> bool:
        """The connection's response ended, all of it handed on (`_Tappable.drained`)."""
        return self._conn.drained()

    def untap(self) -> None:
        """Stop the tap (its future resolved, or the wait was interrupted)."""
        self._conn.tap(None, None)
        self._waiter = None

    def __call__(self, data: bytes) -> None:
        """Take a read of the body (`_on_body`): what a connection calls, given the lane as
        its tap."""
        self._on_body(data)

    def taken(self) -> list[ChatCompletionChunk]:
        """The chunks to yield, in order (raises what the data callback raised)."""
        if self.error is not None:
            raise self.error
        taken, self.pending = self.pending, _NO_CHUNKS
        return taken

    def _on_body(self, data: bytes) -> None:
        # `pending` is the shared empty list until a chunk must be yielded: never appended
        # to while empty.
        pending = self.pending
        attempt = self._attempt
        try:
            one = self._one
            if one is not None and not pending:
                # The hot path: one chunk, relayed as its upstream bytes in one call (no
                # chunk list, no payload list; bench/hotpath.py).
                got = attempt.relay_one(data, _monotonic())
                if type(got) is bytes:
                    if not one.take_one(got):
                        # Refused: yielded instead, as it was decoded (its bytes unchanged).
                        self.refused = True
                        self.pending = [decode_chunk(got)]
                        self._wake()
                    return
                if got is None:
                    # Several events in one read (a loaded upstream sends them so): each
                    # on this hot path in turn, not decoded and re-encoded together
                    # (bench/hotpath.py --per-frame 2: 7.5 -> 4.6 us a chunk).
                    self._several(data, attempt, one)
                    return
                chunks: list[ChatCompletionChunk] = got  # type: ignore[assignment]  # (no call)
            else:
                chunks = attempt.feed(data, _monotonic())
            self._give(chunks, pending)
        except Exception as exc:  # raised again from `taken`, in the engine
            self.error = exc
            self._wake()

    def _several(self, data: bytes, attempt: Attempt, one: OneTaker) -> None:
        """`_on_body` for each event of a read of several whole events, the hot path's
        steps inline (no call of `_on_body` per event, one clock read for the read); the
        events reach each client in one write (the connection holds the writes)."""
        now = _monotonic()
        conn = self._conn
        held = conn.hold_client_writes()
        try:
            for event in split_events(data):
                pending = self.pending
                if pending:  # a chunk waits to be yielded: the rest follows it
                    self._give(attempt.feed(event, now), pending)
                    continue
                got = attempt.relay_one(event, now)
                if type(got) is bytes:
                    if not one.take_one(got):
                        self.refused = True
                        self.pending = [decode_chunk(got)]
                        self._wake()
                elif got is None:  # (not for one event: as `_on_body` would take it)
                    self._on_body(event)
                    if self.error is not None:
                        return  # raised from `taken`: the rest of the read is moot
                else:
                    self._give(got, pending)  # type: ignore[arg-type]  # a list (no call)
        finally:
            if held:
                conn.release_client_writes()

    def _give(self, chunks: list[ChatCompletionChunk], pending: list[ChatCompletionChunk]) -> None:
        """The chunks of a read (or of one of its events) that were not relayed as their
        bytes: to the sink, or to be yielded (then the engine is woken)."""
        attempt = self._attempt
        if pending:
            pending.extend(chunks)
        elif (
            self._payload_sink is not None
            and attempt.payloads is not None
            and chunks[0].usage is None
        ):
            # The hot path: one chunk, relayed as its upstream bytes (no re-encoding).
            if not self._payload_sink(chunks, attempt.payloads):
                self.refused = True
                self.pending = [*chunks]
        elif chunks:
            # The chunks of one read before any usage chunk go to the sink together:
            # one log append and one client write for all of them (a loaded gateway
            # reads several events at once; the write syscall was ~40% of its CPU).
            n = 0
            for chunk in chunks:
                if chunk.usage is not None:
                    break
                n += 1
            if n and not self._take(chunks if n == len(chunks) else chunks[:n]):
                self.refused = True
                n = 0
            if n < len(chunks):
                self.pending = chunks[n:]
        if self.pending or attempt.decoder.error is not None:
            self._wake()

    def _take(self, chunks: list[ChatCompletionChunk]) -> bool:
        if self._payload_sink is not None:
            return self._payload_sink(chunks, None)
        return self._sink(chunks)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class OneTaker:
    """What takes a relayed chunk as its upstream bytes (`AsyncStream.set_chunk_sink`'s
    `one`), as a native object: `take_one(payload)`, True when taken.

    Why: the fast lane calls it for every relayed chunk; a bound method given as `one` is
    called through Python's call protocol (its arguments parsed by a wrapper), a subclass
    compiled with this module natively. A sink whose `one` is the bound `take_one` of an
    object with `one_taker()` (the gateway's producer, gateway/relay.py) is called through
    the `OneTaker` that makes; any other `one` through `_CallOne`."""

    __slots__ = ()

    def take_one(self, payload: bytes) -> bool:
        """Take the chunk `payload`; False when it is not taken (it is yielded instead)."""
        raise NotImplementedError


class _CallOne(OneTaker):
    """A `OneTaker` that calls a plain callable."""

    __slots__ = ("_one",)

    def __init__(self, one: Callable[[bytes], bool]) -> None:
        self._one = one

    def take_one(self, payload: bytes) -> bool:
        return self._one(payload)


def _one_taker(one: Callable[[bytes], bool]) -> OneTaker:
    """The `OneTaker` that does what `one` does (see `OneTaker`)."""
    owner = getattr(one, "__self__", None)
    make = getattr(owner, "one_taker", None)
    if make is not None and one == getattr(owner, "take_one", None):
        taker = make()
        if isinstance(taker, OneTaker):
            return taker
    return _CallOne(one)


class _PayloadSink:
    """A chunk sink that also takes the upstream bytes of the chunks (see
    `AsyncStream.set_chunk_sink`); called as a plain sink, it gets None for them."""

    __slots__ = ("one", "sink")

    def __init__(
        self,
        sink: Callable[[list[ChatCompletionChunk], list[bytes] | None], bool],
        one: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.sink = sink
        self.one = None if one is None else _one_taker(one)

    def __call__(self, chunks: list[ChatCompletionChunk]) -> bool:
        return self.sink(chunks, None)


_TIMER_CONTEXT = contextvars.Context()


class _Timers:
    """The stream timers of one event loop in one heap, under one loop timer armed at the
    earliest entry. Why: a live attempt then holds its place in the heap instead of a loop
    timer handle, its libuv timer and a bound method (~260 bytes per live answer on
    uvloop), and arming costs a heap push. The heap holds the timers themselves, ordered
    by when each is due (no entry tuple per live answer, 64 bytes): a timer is in it at
    most once, and its time never changes there (it is pushed again only once popped). A
    disarmed timer is skipped at its time, or dropped with the others when they make up
    half the heap."""

    __slots__ = ("_at", "_handle", "_heap", "_stale")

    def __init__(self) -> None:
        self._heap: list[_StreamTimer] = []
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the loop timer fires (inf: not armed)
        self._stale = 0  # entries in the heap whose timer no longer waits on them

    def push(self, timer: _StreamTimer) -> None:
        """Call `timer._check()` at `timer._when` (monotonic) unless it is disarmed first
        (`_armed` false, then `drop`); it must not be in the heap."""
        heapq.heappush(self._heap, timer)
        when = timer._when
        if when < self._at:
            self._wake_at(when)

    def drop(self) -> None:
        """An entry went stale: its timer was disarmed."""
        self._stale += 1
        heap = self._heap
        if self._stale > _MIN_STALE and self._stale * 2 > len(heap):
            heap[:] = [timer for timer in heap if timer._armed]
            heapq.heapify(heap)
            self._stale = 0

    def _wake_at(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        # In a context of its own, shared: the checks read no context variable, and each
        # handle would copy the current context.
        self._handle = asyncio.get_running_loop().call_later(
            max(0.0, when - time.monotonic()), self._fire, context=_TIMER_CONTEXT
        )

    def _fire(self) -> None:
        self._handle = None
        self._at = math.inf
        heap = self._heap
        now = time.monotonic()
        try:
            while heap and heap[0]._when <= now:
                timer = heapq.heappop(heap)
                if timer._armed:
                    timer._armed = False
                    timer._check()  # may push it again
                else:
                    self._stale -= 1
        finally:  # the others stay armed whatever one check raised
            if heap and heap[0]._when < self._at:
                self._wake_at(heap[0]._when)


# The timers of each event loop (an AsyncClient may serve several loops, one at a time).
_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Timers] = weakref.WeakKeyDictionary()
# Stale entries tolerated before a heap is compacted.
_MIN_STALE = 64


# The last loop asked for and its timers (a client serves one loop, as a rule): no weak
# dictionary lookup per attempt.
_LAST_TIMERS: tuple[weakref.ref[asyncio.AbstractEventLoop], _Timers] | None = None


def _timers(loop: asyncio.AbstractEventLoop) -> _Timers:
    global _LAST_TIMERS  # a one-entry cache of _TIMERS
    last = _LAST_TIMERS
    if last is not None and last[0]() is loop:
        return last[1]
    timers = _TIMERS.get(loop)
    if timers is None:
        timers = _TIMERS[loop] = _Timers()
    _LAST_TIMERS = (weakref.ref(loop), timers)
    return timers


class _StreamTimer:
    """An attempt's timers without a timer per read: one entry in the loop's timer heap
    (`_Timers`) at the next expiry. When it fires early (data came since, so the expiry
    moved later) it re-arms; when the expiry has really passed it records the phase and
    ends the wait: it cancels the task waiting for the headers, or once they came
    (`attach`) aborts the response's connection, which ends the pending read at once.
    Cancel scopes cannot span the engine's steps, and one per read cost ~15 us per chunk."""

    __slots__ = ("_abort", "_armed", "_attempt", "_task", "_timers", "_when", "fired")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        attempt: Attempt,
        abort: _Abortable | None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        self._timers = _timers(loop)
        self._attempt: Attempt | None = attempt  # None once cancelled
        self._abort = abort
        self._task = task
        self._armed = False  # in the heap, and to be checked at `_when`
        self._when = 0.0
        self.fired: TimeoutPhase | None = None

    @classmethod
    def start(cls, attempt: Attempt, response: httpx.Response) -> _StreamTimer | None:
        """A timer for `response`, or None when it cannot be aborted (or not on asyncio)."""
        abort = _aborter(response)
        if abort is None:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio)
            return None
        timer = cls(loop, attempt, abort)
        timer._arm()
        return timer

    def __lt__(self, other: _StreamTimer) -> bool:
        # The heap's order (ties in any order).
        return self._when < other._when

    def attach(self, response: httpx.Response) -> bool:
        """The headers came: abort `response`'s connection when a timer expires from now
        on. False (nothing changed) when it cannot be aborted."""
        abort = _aborter(response)
        if abort is None:
            return False
        self._abort = abort
        self._task = None
        return True

    def _arm(self) -> None:
        attempt = self._attempt
        assert attempt is not None  # noqa: S101 - armed only until `cancel`
        when = attempt.recheck_at(time.monotonic())
        if when is not None:
            self._when = when
            self._armed = True
            self._timers.push(self)

    def _arm_soon(self) -> None:
        # `_arm` from a loop callback (`Engine._open`): not once the attempt ended, nor
        # again when armed meanwhile.
        if self._attempt is not None and not self._armed:
            self._arm()

    def _check(self) -> None:
        attempt = self._attempt
        assert attempt is not None  # noqa: S101 - checked only while armed
        expiry = attempt.expiry()
        if expiry is None:
            self._arm()  # nothing due yet; look again when something may be
            return
        if time.monotonic() >= expiry[0]:
            self.fired = expiry[1]
            if self._abort is not None:
                self._abort.abort()
            elif self._task is not None:
                self._task.cancel()
        else:
            self._arm()

    def cancel(self) -> None:
        """Disarm (the attempt ended)."""
        if self._armed:
            self._armed = False
            self._timers.drop()
        # Its stale entry may stay in the heap a while: it holds nothing of the attempt.
        self._attempt = self._abort = self._task = None


class _Abortable(Protocol):
    """What breaks a response's connection, ending any pending read: `abort()`."""

    def abort(self) -> None: ...


class _Shutdown:
    """Aborts a connection by shutting its socket down."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


def _network_stream(response: httpx.Response) -> Any:
    """The response's connection (its `network_stream` extension), if any."""
    # Read through Any: httpx types the extensions as a dict, while a transport may give
    # another mapping (gateway/upstream.py does), and compiled code checks declared types.
    untyped: Any = response
    return untyped.extensions.get("network_stream")


def _aborter(response: httpx.Response) -> _Abortable | None:
    """What breaks the response's connection (ending any pending read): the connection
    itself when it has `abort()` (our LeanTransport's: no bound method held per live
    answer, 64 bytes), else its socket's shutdown."""
    stream = _network_stream(response)
    if stream is None:
        return None
    if callable(getattr(stream, "abort", None)):
        return stream  # type: ignore[no-any-return]  # abortable, checked
    sock = stream.get_extra_info("socket")
    if sock is None:
        return None
    return _Shutdown(sock)


def _close_now(response: httpx.Response) -> bool:
    """Close `response` as `response.aclose()` does, when its body has a `close_now()`
    that never waits (the gateway's upstream responses, gateway/upstream.py); False
    (nothing done) otherwise: close it shielded from cancellation.

    Why: a close that never waits cannot be cancelled half-way, and the shield scope
    cost ~8 us per attempt on the gateway's path."""
    close_now = getattr(response.stream, "close_now", None)
    if not callable(close_now):
        return False
    if not response.is_closed:
        response.is_closed = True
        close_now()
    return True


def _raw_reader(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body of a streamed response as read, from its transport's stream directly:
    httpx's `aiter_raw` adds an async generator, a context manager and byte counting to
    every read (one more frame per relayed chunk on the gateway's hot path, which relays
    thousands a second); what it also does - refuse a consumed stream, close at the end -
    the attempt does itself (the response is closed in its `finally`)."""
    stream = response.stream
    if isinstance(stream, httpx.AsyncByteStream) and not response.is_stream_consumed:
        response.is_stream_consumed = True
        return stream.__aiter__()
    return response.aiter_raw().__aiter__()


def _remaining(expiry: tuple[float, Any] | None) -> float:
    return float("inf") if expiry is None else max(0.0, expiry[0] - time.monotonic())
