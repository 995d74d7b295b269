"""httpx transports that make any httpx-based client unbreakable - the official `openai`
SDK first:

    client = openai.OpenAI(http_client=httpx.Client(transport=unbroken.HTTPTransport()))

Chat completions and FIM completions run the same flow as `Client` (retries, resume,
fallbacks, breakers, timers) and come back as one seamless SSE stream or one JSON body, so
the SDK never sees a break. Every other request passes through unchanged. Imports the
client modules, core, errors and httpx.
"""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Unpack

import httpx
import msgspec

from unbroken.client._common import AnswerRun, ClientBase, Endpoint
from unbroken.client._engine import Engine
from unbroken.client._options import ClientOptions
from unbroken.client._results import DONE, fim_messages, sse_event, text_answer, text_chunk
from unbroken.client.async_ import AsyncClient, AsyncStream
from unbroken.client.sync import Client, Stream
from unbroken.core.routes import Route
from unbroken.core.wire import ChatCompletionChunk
from unbroken.errors import (
    APIStatusError,
    ConfigError,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = ["AsyncHTTPTransport", "HTTPTransport"]

# Request headers that belong to the hop to us, or that the flow sets itself.
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "accept-encoding",
        "accept",
        "authorization",
        "content-type",
        "te",
        "upgrade",
    }
)
# Upstream response headers not passed to the SDK (they describe a body it does not get).
_DROP_RESPONSE = frozenset(
    {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}
)
# openai's SDK honours this: the flow has retried already, the SDK must not retry again.
_NO_RETRY = ("x-should-retry", "false")


@dataclass(slots=True)
class _Call:
    """A request the flow serves."""

    endpoint: Endpoint
    model: str
    messages: list[Any]
    params: dict[str, Any]
    stream: bool
    routes: list[Route] | None
    headers: dict[str, str]
    timeout: httpx.Timeout | None


def _endpoint(request: httpx.Request) -> Endpoint | None:
    if request.method != "POST":
        return None
    path = request.url.path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "fim"
    return None


def _call(request: httpx.Request, client: ClientBase, fixed_routes: bool) -> _Call | None:
    """What the flow should do for `request`, or None to pass it through."""
    endpoint = _endpoint(request)
    if endpoint is None:
        return None
    try:
        body = msgspec.json.decode(request.read())
    except msgspec.DecodeError:
        return None  # not ours to judge: the server answers it
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return None
    params = dict(body)
    model = params.pop("model")
    stream = params.pop("stream", False) is True
    if endpoint == "chat":
        messages = params.pop("messages", None)
        if not isinstance(messages, list):
            return None
    else:
        prompt = params.pop("prompt", None)
        if not isinstance(prompt, str):
            return None  # a list of prompts, token ids...: the server's business
        messages = fim_messages(prompt)
    routes = None
    if not fixed_routes:
        routes = [_route_of(request, client, endpoint)]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    timeout = request.extensions.get("timeout")
    return _Call(
        endpoint,
        model,
        messages,
        params,
        stream,
        routes,
        headers,
        httpx.Timeout(**timeout) if isinstance(timeout, dict) else None,
    )


def _route_of(request: httpx.Request, client: ClientBase, endpoint: Endpoint) -> Route:
    """The route the SDK meant: its base URL and its key."""
    url = request.url
    path = url.path.rstrip("/")
    tail = "/chat/completions" if endpoint == "chat" else "/completions"
    base = str(url.copy_with(path=path[: -len(tail)] or "/", query=None, fragment=None))
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    return Route(
        name=base.rstrip("/"),
        base_url=base,
        api_key=key.strip() if scheme.lower() == "bearer" and key.strip() else None,
        dialect=client._options.get("dialect", "auto"),
    )


def _start(client: ClientBase, call: _Call, request: httpx.Request) -> AnswerRun:
    params = dict(call.params)
    if request.url.query:
        params["extra_query"] = dict(request.url.params)
    return client._new_run(
        call.model,
        call.messages,
        params,
        stream=call.stream,
        routes=call.routes,
        endpoint=call.endpoint,
        extra_headers=call.headers,
        timeout=call.timeout,
        tighten_only=True,
    )


def _headers(run: AnswerRun, content_type: str) -> list[tuple[str, str]]:
    headers = []
    if run.response is not None:
        headers = [
            (k, v)
            for k, v in run.response.headers.items()
            if k.lower() not in _DROP_RESPONSE and k.lower() != "content-type"
        ]
    headers.append(("content-type", content_type))
    return headers


