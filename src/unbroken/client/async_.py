"""AsyncClient: the asyncio/anyio SDK. The same core flow as Client, driven with httpx async;
each read is bounded by the next stream timer with an anyio cancel scope."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Unpack, cast, overload
from urllib.parse import quote

import anyio
import httpx
import msgspec

from unbroken.client._cached import acached
from unbroken.client._common import AnswerRun, ClientBase, Endpoint
from unbroken.client._driver import (
    MAX_ERROR_BODY_BYTES,
    Exchange,
    map_transport_error,
    request_headers,
    status_error,
)
from unbroken.client._options import DEFAULT_MAX_CONNECTIONS, ClientOptions
from unbroken.client._reconnect import GIVE_UP_STATUSES, OPT_IN, Reconnects
from unbroken.client._results import (
    RAW,
    APIResponse,
    AsyncAPIResponse,
    UsageShaper,
    fim_messages,
    models_page,
    one_model,
    text_answer,
    text_chunk,
)
from unbroken.client._wsproto import check_transport, load_sockets
from unbroken.client.cache import CacheEvent
from unbroken.core.accumulator import EventSplitter
from unbroken.core.attempt import Attempt
from unbroken.core.events import ChatEvent, ControlEvent, DoneEvent, TextEvent
from unbroken.core.flow import AttemptOutcome, Connect
from unbroken.core.sentences import SentenceSplitter
from unbroken.core.stream import ChatStreamDecoder
from unbroken.core.wire import (
    Answer,
    ChatCompletion,
    ChatCompletionChunk,
    Model,
    ModelsPage,
    TextAnswer,
    TextCompletion,
    completion_to_chunks,
    decode_chunk,
)
from unbroken.errors import TimeoutPhase, UpstreamError

if TYPE_CHECKING:
    from unbroken.client._ws import AsyncSockets

__all__ = ["AsyncChatStream", "AsyncClient", "AsyncStream", "AsyncTextStream"]

logger = logging.getLogger(__name__)

StreamItem = ChatCompletionChunk | ControlEvent | CacheEvent
_Outcome = list[AttemptOutcome]


class AsyncClient(ClientBase):
    """The async twin of `Client` (same arguments, same behaviour); use it with asyncio or
    trio through anyio. `await client.chat.completions.create(...)`, `async for` over
    streams, `await client.aclose()` (or `async with`)."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | Literal["http", "websocket"] | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(api_key, base_url, options)
        self._sockets: AsyncSockets | None = None
        self._owns_sockets = False
        pool = transport if isinstance(transport, httpx.AsyncBaseTransport) else None
        if check_transport(transport, httpx.AsyncBaseTransport):
            self._sockets = load_sockets().AsyncSockets()
            self._owns_sockets = True
        self._setup_http(http_client, pool)
        self.chat = _AsyncChat(self)
        self.completions = _AsyncTextCompletions(self)
        self.models = _AsyncModels(self)

    @classmethod
    def _without_key(
        cls,
        api_key: str | None,
        base_url: str | None,
        options: dict[str, Any],
        transport: httpx.AsyncBaseTransport | None,
    ) -> AsyncClient:
        """A client whose requests may carry their own key (for the transports)."""
        self = cls.__new__(cls)
        ClientBase.__init__(self, api_key, base_url, options, need_key=False)
        self._sockets = None
        self._owns_sockets = False
        self._setup_http(None, transport)
        self.chat = _AsyncChat(self)
        self.completions = _AsyncTextCompletions(self)
        self.models = _AsyncModels(self)
        return self

    def _setup_http(
        self, http_client: httpx.AsyncClient | None, transport: httpx.AsyncBaseTransport | None
    ) -> None:
        # Streams go straight to the transport: httpx's client layer (cookie jar, auth,
        # redirects, URL merging) costs ~0.5 ms per request and has nothing to do here.
        # With a caller's http_client, its send() is used as given.
        self._owns_http = http_client is None
        self._transport: httpx.AsyncBaseTransport | None = None
        self._post: _SendPost | None = None
        if http_client is None:
            n = self._options.get("max_connections", DEFAULT_MAX_CONNECTIONS)
            self._transport = transport or httpx.AsyncHTTPTransport(
                http2=self._options.get("http2", False),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
            http_client = httpx.AsyncClient(transport=self._transport, follow_redirects=False)
            # A name of our own, so a caller's transport is never taken for the lean one by
            # an unrelated method.
            post = getattr(self._transport, "unbroken_send_post", None)
            self._post = cast("_SendPost", post) if callable(post) else None
        self._http = http_client

    def with_options(self, **changes: Any) -> AsyncClient:
        """A copy with some options changed (openai's `with_options`), sharing the
        connection pool: `client.with_options(timeout=5, max_retries=0).chat...`."""
        changes = dict(changes)
        http_client = changes.pop("http_client", None)
        api_key, base_url, options = self._copy_options(changes)
        copy = AsyncClient(
            api_key,
            base_url,
            http_client=http_client or (self._http if self._transport is None else None),
            transport=self._transport if http_client is None else None,
            **options,  # checked by ClientConfig.build
        )
        copy._owns_http = False  # the pool stays this client's
        copy._sockets = self._sockets  # and so do its WebSocket connections
        return copy

    copy = with_options

    async def aclose(self) -> None:
        """Close the connection pool (if this client made it) and an answer cache made
        from a spec."""
        if self._owns_http:
            await self._http.aclose()
        if self._owns_sockets and self._sockets is not None:
            await self._sockets.aclose()
        if self._cache_close != "none" and self._config.cache is not None:
            await self._config.cache.aclose(store=self._cache_close == "all")

    close = aclose  # openai's AsyncOpenAI names it close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _get_json(self, path: str) -> tuple[Any, httpx.Response]:
        route = self._config.routes[0]
        t = self._config.timeouts
        try:
            response = await self._http.get(
                self._config.url(route, path, beta=False),
                headers=request_headers(route, self._config.headers),
                timeout=httpx.Timeout(t.headers_s, connect=t.connect_s),
            )
        except httpx.HTTPError as exc:
            raise map_transport_error(exc, route, got_headers=False) from exc
        if response.status_code != 200:
            raise status_error(route, response, response.content[:MAX_ERROR_BODY_BYTES])
        try:
            return msgspec.json.decode(response.content), response
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"route {route.name!r} sent invalid JSON for {path}") from exc

    async def balance(self) -> dict[str, Any]:
        """DeepSeek's `GET /user/balance` (amounts are strings, as the API sends them)."""
        data, _ = await self._get_json("/user/balance")
        if not isinstance(data, dict):
            raise UpstreamError("the balance endpoint did not return an object")
        return data

    # -- streaming engine ----------------------------------------------------------------

    def _start(
        self,
        model: str,
        messages: Iterable[Any],
        params: dict[str, Any],
        *,
        stream: bool,
        events: bool,
        endpoint: Endpoint = "chat",
        partial: ChatCompletion | None = None,
    ) -> tuple[AnswerRun, AsyncGenerator[StreamItem, None]]:
        run = self._new_run(model, messages, params, stream=stream, endpoint=endpoint)
        if partial is not None:
            # What was shown already: the flow's first attempt is then a continuation.
            for chunk in completion_to_chunks(partial):
                run.answer.feed(chunk)
        items = self._run(run, with_events=events)
        cache = self._config.cache
        if cache is not None and endpoint == "chat" and partial is None:
            items = acached(cache, run, items, paced=stream, events=events)
        return run, items

    async def _run(self, run: AnswerRun, *, with_events: bool) -> AsyncGenerator[StreamItem, None]:
        # Closing or cancelling the stream lands here: the answer is recorded once.
        try:
            config = self._config
            action = run.next_action(None, time.monotonic())
            while action is not None:
                for chunk in run.take_chunks():
                    yield chunk
                if with_events:
                    for event in run.drain_events():
                        yield event
                if not isinstance(action, Connect):
                    await anyio.sleep(action.seconds)
                    action = run.next_action(None, time.monotonic())
                    continue
                if config.limiter.active:
                    tokens = run.reserve_tokens()
                    # A bucket refills with time, not on an event: polling it is the design.
                    while (wait := config.limiter.take(time.monotonic(), tokens)) > 0:  # noqa: ASYNC110
                        await anyio.sleep(min(wait, 60.0))
                attempt = run.new_attempt(action.plan, time.monotonic())
                outcome: _Outcome = []
                sockets = self._sockets
                if sockets is not None and run.endpoint == "chat" and not run.query:
                    attempts = sockets.attempt(run, attempt, outcome)
                else:
                    attempts = self._attempt(run, attempt, outcome)
                async for chunk in attempts:
                    yield chunk
                    del chunk  # not held while the attempt waits for the next one
                action = run.next_action(outcome[0], time.monotonic())
            for chunk in run.take_chunks():
                yield chunk
        finally:
            run.close(time.monotonic())

    async def _attempt(
        self, run: AnswerRun, attempt: Attempt, outcome: _Outcome
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        ex = Exchange(run, attempt, read_s=None, also=OPT_IN)
        try:
            response = await self._headers(ex, attempt.expiry())
        except httpx.HTTPError as exc:
            outcome.append(ex.failed(exc, time.monotonic()))
            return
        if response is None:  # the headers (or deadline) timer fired
            outcome.append(ex.failed(None, time.monotonic()))
            return
        try:
            if not ex.streaming(response, time.monotonic()):
                body = b""
                try:
                    with anyio.move_on_after(_remaining(attempt.expiry())):
                        async for part in response.aiter_raw():
                            body += part
                            if len(body) >= MAX_ERROR_BODY_BYTES:
                                break
                except httpx.HTTPError:
                    pass  # a partial error body still names the error
                outcome.append(ex.error_status(body, time.monotonic()))
                return
            decoder = attempt.decoder
            reconnects: Reconnects | None = None  # made when the stream breaks
            # Made when first read from: a tapped answer may never need it.
            reader: AsyncIterator[bytes] | None = None
            timer = _StreamTimer.start(attempt, response)
            # Only with a timer: the lane has no per-read timeout of its own.
            lane = _FastLane.open(run, attempt, response) if timer is not None else None
            fired: TimeoutPhase | None = None
            try:
                while True:
                    if lane is not None:
                        taken = await lane.run()
                        if taken is not None:
                            # By index and dropped after: no chunk held while the lane
                            # waits (a live answer would keep its first ones).
                            for i in range(len(taken)):
                                yield taken[i]
                            taken = None
                            if decoder.error is not None:
                                break
                            if lane.refused:
                                lane = None
                            continue
                    if reader is None:
                        reader = _raw_reader(response)
                    try:
                        if timer is not None:
                            data = await reader.__anext__()
                        else:
                            # No way to abort this response's connection from a timer:
                            # bound each read by the next expiry instead (slower).
                            expiry = attempt.expiry()
                            with anyio.move_on_after(_remaining(expiry)) as scope:
                                data = await reader.__anext__()
                            if scope.cancelled_caught and expiry is not None:
                                fired = expiry[1]
                                break
                    except (StopAsyncIteration, httpx.HTTPError) as exc:
                        if isinstance(exc, httpx.HTTPError):
                            logger.debug(
                                "stream from route %s broke: %s",
                                ex.route.name,
                                type(exc).__name__,
                            )
                        if decoder.finished or (timer is not None and timer.fired):
                            break
                        # A gateway keeps the answer in its log: read on from there.
                        if reconnects is None:  # from the headers of the attempt's response
                            reconnects = Reconnects(run, ex.route, response)
                        again = await self._reconnect(reconnects, decoder)
                        if again is None:
                            break
                        with anyio.CancelScope(shield=True):
                            await response.aclose()
                        response = ex.response = again
                        reader = _raw_reader(response)
                        lane = None
                        if timer is not None:
                            timer.cancel()
                            timer = _StreamTimer.start(attempt, response)
                        continue
                    chunks = attempt.feed(data, time.monotonic())
                    del data
                    for i in range(len(chunks)):
                        yield chunks[i]
                    del chunks
                    # After [DONE] the body's end is read too (it follows at once), so the
                    # connection goes back to the pool; a server that keeps streaming after
                    # [DONE] is cut by the idle timer, and a complete stream stays complete.
                    if decoder.error is not None:
                        break
            finally:
                if timer is not None:
                    timer.cancel()
                    fired = fired or timer.fired
            chunks, result = ex.ended(fired, time.monotonic())
            for chunk in chunks:
                yield chunk
            outcome.append(result)
        finally:
            if not _close_now(response):
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            if not outcome and response.status_code == 200:
                # The consumer stopped the answer: a gateway would go on generating.
                with anyio.CancelScope(shield=True):
                    await self._stop_remote(Reconnects(run, ex.route, response))

    async def _headers(
        self, ex: Exchange, expiry: tuple[float, Any] | None
    ) -> httpx.Response | None:
        """Send the exchange's request; its response once the headers arrived, or None
        when `expiry` (the headers or deadline timer) passed first."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio)
            with anyio.move_on_after(_remaining(expiry)):
                return await self._send(ex)
            return None
        # asyncio's own timeout: the same cancellation (anyio's scopes cancel through it),
        # for ~5 us less than an anyio scope per attempt (bench: scripts in the report).
        when = None if expiry is None else loop.time() + _remaining(expiry)
        try:
            async with asyncio.timeout_at(when) as timer:
                return await self._send(ex)
        except TimeoutError:
            if not timer.expired():
                raise  # not ours
            return None

    def _send(self, ex: Exchange) -> Awaitable[httpx.Response]:
        post = self._post
        if post is not None:
            # No httpx.Request: the transport takes the POST's parts (~20 us a request
            # less, and nothing of the request held while the answer streams).
            content = ex.content()
            return post(ex.url, ex.head(content), content, ex.timeouts())
        return self._send_raw(ex.request)

    async def _send_raw(self, request: httpx.Request) -> httpx.Response:
        if self._transport is not None:
            return await self._transport.handle_async_request(request)
        return await self._http.send(request, stream=True)

    async def _reconnect(
        self, reconnects: Reconnects, decoder: ChatStreamDecoder
    ) -> httpx.Response | None:
        """A response that goes on with the answer from the gateway's log, or None."""
        while (delay := reconnects.next_delay()) is not None:
            await anyio.sleep(delay)
            try:
                response = await self._send_raw(reconnects.request(decoder.last_event_id))
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                decoder.reconnected()
                return response
            await response.aclose()
            if response.status_code in GIVE_UP_STATUSES:
                return None
        return None

    async def _stop_remote(self, reconnects: Reconnects) -> None:
        request = reconnects.stop_request()
        if request is None:
            return
        try:
            with anyio.move_on_after(2.0):
                response = await self._send_raw(request)
                await response.aclose()
        except httpx.HTTPError as exc:
            logger.debug("stopping the gateway's answer failed: %s", type(exc).__name__)


class _SendPost(Protocol):
    """A transport's POST from its raw parts, without an httpx.Request (the gateway's
    upstream transport, gateway/upstream.py `LeanTransport.unbroken_send_post`): `head` is the
    header lines as `Exchange.head` makes them, `timeouts` httpx's timeout extension."""

    def __call__(
        self, url: httpx.URL, head: bytes, content: bytes, timeouts: dict[str, float | None]
    ) -> Awaitable[httpx.Response]: ...


class _Tappable(Protocol):
    """A network stream that hands body bytes to a callback as they arrive (the gateway's
    upstream connections, gateway/upstream.py)."""

    def tap(
        self, on_body: Callable[[bytes], None] | None, waiter: asyncio.Future[None] | None
    ) -> bool: ...


class _FastLane:
    """Chunks decoded in the connection's data callback and given to the run's chunk sink
    there (`AsyncStream.set_chunk_sink`), while the attempt's generator waits for the
    response to end, for a chunk the sink does not take, or for one it must not (a usage
    chunk, shaped by the stream): those come back from `run` in order, to be yielded.

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
        "pending",
        "refused",
    )

    def __init__(
        self,
        conn: _Tappable,
        attempt: Attempt,
        sink: Callable[[list[ChatCompletionChunk]], bool],
    ) -> None:
        self._conn = conn
        self._attempt = attempt
        self._sink = sink
        # A sink that also takes the chunks' upstream bytes (`set_chunk_sink`).
        self._payload_sink = sink.sink if isinstance(sink, _PayloadSink) else None
        # ... and one chunk read alone as just its bytes (the hot path of a relayed chunk).
        self._one = sink.one if isinstance(sink, _PayloadSink) else None
        self._waiter: asyncio.Future[None] | None = None
        self.pending: list[ChatCompletionChunk] = []
        self.error: Exception | None = None
        self.refused = False  # the sink refused a chunk: no lane for the rest of the attempt

    @classmethod
    def open(cls, run: AnswerRun, attempt: Attempt, response: httpx.Response) -> _FastLane | None:
        """A lane when the run has a chunk sink and the response's connection can be
        tapped, else None."""
        sink = run.chunk_sink
        conn = response.extensions.get("network_stream")
        if sink is None or not callable(getattr(conn, "tap", None)):
            return None
        return cls(cast("_Tappable", conn), attempt, sink)

    async def run(self) -> list[ChatCompletionChunk] | None:
        """Tap the connection until something must be yielded or the response ended;
        the chunks to yield, or None when it cannot be tapped now (read it as usual)."""
        waiter = asyncio.get_running_loop().create_future()
        if not self._conn.tap(self._on_body, waiter):
            return None
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._conn.tap(None, None)
            self._waiter = None
        if self.error is not None:
            raise self.error
        taken, self.pending = self.pending, []
        return taken

    def _on_body(self, data: bytes) -> None:
        pending = self.pending
        attempt = self._attempt
        try:
            one = self._one
            if one is not None and not pending:
                # The hot path: one chunk, relayed as its upstream bytes in one call (no
                # chunk list, no payload list; bench/hotpath.py).
                got = attempt.relay_one(data, time.monotonic())
                if type(got) is bytes:
                    if not one(got):
                        # Refused: yielded instead, as it was decoded (its bytes unchanged).
                        self.refused = True
                        pending.append(decode_chunk(got))
                        self._wake()
                    return
                chunks = cast("list[ChatCompletionChunk]", got)
            else:
                chunks = attempt.feed(data, time.monotonic())
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
                    pending.extend(chunks)
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
                    pending.extend(chunks[n:])
        except Exception as exc:  # raised again from `run`, in the generator
            self.error = exc
            self._wake()
            return
        if pending or self._attempt.decoder.error is not None:
            self._wake()

    def _take(self, chunks: list[ChatCompletionChunk]) -> bool:
        if self._payload_sink is not None:
            return self._payload_sink(chunks, None)
        return self._sink(chunks)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


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
        self.one = one

    def __call__(self, chunks: list[ChatCompletionChunk]) -> bool:
        return self.sink(chunks, None)


_TIMER_CONTEXT = contextvars.Context()


class _StreamTimer:
    """The body's stream timers without a timer per read: one loop timer armed at the next
    expiry. When it fires early (data came since, so the expiry moved later) it re-arms;
    when the expiry has really passed it records the phase and aborts the connection, which
    ends the pending read at once. Cancel scopes cannot span the generator's yields, and
    one per read cost ~15 us per chunk."""

    __slots__ = ("_abort", "_attempt", "_handle", "_loop", "fired")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        attempt: Attempt,
        abort: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._attempt = attempt
        self._abort = abort
        self._handle: asyncio.TimerHandle | None = None
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

    def _arm(self) -> None:
        now = time.monotonic()
        when = self._attempt.recheck_at(now)
        if when is not None:
            # In a context of its own, shared: the check reads no context variable, and
            # each handle would copy the current context (~0.3 us, a Context held).
            self._handle = self._loop.call_later(
                max(0.0, when - now), self._check, context=_TIMER_CONTEXT
            )

    def _check(self) -> None:
        expiry = self._attempt.expiry()
        if expiry is None:
            self._arm()  # nothing due yet; look again when something may be
            return
        if time.monotonic() >= expiry[0]:
            self.fired = expiry[1]
            self._abort()
        else:
            self._arm()

    def cancel(self) -> None:
        """Disarm (the attempt ended)."""
        if self._handle is not None:
            self._handle.cancel()


def _aborter(response: httpx.Response) -> Callable[[], None] | None:
    """A callable that breaks the response's connection (ending any pending read)."""
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    abort = getattr(stream, "abort", None)
    if callable(abort):
        return abort  # type: ignore[no-any-return]  # our LeanTransport's connection
    sock = stream.get_extra_info("socket")
    if sock is None:
        return None

    def shutdown() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    return shutdown


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


# What every AsyncStream has peeked before `start()`: nothing (never appended to).
_NOT_PEEKED: list[ChatCompletionChunk] = []


class AsyncStream:
    """The chunks of one answer (async). `async for chunk in stream`, `await stream.final()`,
    `await stream.aclose()` or `async with stream`; see `Stream`."""

    # A gateway keeps one per live answer: no instance dict.
    __slots__ = ("_completion", "_items", "_peeked", "_run", "_shape", "_usage_due")

    def __init__(self, run: AnswerRun, items: AsyncGenerator[StreamItem, None]) -> None:
        self._run = run
        self._items = items
        self._completion: Answer | None = None
        self._shape = UsageShaper.of(run.usage_chunk)
        self._usage_due = run.usage_chunk
        self._peeked: list[ChatCompletionChunk] = _NOT_PEEKED

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._peeked:
            return self._peeked.pop()
        while True:
            try:
                chunk = await self._items.__anext__()
            except StopAsyncIteration:
                if self._completion is None:
                    self._completion = self._run.completion(time.monotonic())
                if self._usage_due:
                    self._usage_due = False
                    return self._run.final_usage_chunk()
                raise
            if not isinstance(chunk, ChatCompletionChunk):
                continue  # events go to AsyncChatStream only; a stream's run yields none
            if chunk.usage is None:
                return chunk
            shown = self._shape.step(chunk)
            if shown is not None:
                return shown

    @overload
    def set_chunk_sink(self, sink: Callable[[list[ChatCompletionChunk]], bool] | None) -> None: ...

    @overload
    def set_chunk_sink(
        self,
        sink: Callable[[list[ChatCompletionChunk], list[bytes] | None], bool],
        *,
        with_payloads: Literal[True],
        one: Callable[[bytes], bool] | None = None,
    ) -> None: ...

    def set_chunk_sink(
        self, sink: Any, *, with_payloads: bool = False, one: Callable[[bytes], bool] | None = None
    ) -> None:
        """Give content chunks (those without usage) to `sink` as they are decoded, from the
        connection's data callback, instead of through iteration: a consumer that can take
        a chunk at once (the gateway's stream log) saves a task wake-up per chunk. `sink`
        gets the chunks decoded from one read together (one or more, in order) and takes
        all of them or, returning False, none; those, and the rest of their attempt, are
        iterated as usual. Keep iterating the stream: it drives the answer, and yields
        every chunk the sink did not take, in order. Only on transports whose connections
        can be tapped (the gateway's upstream transport); elsewhere the sink is not called.

        With `with_payloads=True` the sink is called as `sink(chunks, payloads)`:
        `payloads` is the upstream's own JSON of each chunk (valid UTF-8, one line) when
        those bytes are the chunk as decoded - a read of one event that nothing changed
        (no rewrite at a resume seam, no interrupting finish hidden) - else None, and the
        chunks must be encoded. Relaying the bytes saves re-encoding every chunk.

        With `one` too, a read of one such chunk (no usage) goes to `one(payload)` alone,
        as its upstream bytes, the chunk already folded into the answer: True when taken;
        False yields the chunk instead, like a refusing `sink`. Why: no chunk list and no
        payload list per relayed chunk.
        """
        self._run.chunk_sink = (
            _PayloadSink(sink, one) if with_payloads and sink is not None else sink
        )

    async def start(self) -> httpx.Response:
        """Send the request now (before iterating) and return the response of the attempt
        that streams; also available as `response` afterwards."""
        if self._run.response is None and not self._peeked and self._completion is None:
            with contextlib.suppress(StopAsyncIteration):
                self._peeked = [await self.__anext__()]
        return self.response

    @property
    def response(self) -> httpx.Response:
        """The HTTP response of the attempt that is streaming (openai's `stream.response`;
        known once iteration started, or after `await stream.start()`)."""
        response = self._run.response
        if response is None:
            raise RuntimeError("no response yet: iterate the stream or await start() first")
        return response

    async def final(self) -> Answer:
        """Consume what is left and return the whole answer."""
        async for _ in self:
            pass
        assert self._completion is not None  # noqa: S101 - set when iteration ends
        return self._completion

    def current(self) -> Answer:
        """The answer as far as it arrived (also after `aclose()` or an error)."""
        return self._completion or self._run.completion(time.monotonic())

    async def sentences(self) -> AsyncIterator[str]:
        """The answer text of choice 0 as whole sentences (see `Stream.sentences`)."""
        splitter = SentenceSplitter()
        async for chunk in self:
            for choice in chunk.choices:
                if choice.index == 0 and choice.delta is not None and choice.delta.content:
                    for sentence in splitter.feed(choice.delta.content):
                        yield sentence
        for sentence in splitter.flush():
            yield sentence

    async def aclose(self) -> None:
        """Stop the answer and close its connection."""
        await self._items.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncTextStream:
    """The chunks of a FIM answer (async) as openai's `Completion` chunks."""

    def __init__(self, stream: AsyncStream) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[TextCompletion]:
        return self

    async def __anext__(self) -> TextCompletion:
        return text_chunk(await self._stream.__anext__())

    async def start(self) -> httpx.Response:
        """Send the request now; see `AsyncStream.start`."""
        return await self._stream.start()

    @property
    def response(self) -> httpx.Response:
        """The HTTP response of the attempt that is streaming."""
        return self._stream.response

    async def final(self) -> TextAnswer:
        """Consume what is left and return the whole answer."""
        return text_answer(await self._stream.final())

    async def aclose(self) -> None:
        """Stop the answer and close its connection."""
        await self._stream.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


AsyncStreamEvent = ChatEvent | ControlEvent | CacheEvent | DoneEvent


class AsyncChatStream:
    """Typed events of one answer (async); see `ChatStream`."""

    def __init__(self, run: AnswerRun, items: AsyncGenerator[StreamItem, None]) -> None:
        self._run = run
        self._items = items
        self._splitter = EventSplitter()
        self._completion: Answer | None = None
        self._events = self._generate()

    async def _generate(self) -> AsyncGenerator[AsyncStreamEvent, None]:
        split = self._splitter.split
        async for item in self._items:
            if isinstance(item, ChatCompletionChunk):
                for event in split(item):
                    yield event
            else:
                yield item
        self._completion = self._run.completion(time.monotonic())
        yield DoneEvent(self._completion)

    def __aiter__(self) -> AsyncIterator[AsyncStreamEvent]:
        return self._events

    async def final(self) -> Answer:
        """Consume what is left and return the whole answer."""
        async for _ in self._events:
            pass
        assert self._completion is not None  # noqa: S101 - set when the events end
        return self._completion

    async def text(self) -> AsyncIterator[str]:
        """Only the answer text of choice 0, as it arrives."""
        async for event in self._events:
            if isinstance(event, TextEvent) and event.index == 0:
                yield event.text

    async def aclose(self) -> None:
        """Stop the answer and close its connection."""
        await self._events.aclose()
        await self._items.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _AsyncResource:
    """A group of endpoints; `with_raw_response` / `with_streaming_response` as in openai."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @property
    def with_raw_response(self) -> Any:
        """The same methods; awaiting one gives an `APIResponse` (`.parse()`, `.headers`)."""
        return _AsyncRaw(self, streaming=False)

    @property
    def with_streaming_response(self) -> Any:
        """The same methods, each an `async with` giving an `AsyncAPIResponse`."""
        return _AsyncRaw(self, streaming=True)


class _AsyncRaw:
    def __init__(self, resource: _AsyncResource, *, streaming: bool) -> None:
        self._resource = resource
        self._streaming = streaming

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._resource, name)

        async def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            token = RAW.start()
            try:
                value = await method(*args, **kwargs)
            finally:
                noted = RAW.stop(token)
            if isinstance(value, AsyncStream | AsyncTextStream):
                stream = value
                await stream.start()
                return value, (lambda: stream.response, stream.aclose)
            return value, (noted, None)

        async def raw(*args: Any, **kwargs: Any) -> APIResponse[Any]:
            value, (response, _) = await run(args, kwargs)
            return APIResponse(value, response)

        @contextlib.asynccontextmanager
        async def streaming(*args: Any, **kwargs: Any) -> AsyncIterator[AsyncAPIResponse[Any]]:
            value, (response, close) = await run(args, kwargs)
            result = AsyncAPIResponse(value, response, close)
            try:
                yield result
            finally:
                await result.close()

        return streaming if self._streaming else raw


class _AsyncCompletions(_AsyncResource):
    @overload
    async def create(
        self, *, model: str, messages: Iterable[Any], stream: Literal[False] = False, **params: Any
    ) -> Answer: ...

    @overload
    async def create(
        self, *, model: str, messages: Iterable[Any], stream: Literal[True], **params: Any
    ) -> AsyncStream: ...

    async def create(
        self, *, model: str, messages: Iterable[Any], stream: bool = False, **params: Any
    ) -> Answer | AsyncStream:
        """Create a chat completion; see `Client.chat.completions.create`."""
        run, items = self._client._start(model, messages, params, stream=stream, events=False)
        result = AsyncStream(run, items)
        if stream:
            return result
        answer = await result.final()
        RAW.note(run)
        return answer

    async def resume(
        self, *, partial: ChatCompletion, model: str, messages: Iterable[Any], **params: Any
    ) -> AsyncStream:
        """Continue an answer cut short: `partial` is what was already shown (for instance
        folded from a stream log); the stream yields only the rest, through the same
        resume mechanism as a broken stream (DeepSeek prefix completion...). The final
        answer (`await stream.final()`) is the whole one, `partial` included.

        Args:
            partial: the answer so far, as `ChunkAccumulator.completion()` gives it.
            model, messages, params: the original request, as for `create`.
        """
        run, items = self._client._start(
            model, messages, params, stream=True, events=False, partial=partial
        )
        return AsyncStream(run, items)


class _AsyncTextCompletions(_AsyncResource):
    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: str,
        suffix: str | None = None,
        stream: Literal[False] = False,
        **params: Any,
    ) -> TextAnswer: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: str,
        suffix: str | None = None,
        stream: Literal[True],
        **params: Any,
    ) -> AsyncTextStream: ...

    async def create(
        self,
        *,
        model: str,
        prompt: str,
        suffix: str | None = None,
        stream: bool = False,
        **params: Any,
    ) -> TextAnswer | AsyncTextStream:
        """A FIM completion; see `Client.completions.create`."""
        run, items = self._client._start(
            model,
            fim_messages(prompt),
            {**params, "suffix": suffix},
            stream=stream,
            events=False,
            endpoint="fim",
        )
        result = AsyncTextStream(AsyncStream(run, items))
        if stream:
            return result
        answer = await result.final()
        RAW.note(run)
        return answer


class _AsyncChat:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self.completions = _AsyncCompletions(client)

    def stream(self, *, model: str, messages: Iterable[Any], **params: Any) -> AsyncChatStream:
        """Stream an answer as typed events; same parameters as `completions.create`."""
        run, items = self._client._start(model, messages, params, stream=True, events=True)
        return AsyncChatStream(run, items)


class _ModelsPager:
    """`client.models.list()` of the async client: await it for the page, or `async for`
    over the models (as openai's AsyncPaginator)."""

    def __init__(self, fetch: Callable[[], Awaitable[ModelsPage]]) -> None:
        self._fetch = fetch

    def __await__(self) -> Generator[Any, None, ModelsPage]:
        return self._fetch().__await__()

    async def __aiter__(self) -> AsyncIterator[Model]:
        for model in await self._fetch():
            yield model


class _AsyncModels(_AsyncResource):
    def list(self) -> _ModelsPager:
        """`GET /models`: await it for the page (`.data`), or `async for` the models."""

        async def fetch() -> ModelsPage:
            data, response = await self._client._get_json("/models")
            RAW.note(response)
            return models_page(data)

        return _ModelsPager(fetch)

    async def retrieve(self, model: str) -> Model:
        """`GET /models/{model}`: one model (a 404 raises `NotFoundError`)."""
        data, response = await self._client._get_json(f"/models/{quote(model, safe='')}")
        RAW.note(response)
        return one_model(data)
