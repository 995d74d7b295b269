"""Reading chat bodies: what passes through untouched, what the gateway takes out
(`fallbacks`, `stream`), and the token estimate used by tokens-per-minute limits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.core.tokens import estimate_prompt_tokens
from unbroken.gateway.app import Gateway, _Booking
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import ChatRequest, _checked_request, parse_chat_request
from unbroken.settings import GatewaySettings, LimitSettings, RouteSettings, Settings

MODELS = frozenset({"deepseek-chat", "deepseek-reasoner"})
ROUTES = frozenset({"main", "backup"})


def parse(body: dict[str, object]) -> object:
    return parse_chat_request(json.dumps(body).encode(), MODELS, ROUTES)


def test_fields_pass_through() -> None:
    """Unknown and known fields go upstream as sent; model/messages/stream/fallbacks are
    taken out."""
    request = parse_chat_request(
        json.dumps(
            {
                "model": "deepseek-chat",
                "messages": [{"role": "user", "content": "hello"}],
                "stream": True,
                "temperature": 0.2,
                "thinking": {"type": "enabled"},
                "fallbacks": ["deepseek-reasoner", "backup"],
                "max_tokens": 100,
                "tool_choice": None,
            }
        ).encode(),
        MODELS,
        ROUTES,
    )
    assert request.model == "deepseek-chat"
    assert request.stream is True
    assert request.fallbacks == ["deepseek-reasoner", "backup"]
    assert request.extra == {
        "temperature": 0.2,
        "thinking": {"type": "enabled"},
        "max_tokens": 100,
        "tool_choice": None,
    }
    assert request.estimated_tokens == 100 + 4 + 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "deepseek-chat", "messages": [{"role": "user"}], "top_p": 2}, "top_p"),
        ({"model": "deepseek-chat", "messages": [{"role": "user"}], "seed": 1.5}, "seed"),
        ({"model": "deepseek-chat", "messages": [{"role": "user"}], "tools": {}}, "tools"),
        (
            {"model": "deepseek-chat", "messages": [{"role": "user"}], "fallbacks": ["x"]},
            "fallbacks",
        ),
    ],
)
def test_wrong_values_name_the_field(body: dict[str, object], param: str) -> None:
    """A wrong value is a 400 whose param names the field."""
    with pytest.raises(GatewayError) as info:
        parse(body)
    assert info.value.status == 400
    assert info.value.param == param


# Structured bad bodies: a valid body with exactly one field made wrong, drawn from a
# literal table of (field path, bad values, the `param` the error must name). Random bytes
# almost only reach the invalid-JSON branch; these reach every check behind it.
_not_int = st.text(max_size=4) | st.booleans() | st.lists(st.integers(), max_size=2)
_not_str = st.integers() | st.booleans() | st.dictionaries(st.text(max_size=3), st.integers())
_not_bool: st.SearchStrategy[object] = st.integers() | st.text(max_size=4) | st.just([])
BAD: list[tuple[tuple[str | int, ...], st.SearchStrategy[object], str]] = [
    (("model",), _not_str | st.just(""), "model"),
    (("model",), st.sampled_from(["gpt-4", "deepseek", "main"]), "model"),
    (("messages",), _not_str | st.just([]) | st.text(max_size=5), "messages"),
    (("messages", 0), st.integers() | st.text(max_size=5) | st.none() | st.just([]), "messages[0]"),
    (("messages", 0, "role"), _not_str | st.sampled_from(["bot", "", "USER"]), "messages[0].role"),
    (
        ("messages", 0, "content"),
        st.integers() | st.booleans() | st.just({}),
        "messages[0].content",
    ),
    (("stream",), _not_bool, "stream"),
    # An integral float (100.0) is an integer in JSON Schema, and accepted; 1.5 is not.
    (
        ("max_tokens",),
        _not_int | st.integers(max_value=0) | st.floats(1, 9).filter(lambda f: not f.is_integer()),
        "max_tokens",
    ),
    (("n",), st.integers(17, 10**6) | st.integers(max_value=0) | _not_int, "n"),
    (("temperature",), st.floats(2.001, 1e9) | st.floats(-1e9, -0.001) | _not_int, "temperature"),
    (("top_p",), st.floats(1.001, 1e9) | st.floats(-1e9, -0.001), "top_p"),
    (("top_logprobs",), st.integers(21, 10**6) | st.integers(max_value=-1), "top_logprobs"),
    (("logprobs",), _not_bool, "logprobs"),
    (("tools",), _not_str | st.text(max_size=4), "tools"),
    (("stop",), st.lists(st.integers(), min_size=1, max_size=3), "stop"),
    (("stop",), st.integers() | st.booleans(), "stop"),
    (("stream_options",), st.integers() | st.text(max_size=4), "stream_options"),
    (("stream_options", "include_usage"), st.integers() | st.text(max_size=4), "stream_options"),
    (("fallbacks",), st.integers() | st.text(min_size=1, max_size=4), "fallbacks"),
    (("fallbacks",), st.lists(st.integers(), min_size=1, max_size=2), "fallbacks"),
    (("fallbacks",), st.just(["deepseek-chat"] * 9), "fallbacks"),
    (("fallbacks",), st.sampled_from([["https://evil.example"], ["gpt-4"]]), "fallbacks"),
]


def _body_with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "fallbacks": ["backup"],
    }
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def test_the_base_body_is_valid() -> None:
    """Without the mutation the body passes, so each failure below is the mutation's."""
    parse(_body_with(("user",), "u1"))


