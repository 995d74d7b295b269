"""AsyncClient: the asyncio/anyio SDK. The same core flow as Client, driven with httpx async;
each read is bounded by the next stream timer with an anyio cancel scope."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
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
from unbroken.client._engine import Engine, Items, _PayloadSink, _remaining
from unbroken.client._options import DEFAULT_MAX_CONNECTIONS, ClientOptions
from unbroken.client._reconnect import GIVE_UP_STATUSES, Reconnects
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
from unbroken.core.accumulator import EventSplitter, TextSource
from unbroken.core.events import ChatEvent, ControlEvent, DoneEvent, TextEvent
from unbroken.core.routes import Route
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
)
from unbroken.errors import UpstreamError

if TYPE_CHECKING:
    from unbroken.client._ws import AsyncSockets

__all__ = ["AsyncChatStream", "AsyncClient", "AsyncStream", "AsyncTextStream"]

logger = logging.getLogger(__name__)


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
    ) -> tuple[AnswerRun, Items]:
        run = self._new_run(model, messages, params, stream=stream, endpoint=endpoint)
        if partial is not None:
            # What was shown already: the flow's first attempt is then a continuation.
            for chunk in completion_to_chunks(partial):
                run.answer.feed(chunk)
        return run, self._items(
            run, events=events, paced=stream, cacheable=endpoint == "chat" and partial is None
        )

    def _items(self, run: AnswerRun, *, events: bool, paced: bool, cacheable: bool) -> Items:
        """The engine of `run`, behind the answer cache when one is set and `cacheable`."""
        items: Items = Engine(self, run, with_events=events)
        cache = self._config.cache
        if cache is not None and cacheable:
            items = acached(cache, run, items, paced=paced, events=events)
        return items

    def stream_checked(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        extra_body: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        fallbacks: Sequence[str | Route] | None = None,
        routes: Sequence[Route] | None = None,
        budget_key: str = "",
    ) -> AsyncStream:
        """`await chat.completions.create(model=..., messages=..., stream=True, ...)` with
        these options, for a caller that has checked them already (a gateway's parsed
        request: `messages` a list of objects with a role, headers strings): the same
        stream and the same request on the wire, without the public call's type checks of
        each option and message (no coroutine either: the stream is returned at once).

        Raises:
            InvalidRequestError: no messages, or `n` (in `extra_body`) is not a positive
                integer.
        """
        run = self._checked_run(
            model, messages, extra_body, extra_headers, fallbacks, routes, budget_key
        )
        return AsyncStream(run, self._items(run, events=False, paced=True, cacheable=True))

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
            # (Not exact: the transport joins it into the request's bytes at once.)
            content = ex.content(exact=False)
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


async def _given(chunk: ChatCompletionChunk) -> ChatCompletionChunk:
    return chunk


# What every AsyncStream has peeked before `start()`: nothing (never appended to).
_NOT_PEEKED: list[ChatCompletionChunk] = []


class AsyncStream:
    """The chunks of one answer (async). `async for chunk in stream`, `await stream.final()`,
    `await stream.aclose()` or `async with stream`; see `Stream`."""

    # A gateway keeps one per live answer: no instance dict.
    __slots__ = ("_completion", "_engine", "_items", "_peeked", "_run", "_shape", "_usage_due")

    def __init__(self, run: AnswerRun, items: Items) -> None:
        self._run = run
        self._items = items
        self._completion: Answer | None = None
        self._shape = UsageShaper.of(run.usage_chunk)
        self._usage_due = run.usage_chunk
        self._peeked: list[ChatCompletionChunk] = _NOT_PEEKED
        # Iterated directly, the engine shapes its chunks for this stream (`shown`, `ended`):
        # no coroutine of the stream's own around each of its steps (one frame less held by
        # a live answer, bench/sdk_request.py --memory).
        self._engine = items if type(items) is Engine and items.attach(self) else None

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self

    def __anext__(self) -> Awaitable[ChatCompletionChunk]:
        if self._peeked:
            return _given(self._peeked.pop())
        engine = self._engine
        if engine is not None:
            return engine.__anext__()  # type: ignore[return-value]  # chunks only (attach)
        return self._next()

    async def _next(self) -> ChatCompletionChunk:
        while True:
            try:
                chunk = await self._items.__anext__()
            except StopAsyncIteration:
                return self.ended()
            if not isinstance(chunk, ChatCompletionChunk):
                continue  # events go to AsyncChatStream only; a stream's run yields none
            if chunk.usage is None:
                return chunk
            shown = self.shown(chunk)
            if shown is not None:
                return shown

    def shown(self, chunk: ChatCompletionChunk) -> ChatCompletionChunk | None:
        """A chunk with usage as this stream shows it (None: not at all)."""
        return self._shape.step(chunk)

    def ended(self) -> ChatCompletionChunk:
        """The answer's items ended: OpenAI's usage chunk when due (once), else raise
        StopAsyncIteration."""
        if self._completion is None:
            self._completion = self._run.completion(time.monotonic())
        if self._usage_due:
            self._usage_due = False
            return self._run.final_usage_chunk()
        if self._engine is not None:
            self._detach()
        raise StopAsyncIteration

    def _detach(self) -> None:
        """Iterate the engine through `_next` from now on: the engine lets go of this stream,
        so the two make no reference cycle (the answer is freed by reference counting when
        the caller lets go of the stream). Nothing shows: `_next` shapes as the engine did."""
        engine = self._engine
        if engine is not None:
            self._engine = None
            engine.detach()

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
        if self._completion is not None and not self._usage_due and not self._peeked:
            return self._completion  # the items ended: nothing is left (no step taken)
        async for _ in self:
            pass
        assert self._completion is not None  # noqa: S101 - set when iteration ends
        return self._completion

    def current(self) -> Answer:
        """The answer as far as it arrived (also after `aclose()` or an error)."""
        return self._completion or self._run.completion(time.monotonic())

    def keep_text_in(self, source: TextSource) -> bool:
        """Keep no copy of the answer's text here: `source` logs every chunk this stream
        gives (to its chunk sink, and by iteration) in order, and is read back when the text
        is needed (`final`, `current`, a resume). Only while no text came: False, and
        nothing changed, after that (`ChunkAccumulator.keep_text_in`)."""
        return self._run.answer.keep_text_in(source)

    def text_template(self) -> tuple[bytes, bytes] | None:
        """The JSON around the text of the answer's plain text chunks, as the running
        attempt learned it (`ChatStreamDecoder.text_template`), or None: a consumer keeping
        those chunks' bytes (the gateway's stream log) can keep these objects for its own
        template instead of equal copies."""
        engine = self._engine
        return None if engine is None else engine.text_template()

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
        try:
            await self._items.aclose()
        finally:
            if self._engine is not None:
                self._detach()

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

    def __init__(self, run: AnswerRun, items: Items) -> None:
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