def _error_response(exc: UnbrokenError, request: httpx.Request) -> httpx.Response:
    """What the SDK gets for an answer that failed before its first chunk: the upstream's
    own status and body (so it raises its own `RateLimitError`...), or the httpx
    exception it maps to `APIConnectionError` / `APITimeoutError`."""
    if isinstance(exc, UpstreamTimeout):
        raise httpx.ReadTimeout(str(exc), request=request) from exc
    if isinstance(exc, UpstreamConnectError):
        raise httpx.ConnectError(str(exc), request=request) from exc
    status = 502
    body: Any = {"error": {"message": exc.message, "type": "upstream_error", "code": None}}
    headers = [_NO_RETRY]
    if isinstance(exc, APIStatusError) and exc.status_code:
        status = exc.status_code
        if exc.body is not None:
            body = exc.body
        if exc.response is not None and exc.response.headers.get("x-request-id"):
            headers.append(("x-request-id", exc.response.headers["x-request-id"]))
    elif isinstance(exc, UpstreamError) and exc.error_type:
        body["error"]["type"] = exc.error_type
        body["error"]["code"] = exc.error_code
    content = body.encode() if isinstance(body, str) else msgspec.json.encode(body)
    content_type = "text/plain" if isinstance(body, str) else "application/json"
    return httpx.Response(
        status, headers=[*headers, ("content-type", content_type)], content=content
    )


def _error_event(exc: UnbrokenError) -> bytes:
    """The SSE event that tells the SDK an answer failed after it started (it raises
    `APIError` with this message)."""
    error: dict[str, Any] = {"message": exc.message, "type": "upstream_error", "code": None}
    if isinstance(exc, UpstreamError):
        error["type"] = exc.error_type or "upstream_error"
        error["code"] = exc.error_code
    return b"data: " + msgspec.json.encode({"error": error}) + b"\n\n"


def _event(chunk: ChatCompletionChunk, endpoint: Endpoint) -> bytes:
    return sse_event(text_chunk(chunk) if endpoint == "fim" else chunk)


