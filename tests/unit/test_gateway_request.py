"""Reading chat bodies: what passes through untouched, what the gateway takes out
(`fallbacks`, `stream`), and the token estimate used by tokens-per-minute limits."""

from __future__ import annotations

import json

import pytest

from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import parse_chat_request

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
