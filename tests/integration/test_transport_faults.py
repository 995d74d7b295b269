"""The official `openai` SDK through `unbroken.HTTPTransport` against the same hostile
servers as `Client` (tests/integration/test_client_faults.py): every healing fault ends in
the whole answer, byte-identical, with the fault seen to fire; the rest end in the SDK's own
error classes. The SDK never sees a break."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import unbroken
from tests.integration.test_client_faults import FAILING, FAST_RETRY, HEALING, MESSAGES, TIMEOUTS
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

CONFIG = MockConfig(seed=11)


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer(CONFIG) as server:
        yield server


# The SDK is typed for httpx2 clients but takes httpx ones (its own check says so): the
# clients are typed Any here.


def sdk(upstream: MockServer, **options: Any) -> Any:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("timeouts", TIMEOUTS)
    transport = unbroken.HTTPTransport(seed=1, **options)
    return openai.OpenAI(
        api_key="sk-test",
        base_url=upstream.url,
        max_retries=0,
        http_client=httpx.Client(transport=transport),  # type: ignore[arg-type]  # see above
    )


def async_sdk(upstream: MockServer) -> Any:
    transport = unbroken.AsyncHTTPTransport(seed=1, retry=FAST_RETRY, timeouts=TIMEOUTS)
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url=upstream.url,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport),  # type: ignore[arg-type]  # see above
    )


def _key(spec: str, model: str, flavour: str) -> dict[str, str]:
    return {"X-Mock-Fault": spec, "X-Mock-Fault-Key": f"transport-{flavour}:{model}:{spec}"}


def _fault_kinds(spec: str) -> list[str]:
    return [part.split()[0] for part in spec.split(";")]


def _requests(upstream: MockServer, key: str) -> list[dict[str, Any]]:
    return [e for e in upstream.log(1000) if e.get("fault_key") == key]


@pytest.mark.parametrize(("spec", "model"), HEALING)
def test_sdk_through_the_transport_heals(upstream: MockServer, spec: str, model: str) -> None:
    """Each healing fault ends, for the official SDK, in the fault-free answer exactly."""
    reasoning, content = answer_text(model, MESSAGES, config=CONFIG)
    headers = _key(spec, model, "sync")
    with sdk(upstream) as client:
        texts, thoughts, finishes = [], [], []
        for chunk in client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers=headers
        ):
            for choice in chunk.choices:
                texts.append(choice.delta.content or "")
                thoughts.append(getattr(choice.delta, "reasoning_content", None) or "")
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
    assert "".join(texts) == content
    assert "".join(thoughts) == reasoning
    assert finishes == ["stop"]
    seen = _requests(upstream, headers["X-Mock-Fault-Key"])
    if spec != "none":  # the fault fired: the header got through the transport
        fired = {kind for entry in seen for kind in entry.get("faults") or ()}
        assert fired & set(_fault_kinds(spec)), (spec, seen)


@pytest.mark.parametrize(("spec", "model"), HEALING[:12])
def test_sdk_non_stream_through_the_transport_heals(
    upstream: MockServer, spec: str, model: str
) -> None:
    """A non-streamed request heals too (the flow streams it upstream)."""
    _, content = answer_text(model, MESSAGES, config=CONFIG)
    with sdk(upstream) as client:
        completion = client.chat.completions.create(
            model=model, messages=MESSAGES, extra_headers=_key(spec, model, "json")
        )
    assert completion.choices[0].message.content == content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0


@pytest.mark.anyio
@pytest.mark.parametrize(("spec", "model"), HEALING[::3])
async def test_async_sdk_through_the_transport_heals(
    upstream: MockServer, spec: str, model: str
) -> None:
    """AsyncOpenAI through AsyncHTTPTransport heals the same faults."""
    _, content = answer_text(model, MESSAGES, config=CONFIG)
    async with async_sdk(upstream) as client:
        stream = await client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers=_key(spec, model, "async")
        )
        texts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(texts) == content


SDK_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    402: openai.APIStatusError,
    422: openai.UnprocessableEntityError,
}


@pytest.mark.parametrize(("spec", "error_type", "status"), FAILING)
def test_sdk_gets_its_own_error_classes(
    upstream: MockServer, spec: str, error_type: type[Exception], status: int
) -> None:
    """A status no route can help ends in the SDK's own class for it, after one attempt,
    with the upstream's body."""
    del error_type  # ours; the SDK's is in SDK_ERRORS
    headers = _key(spec, "x", "fail")
    with sdk(upstream) as client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, extra_headers=headers
        )
    assert type(info.value) is SDK_ERRORS[status]
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict)
    assert len(_requests(upstream, headers["X-Mock-Fault-Key"])) == 1