@pytest.mark.parametrize(("path", "values", "param"), BAD)
@given(data=st.data())
def test_one_wrong_field_is_named(
    path: tuple[str | int, ...], values: st.SearchStrategy[object], param: str, data: st.DataObject
) -> None:
    """A body wrong in one field is a 4xx whose `param` names that field."""
    body = _body_with(path, data.draw(values))
    with pytest.raises(GatewayError) as info:
        parse(body)
    assert info.value.status in (400, 404)
    assert info.value.param == param, (body, info.value.message)


def test_of_several_wrong_fields_the_first_in_the_body_is_named() -> None:
    """The body's fields are checked in the order they came: the error names the first."""
    base: dict[str, object] = {"model": "deepseek-chat", "messages": [{"role": "user"}]}
    for first, second in (("temperature", "max_tokens"), ("max_tokens", "temperature")):
        body = {**base, first: "x", second: "y"}
        with pytest.raises(GatewayError) as info:
            parse(body)
        assert info.value.param == first


# Values for the checked fields: valid ones, values just outside a range, wrong types,
# integral floats (turned into ints), null.
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=30),
    st.sampled_from([0.0, 1.0, 1.5, 2.0, 2.5, -2.0, -2.5, 0.5]),
    st.sampled_from(["", "x", "user", "deepseek-chat", "main"]),
    st.lists(st.sampled_from(["a", "main", "deepseek-reasoner", "nope"]), max_size=10),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["include_usage", "type"]), st.sampled_from([True, None, "x"])),
)
_FIELD_NAMES = [
    "model",
    "messages",
    "fallbacks",
    "unbroken",
    "other",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logprobs",
    "top_logprobs",
    "stream_options",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "stop",
]
_MESSAGE: st.SearchStrategy[dict[str, object]] = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "tool", "robot", 3, None]),
        "content": st.one_of(
            st.none(), st.text(max_size=5), st.just([{"text": "hi"}, 3]), st.integers(), st.just({})
        ),
        "name": st.just("n"),
    },
)


def _outcome(body: dict[str, object]) -> object:
    raw = json.dumps(body).encode()
    try:
        return parse_chat_request(raw, MODELS, ROUTES)
    except GatewayError as exc:
        return (exc.status, exc.code, exc.param, exc.message)


def _outcome_checked(body: dict[str, object]) -> object:
    try:
        return _checked_request(json.loads(json.dumps(body)), MODELS, ROUTES)
    except GatewayError as exc:
        return (exc.status, exc.code, exc.param, exc.message)


# Values each field takes, mostly valid, a few just past a bound: most bodies drawn pass
# every check or fail one.
_GOOD = {
    "fallbacks": st.sampled_from([[], ["main"]]),
    "stream": st.booleans(),
    "max_tokens": st.integers(min_value=0, max_value=99),
    "n": st.sampled_from([1, 16, 17, 2.0, None]),
    "temperature": st.sampled_from([0, 2, 0.7, 2.01, -0.01]),
    "top_p": st.sampled_from([0, 1, 1.01]),
    "presence_penalty": st.sampled_from([-2, 2, 2.01, -2.01]),
    "top_logprobs": st.sampled_from([0, 20, 21]),
    "stream_options": st.sampled_from([{"include_usage": True}, {}, {"include_usage": 1}]),
    "stop": st.sampled_from([["a"], "a", [1]]),
}
_FIELDS_DRAWN = st.dictionaries(
    st.sampled_from(_FIELD_NAMES),
    _ANY_VALUE,
    max_size=2,
)
_GOOD_FIELDS = st.fixed_dictionaries({}, optional=_GOOD)
_GOOD_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=9)}),
    min_size=1,
    max_size=2,
)


