"""What the clients hand back besides chunks: OpenAI's usage chunk, FIM results, the SSE
bytes of an answer (for the transports and `iter_lines`), and openai's raw-response
wrappers (`with_raw_response`, `with_streaming_response`). No I/O of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar, Token
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from unbroken.core.wire import (
    Answer,
    ChatCompletion,
    ChatCompletionChunk,
    Model,
    ModelsPage,
    TextAnswer,
    TextChoice,
    TextCompletion,
)
from unbroken.errors import InvalidRequestError, UpstreamError

__all__ = [
    "RAW",
    "APIResponse",
    "AsyncAPIResponse",
    "RawCalls",
    "UsageShaper",
    "fim_messages",
    "models_page",
    "one_model",
    "sse_event",
    "text_answer",
    "text_chunk",
]

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


class UsageShaper:
    """Shapes where usage shows in a stream.

    Upstreams differ: DeepSeek puts the usage on the last chunk that has choices; OpenAI
    and vLLM, with `include_usage`, send one more chunk with `choices: []`. The consumer
    gets OpenAI's shape when it asked for `include_usage` (usage only on one last chunk
    with no choices, carrying the billed usage of every attempt), and otherwise never a
    chunk without choices (code that reads `chunk.choices[0]` must not break).
    """

    __slots__ = ("_wanted",)

    def __init__(self, wanted: bool) -> None:
        self._wanted = wanted

    @classmethod
    def of(cls, wanted: bool) -> UsageShaper:
        """The shaper for `wanted`, shared (it keeps nothing else)."""
        return _SHAPERS[wanted]

    def step(self, chunk: ChatCompletionChunk) -> ChatCompletionChunk | None:
        """The chunk to show for `chunk` (None: skip it)."""
        if chunk.usage is None:
            return chunk
        if not chunk.choices:
            return None  # made again at the end, with the billed usage, if wanted
        if self._wanted:
            return msgspec.structs.replace(chunk, usage=None)
        return chunk

    @property
    def wanted(self) -> bool:
        """The consumer asked for the usage chunk."""
        return self._wanted


_SHAPERS = {wanted: UsageShaper(wanted) for wanted in (False, True)}


def text_chunk(chunk: ChatCompletionChunk) -> TextCompletion:
    """A chat chunk of a FIM answer as the `text_completion` chunk openai yields."""
    return TextCompletion(
        id=chunk.id,
        created=chunk.created,
        model=chunk.model,
        system_fingerprint=chunk.system_fingerprint,
        choices=[
            TextChoice(
                index=c.index,
                text=(c.delta.content or "") if c.delta is not None else "",
                finish_reason=c.finish_reason,
            )
            for c in chunk.choices
        ],
        usage=chunk.usage,
    )


def text_answer(answer: Answer) -> TextAnswer:
    """A folded FIM answer as openai's `Completion` (with the `unbroken` meta)."""
    return TextAnswer(
        id=answer.id,
        created=answer.created,
        model=answer.model,
        system_fingerprint=answer.system_fingerprint,
        choices=[
            TextChoice(index=c.index, text=c.message.content or "", finish_reason=c.finish_reason)
            for c in answer.choices
        ],
        usage=answer.usage,
        unbroken=answer.unbroken,
    )


_encode = msgspec.json.Encoder().encode


def sse_event(item: ChatCompletionChunk | TextCompletion | ChatCompletion) -> bytes:
    """One `data:` event of an OpenAI-format stream."""
    return b"data: " + _encode(item) + b"\n\n"


class RawCalls:
    """Runs an endpoint method and finds the HTTP response behind its result (for
    `with_raw_response`): the endpoints `note` it in a context variable, so it works for
    threads and tasks alike."""

    def __init__(self) -> None:
        self._noted: ContextVar[list[Any] | None] = ContextVar("unbroken_raw", default=None)

    def start(self) -> Token[list[Any] | None]:
        """Begin collecting; pass the token to `stop`."""
        return self._noted.set([])

    def stop(self, token: Token[list[Any] | None]) -> Callable[[], httpx.Response | None]:
        """End collecting; the getter of the last noted response."""
        noted = self._noted.get() or []
        self._noted.reset(token)
        return lambda: _response_of(noted[-1]) if noted else None

    def note(self, source: Any) -> None:
        """The endpoints call this with the response (or the run that has it)."""
        noted = self._noted.get()
        if noted is not None:
            noted.append(source)


def _response_of(source: Any) -> httpx.Response | None:
    if isinstance(source, httpx.Response):
        return source
    response = getattr(source, "response", None)
    return response if isinstance(response, httpx.Response) else None