def test_persistent_reset_is_an_api_error_after_the_partial(upstream: MockServer) -> None:
    """A stream that keeps breaking gives the SDK what arrived, then an APIError: never a
    silently short answer."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    policy = unbroken.RetryPolicy(attempts=3, max_resumes=2, wait_initial_s=0.01, wait_max_s=0.02)
    shown: list[str] = []
    with sdk(upstream, retry=policy) as client:
        stream = client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_headers=_key("reset after=3", "x", "persist"),
        )
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                shown.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(shown)
    assert content.startswith("".join(shown))
    assert "truncated" in str(info.value).lower() or "ended" in str(info.value).lower()


def test_hanging_upstream_is_an_sdk_timeout(upstream: MockServer) -> None:
    """An upstream that never answers is the SDK's APITimeoutError, within its timeout."""
    with sdk(upstream) as client, pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            timeout=0.3,
            extra_headers=_key("hang", "x", "hang"),
        )


def test_other_requests_pass_through(upstream: MockServer) -> None:
    """Models and balance go to the server unchanged."""
    with sdk(upstream) as client:
        assert [m.id for m in client.models.list()] == ["deepseek-chat", "deepseek-reasoner"]
        balance = client.get("/user/balance", cast_to=httpx.Response)
    assert balance.json()["is_available"] is True


def test_configured_routes_serve_whatever_url_the_sdk_uses(upstream: MockServer) -> None:
    """With routes, the transport falls back across them; the SDK's URL is not used."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=CONFIG)
    dead = unbroken.Route("dead", "http://127.0.0.1:9", api_key="sk")
    live = unbroken.Route("live", upstream.url, api_key="sk-test")
    transport = unbroken.HTTPTransport(routes=[dead, live], retry=FAST_RETRY)
    client: Any = openai.OpenAI(
        api_key="ignored",
        base_url="http://example.invalid/v1",
        max_retries=0,
        http_client=httpx.Client(transport=transport),  # type: ignore[arg-type]  # see sdk()
    )
    with client:
        completion = client.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert completion.choices[0].message.content == content
    meta = completion.model_extra["unbroken"] if completion.model_extra else {}
    assert meta["route"] == "live"
    assert meta["fallbacks"] == 1


@pytest.mark.parametrize(("spec", "model"), HEALING[8:14])
def test_openais_own_http_client_type_works_too(
    upstream: MockServer, spec: str, model: str
) -> None:
    """openai.DefaultHttpxClient (httpx2 in openai >= 3) takes the transport as well."""
    _, content = answer_text(model, MESSAGES, config=CONFIG)
    transport = unbroken.HTTPTransport(seed=1, retry=FAST_RETRY, timeouts=TIMEOUTS)
    client: Any = openai.OpenAI(
        api_key="sk-test",
        base_url=upstream.url,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=transport),  # type: ignore[arg-type]  # ours is an httpx transport; it serves httpx2 requests too
    )
    with client:
        stream = client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers=_key(spec, model, "httpx2")
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
        assert [m.id for m in client.models.list()] == ["deepseek-chat", "deepseek-reasoner"]