@settings(max_examples=400)
@given(
    good=_GOOD_FIELDS,
    fields=st.one_of(st.just({}), _FIELDS_DRAWN),
    messages=st.one_of(_GOOD_MESSAGES, st.lists(_MESSAGE, max_size=3), _ANY_VALUE),
    model=st.sampled_from(["deepseek-chat", "deepseek-reasoner", "gpt", "", 3]),
)
def test_the_quick_check_decides_as_the_field_checks(
    good: dict[str, object], fields: dict[str, object], messages: object, model: object
) -> None:
    """Every body gets from `parse_chat_request` (one msgspec conversion for the common
    body) what the field-by-field checks give it: the same request or the same error."""
    body: dict[str, object] = {"model": model, "messages": messages, **good, **fields}
    assert _outcome(body) == _outcome_checked(body)


def test_the_common_body_is_taken_apart_as_the_checks_do() -> None:
    """The quick path's request equals the checks' request, extra fields in order."""
    body = {
        "model": "deepseek-chat",
        "stream": True,
        "messages": [{"role": "user", "content": "hello there"}],
        "n": None,
        "temperature": 1,
        "max_completion_tokens": 7,
        "fallbacks": [],
        "zeta": 1,
        "alpha": {"b": 2},
    }
    quick = _outcome(body)
    assert quick == _outcome_checked(body)
    assert isinstance(quick, ChatRequest)
    assert list(quick.extra) == ["temperature", "max_completion_tokens", "zeta", "alpha"]
    assert quick.max_tokens == 7


def _unread(request: ChatRequest) -> bool:
    """No estimate worked out yet."""
    return request._estimate is None


CJK_PROMPT = "\u4f60\u597d\uff0c\u4e16\u754c\u3002" * 400  # wide characters: 6 tenths each


@pytest.mark.parametrize("max_tokens", [None, 50])
def test_the_estimate_is_worked_out_when_read(max_tokens: int | None) -> None:
    """Parsing leaves the prompt unestimated (a non-ASCII prompt costs a Python step per
    character); read, the estimate is what it always was, on both parsing paths."""
    body: dict[str, Any] = {
        "model": "deepseek-chat",
        "messages": [
            {"role": "system", "content": "brief"},
            {"role": "user", "content": CJK_PROMPT},
        ],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    for extra in ({}, {"fallbacks": ["backup"]}):  # the msgspec path, the checks' path
        request = parse({**body, **extra})
        assert isinstance(request, ChatRequest)
        assert _unread(request)
        expected = estimate_prompt_tokens(["brief", CJK_PROMPT]) + (max_tokens or 0)
        assert request.estimated_tokens == expected
        assert not _unread(request)
        assert request.max_tokens == max_tokens


@pytest.mark.parametrize(
    ("limits", "estimated"),
    [
        (LimitSettings(), False),
        (LimitSettings(requests_per_minute=100, concurrent_streams=5), False),
        (LimitSettings(tokens_per_minute=100_000), True),
        (LimitSettings(daily_tokens=100_000), True),
    ],
)
def test_only_token_limits_estimate_the_prompt(limits: LimitSettings, estimated: bool) -> None:
    """Admission reads the estimate (and reserves by it) only under token limits."""
    settings_ = Settings(
        gateway=GatewaySettings(routes=(RouteSettings("a", "http://127.0.0.1:9/v1"),))
    )
    gateway = Gateway(settings_)
    caller = Caller(id="k:1", name="one", limits=limits)
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": CJK_PROMPT}]}
    request = parse_chat_request(json.dumps(body).encode(), gateway.models, gateway.route_names)

    async def admit() -> Any:
        booking = await _Booking.admit(gateway, caller, request, None)
        await booking.book(None)
        return booking.admission

    admission = asyncio.run(admit())
    assert _unread(request) is not estimated
    if limits.tokens_per_minute is not None:
        reserve = request.estimated_tokens + settings_.gateway.reserve_tokens
        assert admission.tokens_level == 100_000 - reserve  # what the admission took
