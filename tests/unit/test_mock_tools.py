"""The mock calls the tools a message asks for: by name, a word of the name, or two words
of the description; not on unrelated messages."""

from __future__ import annotations

import pytest

from unbroken.mock.tools import wanted_tools


def tool(name: str, description: str = "") -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "description": description}}


TOOLS = [
    tool("get_weather", "Get current temperature for a given location."),
    tool("searchFlights", "Find airline flights between two airports on a date."),
    tool("convert_currency", "Convert an amount of money between currencies."),
    tool("lookup_stock", "股票 实时 价格 查询"),
]


@pytest.mark.parametrize(
    ("message", "wanted"),
    [
        ("What's the weather like in Paris today?", ["get_weather"]),
        ("Call get_weather for Rome", ["get_weather"]),
        ("Any flights from Oslo to Rome tomorrow?", ["searchFlights"]),
        (
            "How much is 100 dollars in euros? Please convert the amount of money.",
            ["convert_currency"],
        ),
        ("How warm is it, and which airline flights leave from these airports?", ["searchFlights"]),
        ("请帮我查询股票的实时价格", ["lookup_stock"]),
        ("Tell me a story about a dragon.", []),
        ("Get me the current value, please.", []),
    ],
)
def test_wanted_tools(message: str, wanted: list[str]) -> None:
    """A model would call these tools for this message (literal expectations)."""
    assert wanted_tools(message, TOOLS) == wanted


def test_malformed_tools_are_skipped() -> None:
    """Tools without a function name are never called."""
    assert wanted_tools("weather", [{"type": "function"}, {"function": {"name": 3}}]) == []
