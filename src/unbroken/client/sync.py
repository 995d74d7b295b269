"""Client: the blocking SDK. Drives core.flow with httpx; all decisions are in the core."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack, overload
from urllib.parse import quote

import httpx
import msgspec

from unbroken.client._cached import cached
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
from unbroken.core.attempt import Attempt, Timeouts
from unbroken.core.events import ChatEvent, ControlEvent, DoneEvent, TextEvent
from unbroken.core.flow import AttemptOutcome, Connect
from unbroken.core.sentences import SentenceSplitter
from unbroken.core.stream import ChatStreamDecoder
from unbroken.core.wire import (
    Answer,
    ChatCompletionChunk,
    Model,
    ModelsPage,
    TextAnswer,
    TextCompletion,
)
from unbroken.errors import TimeoutPhase, UpstreamError

if TYPE_CHECKING:
    from unbroken.client._ws import SyncSockets

__all__ = ["ChatStream", "Client", "Stream", "TextStream"]

logger = logging.getLogger(__name__)

StreamItem = ChatCompletionChunk | ControlEvent | CacheEvent


class _Watch:
    __slots__ = ("attempt", "fired", "sock")

    def __init__(self, attempt: Attempt, sock: socket.socket | None) -> None:
        self.attempt = attempt
        self.sock = sock
        self.fired: TimeoutPhase | None = None


class _Watchdog:
    """One thread per Client that enforces the stream timers of blocking reads.

    A blocked `recv` cannot be given a new timeout once httpx started reading, so when a
    timer (first token, idle, deadline) expires the watchdog shuts the socket down; the
    read returns at once and the driver reports the timer's typed error. Deadlines are
    re-read from the Attempt at each wake-up, so progress costs the reader nothing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, attempt: Attempt, sock: socket.socket | None) -> _Watch:
        watch = _Watch(attempt, sock)
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="unbroken-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return watch

    def unwatch(self, watch: _Watch) -> None:
        with self._cond:
            self._watches.discard(watch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                wake = now + 1.0
                for watch in list(self._watches):
                    expiry = watch.attempt.expiry()
                    if expiry is None:
                        continue
                    when, phase = expiry
                    if when <= now and watch.fired is None:
                        watch.fired = phase
                        self._watches.discard(watch)
                        _shutdown(watch.sock)
                    else:
                        wake = min(wake, when)
                self._cond.wait(max(0.001, wake - now))


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed: the read has returned anyway
        sock.shutdown(socket.SHUT_RDWR)


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    sock = stream.get_extra_info("socket")
    return sock if isinstance(sock, socket.socket) else None


class Client(ClientBase):
    """A blocking client for DeepSeek and any OpenAI-compatible server whose streams survive
    503s, 429s, resets, truncation, stalls and mangled SSE: it retries, resumes a broken
    answer where it stopped, and falls back to other routes, never showing a repeat or gap.

    The constructor takes what openai's does (`api_key`, `base_url`, `organization`,
    `project`, `timeout`, `max_retries`, `default_headers`, `default_query`,
    `http_client`) and unbroken's own options; see `ClientOptions` for each.

    Args:
        api_key: the upstream key; default `DEEPSEEK_API_KEY` (a missing key is an error
            at once).
        base_url: the upstream; default `DEEPSEEK_BASE_URL`, `OPENAI_BASE_URL`, then
            `https://api.deepseek.com`. A base ending in `/beta` works too.
        http_client: an `httpx.Client` to send with instead of building one.
        transport: an httpx transport for the pool this client builds, or
            `"websocket"`: chat answers go over an unbroken gateway's `/v1/chat/ws`, several
            on one connection, resumed after a dropped connection (needs the `websocket`
            extra; see docs/websocket.md). `"http"` (the default) is HTTP/SSE.
        **options: see `ClientOptions`.

    Raises:
        ConfigError: an option is unknown or malformed, or no key was found.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | Literal["http", "websocket"] | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(api_key, base_url, options)
        self._sockets: SyncSockets | None = None
        self._owns_sockets = False
        pool = transport if isinstance(transport, httpx.BaseTransport) else None
        if check_transport(transport, httpx.BaseTransport):
            self._sockets = load_sockets().SyncSockets()
            self._owns_sockets = True
        self._setup_http(http_client, pool)
        self.chat = _Chat(self)
        self.completions = _TextCompletions(self)
        self.models = _Models(self)

    @classmethod
    def _without_key(
        cls,
        api_key: str | None,
        base_url: str | None,
        options: dict[str, Any],
        transport: httpx.BaseTransport | None,
    ) -> Client:
        """A client whose requests may carry their own key (for the transports)."""
        self = cls.__new__(cls)
        ClientBase.__init__(self, api_key, base_url, options, need_key=False)
        self._sockets = None
        self._owns_sockets = False
        self._setup_http(None, transport)
        self.chat = _Chat(self)
        self.completions = _TextCompletions(self)
        self.models = _Models(self)
        return self

    def _setup_http(
        self, http_client: httpx.Client | None, transport: httpx.BaseTransport | None
    ) -> None:
        # Streams go straight to the transport: httpx's client layer (cookies, auth,
        # redirects, URL merging) has nothing to do here. A caller's http_client is used
        # as given (its send()).
        self._owns_http = http_client is None
        self._transport: httpx.BaseTransport | None = None
        if http_client is None:
            n = self._options.get("max_connections", DEFAULT_MAX_CONNECTIONS)
            self._transport = transport or httpx.HTTPTransport(
                http2=self._options.get("http2", False),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
            http_client = httpx.Client(transport=self._transport, follow_redirects=False)
        self._http = http_client
        self._watchdog = _Watchdog()

    def with_options(self, **changes: Any) -> Client:
        """A copy with some options changed (openai's `with_options`), sharing the
        connection pool: `client.with_options(timeout=5, max_retries=0).chat...`."""
        changes = dict(changes)
        http_client = changes.pop("http_client", None)
        api_key, base_url, options = self._copy_options(changes)
        copy = Client(
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

    def close(self) -> None:
        """Close the connection pool (if this client made it), the watchdog, and an
        answer cache made from a spec."""
        self._watchdog.close()
        if self._owns_http:
            self._http.close()
        if self._owns_sockets and self._sockets is not None:
            self._sockets.close()
        if self._cache_close != "none" and self._config.cache is not None:
            self._config.cache.close(store=self._cache_close == "all")

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plain endpoints -----------------------------------------------------------------

    def _get_json(self, path: str) -> tuple[Any, httpx.Response]:
        route = self._config.routes[0]
        t = self._config.timeouts
        try:
            response = self._http.get(
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

    def balance(self) -> dict[str, Any]:
        """DeepSeek's `GET /user/balance` (amounts are strings, as the API sends them)."""
        data, _ = self._get_json("/user/balance")
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
    ) -> tuple[AnswerRun, Iterator[StreamItem]]:
        run = self._new_run(model, messages, params, stream=stream, endpoint=endpoint)
        items = self._run(run, with_events=events)
        cache = self._config.cache
        if cache is not None and endpoint == "chat":
            items = cached(cache, run, items, paced=stream, events=events)
        return run, items

    def _run(self, run: AnswerRun, *, with_events: bool) -> Iterator[StreamItem]:
        # Closing or cancelling the stream lands here: the answer is recorded once.
        try:
            config = self._config
            action = run.next_action(None, time.monotonic())
            while action is not None:
                yield from run.take_chunks()
                if with_events:
                    yield from run.drain_events()
                if not isinstance(action, Connect):
                    time.sleep(action.seconds)
                    action = run.next_action(None, time.monotonic())
                    continue
                if config.limiter.active:
                    tokens = run.reserve_tokens()
                    while (wait := config.limiter.take(time.monotonic(), tokens)) > 0:
                        time.sleep(min(wait, 60.0))
                attempt = run.new_attempt(action.plan, time.monotonic())
                sockets = self._sockets
                if sockets is not None and run.endpoint == "chat" and not run.query:
                    outcome = yield from sockets.attempt(run, attempt)
                else:
                    outcome = yield from self._attempt(run, attempt)
                action = run.next_action(outcome, time.monotonic())
            yield from run.take_chunks()
        finally:
            run.close(time.monotonic())

    def _attempt(
        self, run: AnswerRun, attempt: Attempt
    ) -> Generator[ChatCompletionChunk, None, AttemptOutcome]:
        # httpx's read timeout covers the wait for headers (or the deadline, if sooner); the
        # body's timers are the watchdog's, the read timeout stays only as a backstop.
        expiry = attempt.expiry()
        first_wait = None if expiry is None else max(0.001, expiry[0] - time.monotonic())
        ex = Exchange(run, attempt, read_s=first_wait, also=OPT_IN)
        request = ex.request
        try:
            if self._transport is not None:
                response = self._transport.handle_request(request)
            else:
                response = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            return ex.failed(exc, time.monotonic())
        watch = None
        ended = False
        try:
            if not ex.streaming(response, time.monotonic()):
                body = b""
                try:
                    for part in response.iter_raw():
                        body += part
                        if len(body) >= MAX_ERROR_BODY_BYTES:
                            break
                except httpx.HTTPError:
                    pass  # a partial error body still names the error
                ended = True
                return ex.error_status(body, time.monotonic())
            run.pack_request(attempt.plan)  # not held as objects while it streams
            request.extensions["timeout"]["read"] = _backstop(run.timeouts)
            watch = self._watchdog.watch(attempt, _socket_of(response))
            decoder = attempt.decoder
            reconnects = Reconnects(run, ex.route, response)
            while True:
                try:
                    for data in response.iter_raw():
                        chunks = attempt.feed(data, time.monotonic())
                        if chunks:
                            yield from chunks
                        # After [DONE] the body's end is read too (it follows at once), so
                        # the connection goes back to the pool; a server that keeps
                        # streaming after [DONE] is cut by the idle timer.
                        if decoder.error is not None:
                            break
                except httpx.HTTPError as exc:
                    if watch.fired is None and not decoder.finished:
                        logger.debug(
                            "stream from route %s broke: %s", ex.route.name, type(exc).__name__
                        )
                if decoder.finished or watch.fired is not None:
                    break
                # A gateway keeps the answer in its log: read on from there.
                again = self._reconnect(reconnects, decoder)
                if again is None:
                    break
                response.close()
                response = ex.response = again
                self._watchdog.unwatch(watch)
                watch = self._watchdog.watch(attempt, _socket_of(response))
            fired = watch.fired
            self._watchdog.unwatch(watch)
            chunks, outcome = ex.ended(fired, time.monotonic())
            yield from chunks
            ended = True
            return outcome
        finally:
            if watch is not None:
                self._watchdog.unwatch(watch)
            response.close()
            if not ended and response.status_code == 200:
                # The consumer stopped the answer: a gateway would go on generating.
                self._stop_remote(Reconnects(run, ex.route, response))

    def _send_raw(self, request: httpx.Request) -> httpx.Response:
        if self._transport is not None:
            return self._transport.handle_request(request)
        return self._http.send(request, stream=True)

    def _reconnect(
        self, reconnects: Reconnects, decoder: ChatStreamDecoder
    ) -> httpx.Response | None:
        """A response that goes on with the answer from the gateway's log, or None."""
        while (delay := reconnects.next_delay()) is not None:
            time.sleep(delay)
            try:
                response = self._send_raw(reconnects.request(decoder.last_event_id))
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                decoder.reconnected()
                return response
            response.close()
            if response.status_code in GIVE_UP_STATUSES:
                return None
        return None

    def _stop_remote(self, reconnects: Reconnects) -> None:
        request = reconnects.stop_request()
        if request is None:
            return
        try:
            self._send_raw(request).close()
        except httpx.HTTPError as exc:
            logger.debug("stopping the gateway's answer failed: %s", type(exc).__name__)


def _backstop(t: Timeouts) -> float | None:
    limits = [x for x in (t.headers_s, t.first_token_s, t.idle_s) if x is not None]
    return max(limits) + 5.0 if limits else None


class Stream:
    """The chunks of one answer, OpenAI-shaped (`chunk.choices[0].delta.content`).

    Iterate it (each chunk once), or use it as a context manager; `close()` stops the
    answer and closes its connection at once. After the last chunk, `final()` gives the
    folded completion with billed usage, cost and the `unbroken` meta. With
    `stream_options={"include_usage": True}` the last chunk has no choices and carries the
    billed usage, as OpenAI sends it. `response` is the last attempt's HTTP response.
    """

    def __init__(self, run: AnswerRun, items: Iterator[StreamItem]) -> None:
        self._run = run
        self._items = items
        self._completion: Answer | None = None
        self._shape = UsageShaper(run.usage_chunk)
        self._usage_due = run.usage_chunk
        self._peeked: list[ChatCompletionChunk] = []

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self

    def __next__(self) -> ChatCompletionChunk:
        if self._peeked:
            return self._peeked.pop()
        while True:
            try:
                chunk = self._items.__next__()
            except StopIteration:
                if self._completion is None:
                    self._completion = self._run.completion(time.monotonic())
                if self._usage_due:
                    self._usage_due = False
                    return self._run.final_usage_chunk()
                raise
            if not isinstance(chunk, ChatCompletionChunk):
                continue  # events go to ChatStream only; a Stream's run yields none
            if chunk.usage is None:
                return chunk
            shown = self._shape.step(chunk)
            if shown is not None:
                return shown

    @property
    def response(self) -> httpx.Response:
        """The HTTP response of the attempt that is streaming (openai's `stream.response`);
        asking for it before iterating starts the request."""
        if self._run.response is None and not self._peeked and self._completion is None:
            with contextlib.suppress(StopIteration):
                self._peeked.append(self.__next__())
        response = self._run.response
        if response is None:
            raise RuntimeError("the answer ended before any response arrived")
        return response

    def final(self) -> Answer:
        """Consume what is left and return the whole answer."""
        for _ in self:
            pass
        assert self._completion is not None  # noqa: S101 - set when iteration ends
        return self._completion

    def current(self) -> Answer:
        """The answer as far as it arrived (also after `close()` or an error)."""
        return self._completion or self._run.completion(time.monotonic())

    def sentences(self) -> Iterator[str]:
        """The answer text of choice 0 as whole sentences (for text-to-speech): each ends
        at a Chinese or English sentence end; the rest comes last."""
        splitter = SentenceSplitter()
        for chunk in self:
            for choice in chunk.choices:
                if choice.index == 0 and choice.delta is not None and choice.delta.content:
                    yield from splitter.feed(choice.delta.content)
        yield from splitter.flush()

    def close(self) -> None:
        """Stop the answer and close its connection."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TextStream:
    """The chunks of a FIM answer as openai's `Completion` chunks (`chunk.choices[0].text`);
    otherwise as `Stream`."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[TextCompletion]:
        return self

    def __next__(self) -> TextCompletion:
        return text_chunk(self._stream.__next__())

    @property
    def response(self) -> httpx.Response:
        """The HTTP response of the attempt that is streaming."""
        return self._stream.response

    def final(self) -> TextAnswer:
        """Consume what is left and return the whole answer."""
        return text_answer(self._stream.final())

    def current(self) -> TextAnswer:
        """The answer as far as it arrived."""
        return text_answer(self._stream.current())

    def close(self) -> None:
        """Stop the answer and close its connection."""
        self._stream.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


StreamEvent = ChatEvent | ControlEvent | CacheEvent | DoneEvent


class ChatStream:
    """Typed events of one answer: text, reasoning, tool-call fragments, finish, usage,
    retrying, resumed, fell_back, restarted, cache (an answer replayed from the answer
    cache) and, last, done (with the whole completion).

    `final()` consumes what is left and returns the completion; `close()` stops it.
    """

    def __init__(self, run: AnswerRun, items: Iterator[StreamItem]) -> None:
        self._run = run
        self._items = items
        self._splitter = EventSplitter()
        self._completion: Answer | None = None
        self._events = self._generate()

    def _generate(self) -> Generator[StreamEvent, None, None]:
        split = self._splitter.split
        for item in self._items:
            if isinstance(item, ChatCompletionChunk):
                yield from split(item)
            else:
                yield item
        self._completion = self._run.completion(time.monotonic())
        yield DoneEvent(self._completion)

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._events

    def final(self) -> Answer:
        """Consume what is left and return the whole answer."""
        for _ in self._events:
            pass
        assert self._completion is not None  # noqa: S101 - set when the events end
        return self._completion

    def text(self) -> Iterator[str]:
        """Only the answer text of choice 0, as it arrives."""
        for event in self._events:
            if isinstance(event, TextEvent) and event.index == 0:
                yield event.text

    def close(self) -> None:
        """Stop the answer and close its connection."""
        self._events.close()
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Resource:
    """A group of endpoints; `with_raw_response` / `with_streaming_response` give the same
    methods returning an `APIResponse` (as in openai)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def with_raw_response(self) -> Any:
        """The same methods, each returning an `APIResponse` (`.parse()`, `.headers`)."""
        return _Raw(self)

    @property
    def with_streaming_response(self) -> Any:
        """The same methods, each returning an `APIResponse` to use in a `with` block."""
        return _Raw(self)


class _Raw:
    def __init__(self, resource: _Resource) -> None:
        self._resource = resource

    def __getattr__(self, name: str) -> Callable[..., APIResponse[Any]]:
        method = getattr(self._resource, name)

        def call(*args: Any, **kwargs: Any) -> APIResponse[Any]:
            token = RAW.start()
            try:
                value = method(*args, **kwargs)
            finally:
                noted = RAW.stop(token)
            if isinstance(value, Stream | TextStream):
                stream = value
                stream.response  # noqa: B018 - starts the request, so the headers are known
                return APIResponse(value, lambda: stream.response, stream.close)
            return APIResponse(value, noted)

        return call


class _Completions(_Resource):
    @overload
    def create(
        self, *, model: str, messages: Iterable[Any], stream: Literal[False] = False, **params: Any
    ) -> Answer: ...

    @overload
    def create(
        self, *, model: str, messages: Iterable[Any], stream: Literal[True], **params: Any
    ) -> Stream: ...

    def create(
        self, *, model: str, messages: Iterable[Any], stream: bool = False, **params: Any
    ) -> Answer | Stream:
        """Create a chat completion, as `openai`'s `client.chat.completions.create`.

        Every DeepSeek/OpenAI parameter is accepted by name (temperature, max_tokens,
        tools, tool_choice, response_format, stop, logprobs, seed, thinking...), plus
        `extra_headers`, `extra_body`, `extra_query`, `timeout` (openai's: each wait),
        `deadline` (seconds for the whole answer), `fallbacks` (models or routes to try
        next) and `restart` (start over when a broken answer cannot be continued).

        Returns:
            a `Stream` of chunks when `stream=True`, else the whole `Answer` (a
            ChatCompletion with the `unbroken` meta).

        Raises:
            UnbrokenError: the answer could not be delivered; `partial` holds what came.
        """
        run, items = self._client._start(model, messages, params, stream=stream, events=False)
        result = Stream(run, items)
        if stream:
            return result
        answer = result.final()
        RAW.note(run)
        return answer


class _TextCompletions(_Resource):
    @overload
    def create(
        self,
        *,
        model: str,
        prompt: str,
        suffix: str | None = None,
        stream: Literal[False] = False,
        **params: Any,
    ) -> TextAnswer: ...

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: str,
        suffix: str | None = None,
        stream: Literal[True],
        **params: Any,
    ) -> TextStream: ...

    def create(
        self,
        *,
        model: str,
        prompt: str,
        suffix: str | None = None,
        stream: bool = False,
        **params: Any,
    ) -> TextAnswer | TextStream:
        """A FIM (fill in the middle) completion, as openai's `client.completions.create`:
        the text between `prompt` and `suffix`, from DeepSeek's `/beta/completions` (or
        `/completions` on other routes). A broken completion continues from its partial
        text, like a chat answer.

        Returns:
            a `TextStream` when `stream=True`, else the whole `TextAnswer`.

        Raises:
            UnbrokenError: the answer could not be delivered; `partial` holds what came.
        """
        messages = fim_messages(prompt)
        run, items = self._client._start(
            model,
            messages,
            {**params, "suffix": suffix},
            stream=stream,
            events=False,
            endpoint="fim",
        )
        result = TextStream(Stream(run, items))
        if stream:
            return result
        answer = result.final()
        RAW.note(run)
        return answer


class _Chat:
    def __init__(self, client: Client) -> None:
        self._client = client
        self.completions = _Completions(client)

    def stream(self, *, model: str, messages: Iterable[Any], **params: Any) -> ChatStream:
        """Stream an answer as typed events (see `ChatStream`); same parameters as
        `completions.create`."""
        run, items = self._client._start(model, messages, params, stream=True, events=True)
        return ChatStream(run, items)


class _Models(_Resource):
    def list(self) -> ModelsPage:
        """`GET /models`: the models the first route serves, as a page (iterate it, or
        read `.data`)."""
        data, response = self._client._get_json("/models")
        RAW.note(response)
        return models_page(data)

    def retrieve(self, model: str) -> Model:
        """`GET /models/{model}`: one model (a 404 raises `NotFoundError`)."""
        data, response = self._client._get_json(f"/models/{quote(model, safe='')}")
        RAW.note(response)
        return one_model(data)