class _SSEBody(httpx.SyncByteStream):
    def __init__(self, stream: Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint = endpoint

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._stream:
                yield _event(chunk, self._endpoint)
        except UnbrokenError as exc:
            yield _error_event(exc)
            return
        yield DONE

    def close(self) -> None:
        self._stream.close()


class _AsyncSSEBody(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncStream, endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint = endpoint

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield _event(chunk, self._endpoint)
        except UnbrokenError as exc:
            yield _error_event(exc)
            return
        yield DONE

    async def aclose(self) -> None:
        await self._stream.aclose()


# openai >= 3 builds its clients on httpx2 (`openai.DefaultHttpxClient`), whose requests
# and responses are httpx2's own types: a request of another httpx-like package is turned
# into an httpx one here, and the answer back into that package's response. The package
# is found from the request's type, so none is imported or required.


def _foreign(request: Any) -> types.ModuleType | None:
    if isinstance(request, httpx.Request):
        return None
    return sys.modules[type(request).__module__.split(".")[0]]


def _from_foreign(request: Any) -> httpx.Request:
    return httpx.Request(
        request.method,
        str(request.url),
        headers=list(request.headers.raw),
        content=request.content,
        extensions=dict(request.extensions),
    )


def _to_foreign(response: httpx.Response, package: types.ModuleType) -> Any:
    body = response.stream

    class Body(package.SyncByteStream):  # type: ignore[name-defined,misc]  # the package found at run time
        def __iter__(self) -> Iterator[bytes]:
            yield from body  # type: ignore[misc]  # a sync stream here

        def close(self) -> None:
            response.close()

    return package.Response(
        response.status_code,
        headers=list(response.headers.raw),
        stream=Body(),
        extensions=dict(response.extensions),
    )


def _to_foreign_async(response: httpx.Response, package: types.ModuleType) -> Any:
    body = response.stream

    class Body(package.AsyncByteStream):  # type: ignore[name-defined,misc]  # the package found at run time
        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for part in body:  # type: ignore[union-attr]  # an async stream here
                yield part

        async def aclose(self) -> None:
            await response.aclose()

    return package.Response(
        response.status_code,
        headers=list(response.headers.raw),
        stream=Body(),
        extensions=dict(response.extensions),
    )


class HTTPTransport(httpx.BaseTransport):
    """An httpx transport that runs chat and FIM completions through unbroken's flow.

    `openai.OpenAI(http_client=httpx.Client(transport=unbroken.HTTPTransport()))` keeps
    the SDK's types and helpers and gets streams that survive 429s, 5xx, resets,
    truncation and stalls: the SDK sees one seamless SSE stream (or one JSON body).

    Without `routes` or `base_url`, each request goes where the SDK sent it, with the
    SDK's key; with them, the configured routes serve it (in order, with fallbacks). The
    SDK's `timeout` tightens our timers (each wait; it never loosens them), and an answer
    that fails before its first chunk comes back as the upstream's own error response
    marked `x-should-retry: false` (the flow has retried already). Set the SDK's
    `max_retries=0` to keep its own retries of connection errors out of the way.

    Args:
        api_key: the key for `base_url` (default: the one each request carries).
        base_url: serve every completion from here instead of the request's URL.
        transport: the httpx transport for the upstream (default: a new pool).
        **options: the options of `Client` (see `ClientOptions`).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        _no_cache(options)
        self._fixed = bool(base_url or options.get("routes"))
        self._client = Client._without_key(api_key, base_url, dict(options), transport)
        self._passthrough = self._client._transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Serve a completion with the flow; pass anything else through."""
        package = _foreign(request)
        if package is not None:  # an httpx2 client's request (openai's DefaultHttpxClient)
            request.read()
            answer: Any = self.handle_request(_from_foreign(request))
            return _to_foreign(answer, package)  # type: ignore[no-any-return]  # its Response
        call = _call(request, self._client, self._fixed)
        if call is None:
            return self._passthrough.handle_request(request)
        run = _start(self._client, call, request)
        stream = Stream(run, self._client._run(run, with_events=False))
        try:
            if not call.stream:
                answer = stream.final()
                value = text_answer(answer) if call.endpoint == "fim" else answer
                return httpx.Response(
                    200,
                    headers=_headers(run, "application/json"),
                    content=msgspec.json.encode(value),
                )
            stream.response  # noqa: B018 - runs the flow to its first chunk (or failure)
        except UnbrokenError as exc:
            stream.close()
            return _error_response(exc, request)
        return httpx.Response(
            200,
            headers=_headers(run, "text/event-stream; charset=utf-8"),
            stream=_SSEBody(stream, call.endpoint),
        )

    def close(self) -> None:
        """Close the upstream connection pool."""
        self._client.close()


class AsyncHTTPTransport(httpx.AsyncBaseTransport):
    """The async `HTTPTransport`, for `openai.AsyncOpenAI(http_client=httpx.AsyncClient(
    transport=unbroken.AsyncHTTPTransport()))`; same arguments and behaviour."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        _no_cache(options)
        self._fixed = bool(base_url or options.get("routes"))
        self._client = AsyncClient._without_key(api_key, base_url, dict(options), transport)
        self._passthrough = self._client._transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Serve a completion with the flow; pass anything else through."""
        package = _foreign(request)
        if package is not None:  # an httpx2 client's request (openai's DefaultAsyncHttpxClient)
            await request.aread()
            answer: Any = await self.handle_async_request(_from_foreign(request))
            return _to_foreign_async(answer, package)  # type: ignore[no-any-return]  # its Response
        if _endpoint(request) is not None:
            await request.aread()
        call = _call(request, self._client, self._fixed)
        if call is None:
            return await self._passthrough.handle_async_request(request)
        run = _start(self._client, call, request)
        stream = AsyncStream(run, Engine(self._client, run, with_events=False))
        try:
            if not call.stream:
                answer = await stream.final()
                value = text_answer(answer) if call.endpoint == "fim" else answer
                return httpx.Response(
                    200,
                    headers=_headers(run, "application/json"),
                    content=msgspec.json.encode(value),
                )
            await stream.start()
        except UnbrokenError as exc:
            await stream.aclose()
            return _error_response(exc, request)
        return httpx.Response(
            200,
            headers=_headers(run, "text/event-stream; charset=utf-8"),
            stream=_AsyncSSEBody(stream, call.endpoint),
        )

    async def aclose(self) -> None:
        """Close the upstream connection pool."""
        await self._client.aclose()


def _no_cache(options: Mapping[str, Any]) -> None:
    # A cached answer has no HTTP response of its own for the SDK behind the transport to
    # read; the answer cache is Client's and AsyncClient's (or the gateway's).
    if options.get("cache") is not None:
        raise ConfigError(
            "cache= is an option of Client and AsyncClient (or the gateway's [gateway.cache]), "
            "not of the httpx transports"
        )