RAW = RawCalls()


def models_page(data: Any) -> ModelsPage:
    """The page of a `GET /models` body.

    Raises:
        UpstreamError: the body is not a list of models.
    """
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise UpstreamError("the models endpoint did not return a list")
    return ModelsPage(data=[one_model(item) for item in items])


def one_model(data: Any) -> Model:
    """The model of a `GET /models/{id}` body.

    Raises:
        UpstreamError: the body is not a model object.
    """
    try:
        return msgspec.convert(data, Model)
    except msgspec.ValidationError as exc:
        raise UpstreamError(f"the models endpoint sent something else than a model: {exc}") from exc


def fim_messages(prompt: object) -> list[dict[str, Any]]:
    """The chat-shaped request the flow plans a FIM answer as (see `_driver.fim_body`).

    Raises:
        InvalidRequestError: the prompt is not a string.
    """
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}")
    return [{"role": "user", "content": prompt}]


class _ResponseView:
    """openai's accessors of the HTTP response behind a result."""

    def __init__(self, response: Callable[[], httpx.Response | None]) -> None:
        self._response = response

    @property
    def http_response(self) -> httpx.Response:
        """The last attempt's `httpx.Response` (an answer may take several)."""
        response = self._response()
        if response is None:
            raise RuntimeError("no HTTP response yet: the request has not been sent")
        return response

    @property
    def headers(self) -> httpx.Headers:
        """The response headers."""
        return self.http_response.headers

    @property
    def status_code(self) -> int:
        """The HTTP status (200 once an answer was delivered)."""
        return self.http_response.status_code

    @property
    def request_id(self) -> str | None:
        """The upstream's `x-request-id`, if it sent one."""
        request_id = self.http_response.headers.get("x-request-id")
        return None if request_id is None else str(request_id)

    @property
    def url(self) -> httpx.URL:
        """The URL of the last attempt."""
        return self.http_response.request.url

    @property
    def method(self) -> str:
        """The HTTP method of the last attempt."""
        return self.http_response.request.method


class APIResponse(_ResponseView, Generic[T]):
    """A result with its HTTP response (openai's `APIResponse` / `LegacyAPIResponse`):
    `parse()` gives the result; `headers`, `status_code`, `request_id`, `http_response`
    describe the last attempt. For a stream, `iter_lines()` gives its SSE lines. Use it as
    a context manager to close a stream that is not read to the end."""

    def __init__(
        self,
        value: T,
        response: Callable[[], httpx.Response | None],
        close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(response)
        self._value = value
        self._close = close

    def parse(self) -> T:
        """The result: the completion, the stream, the models page..."""
        return self._value

    def iter_lines(self) -> Iterator[str]:
        """The result as the lines of an OpenAI-format body (SSE for a stream)."""
        value: Any = self._value
        if isinstance(value, msgspec.Struct):
            yield _encode(value).decode()
            return
        for item in value:
            yield "data: " + _encode(item).decode()
            yield ""
        yield "data: [DONE]"
        yield ""

    def iter_text(self) -> Iterator[str]:
        """The body as text, line by line with line ends."""
        for line in self.iter_lines():
            yield line + "\n"

    def iter_bytes(self) -> Iterator[bytes]:
        """The body as bytes."""
        for text in self.iter_text():
            yield text.encode()

    def read(self) -> bytes:
        """The whole body."""
        return b"".join(self.iter_bytes())

    def close(self) -> None:
        """Close the stream behind it, if any."""
        if self._close is not None:
            self._close()

    def __enter__(self) -> APIResponse[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAPIResponse(_ResponseView, Generic[T]):
    """The async `APIResponse` (openai's `AsyncAPIResponse`): `await parse()`, and
    `async with` to close a stream that is not read to the end."""

    def __init__(
        self,
        value: T,
        response: Callable[[], httpx.Response | None],
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(response)
        self._value = value
        self._close = close

    async def parse(self) -> T:
        """The result: the completion, the stream, the models page..."""
        return self._value

    async def iter_lines(self) -> AsyncIterator[str]:
        """The result as the lines of an OpenAI-format body (SSE for a stream)."""
        value: Any = self._value
        if isinstance(value, msgspec.Struct):
            yield _encode(value).decode()
            return
        async for item in value:
            yield "data: " + _encode(item).decode()
            yield ""
        yield "data: [DONE]"
        yield ""

    async def close(self) -> None:
        """Close the stream behind it, if any."""
        if self._close is not None:
            await self._close()

    async def __aenter__(self) -> AsyncAPIResponse[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
