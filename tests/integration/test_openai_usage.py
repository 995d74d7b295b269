"""Everyday openai-python usage, run unchanged against `unbroken.Client`, the official SDK
through `unbroken.HTTPTransport`, and the official SDK alone (sync); `AsyncClient` and
`AsyncOpenAI` through `AsyncHTTPTransport` (async). Each case is written once, as a user of
the `openai` package would write it; only the constructor and the module the error classes
come from (`lib`: `unbroken` or `openai`) differ per row.

The mock sends OpenAI's usage chunk (`MockConfig.usage_chunk`), as OpenAI-compatible
servers do; cases that need resilience (a fault to heal) are skipped on the SDK alone.
"""

from __future__ import annotations

import json
import types
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

import unbroken
from tests.support import free_port
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=23, usage_chunk=True)
MODEL = "deepseek-chat"
MESSAGES = [{"role": "user", "content": "Tell me how streams survive."}]
PROMPT = "def fib(a):"
SUFFIX = "    return fib(a - 1) + fib(a - 2)"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get current temperature for a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country e.g. Paris"}
            },
            "required": ["location"],
            "additionalProperties": False,
        },
    },
}


@dataclass
class Env:
    """What a case may know about the server: its base URL and the expected texts."""

    base: str
    mock: MockServer
    text: str
    fim: str


Make = Callable[..., Any]
SyncCase = Callable[[Make, types.ModuleType, Env], None]
AsyncCase = Callable[[Make, types.ModuleType, Env], Awaitable[None]]
SYNC: dict[str, tuple[SyncCase, bool]] = {}
ASYNC: dict[str, tuple[AsyncCase, bool]] = {}


def case(*, resilience: bool = False) -> Callable[[SyncCase], SyncCase]:
    def register(fn: SyncCase) -> SyncCase:
        SYNC[fn.__name__] = (fn, resilience)
        return fn

    return register


def acase(*, resilience: bool = False) -> Callable[[AsyncCase], AsyncCase]:
    def register(fn: AsyncCase) -> AsyncCase:
        ASYNC[fn.__name__] = (fn, resilience)
        return fn

    return register


def fault(spec: str, key: str) -> dict[str, str]:
    return {"X-Mock-Fault": spec, "X-Mock-Fault-Key": key}


def healed(env: Env, kind: str) -> None:
    """The fault really fired, and every resume sent the answer's own text as its prefix."""
    stats = env.mock.stats()
    assert stats["faults"].get(kind, 0) >= 1, stats["faults"]
    assert stats["prefix_mismatches"] == 0


# -- sync cases ----------------------------------------------------------------------------


@case()
def create(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == env.text
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


@case()
def stream(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == env.text


@case()
def stream_in_with_block(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    parts = []
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as s:
        for chunk in s:
            parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(parts) == env.text


@case()
def include_usage(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


@case()
def dumps(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.model_dump()["choices"][0]["message"]["content"] == env.text
    assert json.loads(completion.model_dump_json())["id"] == completion.id
    assert completion.to_dict()["object"] == "chat.completion"
    assert json.loads(completion.to_json())["usage"]["total_tokens"] > 0
    chunk = next(iter(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)))
    assert chunk.model_dump()["object"] == "chat.completion.chunk"
    assert json.loads(chunk.to_json())["choices"][0]["index"] == 0


@case()
def models(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    ids = [model.id for model in client.models.list()]
    assert "deepseek-chat" in ids
    assert client.models.list().data[0].id == ids[0]
    assert client.models.retrieve("deepseek-reasoner").id == "deepseek-reasoner"


@case()
def attributes(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    assert client.api_key == "sk-test"
    assert str(client.base_url).rstrip("/") == env.base
    assert client.max_retries == 1


@case()
def with_options(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make().with_options(timeout=30.0, max_retries=0)
    assert client.max_retries == 0
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == env.text


@case()
def raw_response(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert raw.headers["content-type"].startswith(("text/event-stream", "application/json"))
    assert raw.parse().choices[0].message.content == env.text
    page = client.models.with_raw_response.list()
    assert page.status_code == 200


@case()
def streaming_response(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, stream=True
    ) as response:
        assert response.status_code == 200
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == env.text


@case()
def stream_response(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    s = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert s.response.status_code == 200
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == env.text


@case()
def extras(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make(default_headers={"X-Trace": "t1"})
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        extra_headers={"X-Other": "o"},
        extra_query={"trace": "1"},
        extra_body={"temperature": 0.5},
    )
    assert completion.choices[0].message.content == env.text


@case()
def rate_limit_error(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    caught = None
    try:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=fault("429", "rl")
        )
    except lib.RateLimitError as error:  # as code written for openai catches it
        caught = error
    assert caught is not None
    assert caught.status_code == 429
    assert isinstance(caught, lib.APIStatusError)
    assert isinstance(caught.body, dict)
    assert hasattr(caught, "request_id")


@case()
def status_errors(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    with pytest.raises(lib.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(lib.AuthenticationError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=fault("401", "auth")
        )
    assert info.value.status_code == 401
    with pytest.raises(lib.BadRequestError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


@case()
def connection_error(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make(base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(lib.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)


@case()
def timeout_error(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    with pytest.raises(lib.APITimeoutError):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, timeout=0.3, extra_headers=fault("hang", "hang")
        )


@case()
def timeout_is_per_read(make: Make, lib: types.ModuleType, env: Env) -> None:
    # 40 ms between tokens, 25+ tokens: the answer takes longer than `timeout`, each
    # wait does not: openai's timeout limits each read, not the whole answer.
    client = make()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        timeout=0.8,
        extra_headers={"X-Mock-Token-Ms": "40"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == env.text


@case()
def tools(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[WEATHER_TOOL],
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "location" in json.loads(call.function.arguments)
    assert completion.choices[0].finish_reason == "tool_calls"


@case()
def json_mode(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Answer in json, e.g. {"answer": "..."}'}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


@case()
def fim(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = client.completions.create(model=MODEL, prompt=PROMPT, suffix=SUFFIX)
    assert completion.choices[0].text == env.fim
    assert completion.usage.completion_tokens > 0


@case()
def fim_stream(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    text = ""
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, suffix=SUFFIX, stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
    assert text == env.fim


@case(resilience=True)
def heals_a_reset(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    text = ""
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers=fault("reset after=6 times=1", "r"),
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == env.text
    healed(env, "reset")


@case(resilience=True)
def heals_a_stall(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        timeout=1.0,
        extra_headers=fault("stall after=5 keepalive=1 times=1", "s"),
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == env.text
    healed(env, "stall")


@case()
def heals_503s(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers=fault("503 times=1", "503")
    )
    assert completion.choices[0].message.content == env.text
    healed(env, "503")


@case(resilience=True)
def heals_a_broken_fim(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    text = ""
    for chunk in client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        suffix=SUFFIX,
        stream=True,
        extra_headers=fault("close after=4 times=1", "fim"),
    ):
        if chunk.choices:
            text += chunk.choices[0].text
    assert text == env.fim
    healed(env, "close")


# -- async cases ---------------------------------------------------------------------------


@acase()
async def async_create_and_stream(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == env.text
    text = ""
    async for chunk in await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            assert chunk.usage.total_tokens > 0
    assert text == env.text


@acase()
async def async_models(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    page = await client.models.list()
    assert [m.id async for m in client.models.list()] == [m.id for m in page.data]
    assert (await client.models.retrieve("deepseek-chat")).id == "deepseek-chat"


@acase()
async def async_raw_and_streaming_response(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert raw.parse().choices[0].message.content == env.text
    async with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, stream=True
    ) as response:
        assert response.status_code == 200
        stream = await response.parse()
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == env.text


@acase()
async def async_errors(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    with pytest.raises(lib.RateLimitError):
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=fault("429", "arl")
        )
    with pytest.raises(lib.NotFoundError):
        await client.models.retrieve("no-such-model")


@acase()
async def async_fim(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    completion = await client.completions.create(model=MODEL, prompt=PROMPT, suffix=SUFFIX)
    assert completion.choices[0].text == env.fim


@acase(resilience=True)
async def async_heals_a_reset(make: Make, lib: types.ModuleType, env: Env) -> None:
    client = make()
    text = ""
    async for chunk in await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers=fault("reset after=6 times=1", "ar"),
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == env.text
    healed(env, "reset")


# -- rows ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with MockServer(CONFIG) as mock:
        # The oracle of FIM is the mock's own answer to a plain request.
        fim = httpx.post(
            f"{mock.url}/beta/completions",
            json={"model": MODEL, "prompt": PROMPT, "suffix": SUFFIX},
            headers={"Authorization": "Bearer sk-test"},
        ).json()["choices"][0]["text"]
        _, text = answer_text(MODEL, MESSAGES, config=CONFIG)
        yield Env(f"{mock.url}/beta", mock, text, fim)


def _kwargs(env: Env, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("base_url", env.base)
    kwargs.setdefault("max_retries", 1)
    return {"api_key": "sk-test", **kwargs}


def _client(env: Env, made: list[Any]) -> Make:
    def make(**kw: Any) -> Any:
        made.append(unbroken.Client(**_kwargs(env, kw)))
        return made[-1]

    return make


def _sdk_with_transport(env: Env, made: list[Any]) -> Make:
    def make(**kw: Any) -> Any:
        http = httpx.Client(transport=unbroken.HTTPTransport(max_retries=1))
        made.append(openai.OpenAI(**_kwargs(env, kw), http_client=http))  # type: ignore[arg-type]  # typed for httpx2, takes httpx
        return made[-1]

    return make


def _sdk(env: Env, made: list[Any]) -> Make:
    def make(**kw: Any) -> Any:
        made.append(openai.OpenAI(**_kwargs(env, kw)))
        return made[-1]

    return make


def _async_client(env: Env, made: list[Any]) -> Make:
    def make(**kw: Any) -> Any:
        made.append(unbroken.AsyncClient(**_kwargs(env, kw)))
        return made[-1]

    return make


def _async_sdk_with_transport(env: Env, made: list[Any]) -> Make:
    def make(**kw: Any) -> Any:
        http = httpx.AsyncClient(transport=unbroken.AsyncHTTPTransport(max_retries=1))
        made.append(openai.AsyncOpenAI(**_kwargs(env, kw), http_client=http))  # type: ignore[arg-type]  # typed for httpx2, takes httpx
        return made[-1]

    return make


def _async_sdk(env: Env, made: list[Any]) -> Make:
    def make(**kw: Any) -> Any:
        made.append(openai.AsyncOpenAI(**_kwargs(env, kw)))
        return made[-1]

    return make


Row = tuple[Callable[[Env, list[Any]], Make], types.ModuleType]
SYNC_ROWS: dict[str, Row] = {
    "Client": (_client, unbroken),
    "openai+HTTPTransport": (_sdk_with_transport, openai),
    "openai": (_sdk, openai),
}
ASYNC_ROWS: dict[str, Row] = {
    "AsyncClient": (_async_client, unbroken),
    "AsyncOpenAI+AsyncHTTPTransport": (_async_sdk_with_transport, openai),
    "AsyncOpenAI": (_async_sdk, openai),
}


@pytest.mark.parametrize("row", list(SYNC_ROWS))
@pytest.mark.parametrize("name", list(SYNC))
def test_sync_usage(env: Env, row: str, name: str) -> None:
    """The same openai-style code works on each sync client."""
    fn, resilience = SYNC[name]
    if resilience and row == "openai":
        pytest.skip("needs resilience: the official SDK alone cannot heal this fault")
    env.mock.reset()  # fault budgets (times=1) start afresh for each row
    made: list[Any] = []
    factory, lib = SYNC_ROWS[row]
    try:
        fn(factory(env, made), lib, env)
    finally:
        for client in made:
            client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("row", list(ASYNC_ROWS))
@pytest.mark.parametrize("name", list(ASYNC))
async def test_async_usage(env: Env, row: str, name: str) -> None:
    """The same openai-style async code works on each async client."""
    fn, resilience = ASYNC[name]
    if resilience and row == "AsyncOpenAI":
        pytest.skip("needs resilience: the official SDK alone cannot heal this fault")
    env.mock.reset()
    made: list[Any] = []
    factory, lib = ASYNC_ROWS[row]
    try:
        await fn(factory(env, made), lib, env)
    finally:
        for client in made:
            await client.close()
