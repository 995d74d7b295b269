"""Which tools the mock calls: the ones a conversation asks for, as a model would judge it.

A tool is called when the last user message names it, or uses a word of its name
(`get_weather` -> "weather"), or two content words of its description. So the openai
SDK's usual example ("What's the weather like in Paris today?" with `get_weather`) gets its
call. Imports the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["wanted_tools"]

# Words that say what a function does, not what it is about: "get" in `get_weather` says
# nothing about the conversation.
_VERBS = frozenset(
    [
        "get",
        "set",
        "list",
        "fetch",
        "create",
        "update",
        "delete",
        "remove",
        "add",
        "search",
        "find",
        "make",
        "run",
        "call",
        "query",
        "lookup",
        "look",
        "send",
        "read",
        "write",
        "check",
        "compute",
        "calc",
        "calculate",
        "convert",
        "do",
        "use",
        "show",
    ]
)
# Words too common in descriptions and questions to show intent on their own.
_STOP = frozenset(
    [
        "about",
        "above",
        "after",
        "again",
        "against",
        "along",
        "also",
        "another",
        "any",
        "around",
        "because",
        "before",
        "being",
        "below",
        "between",
        "both",
        "could",
        "current",
        "currently",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "every",
        "from",
        "given",
        "have",
        "having",
        "here",
        "into",
        "itself",
        "just",
        "like",
        "more",
        "most",
        "other",
        "over",
        "same",
        "should",
        "some",
        "such",
        "than",
        "that",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "under",
        "until",
        "very",
        "what",
        "when",
        "where",
        "which",
        "while",
        "will",
        "with",
        "within",
        "without",
        "would",
        "your",
        "returns",
        "return",
        "value",
        "values",
        "result",
        "results",
        "information",
        "data",
        "based",
        "specific",
        "using",
        "user",
        "users",
        "tool",
        "function",
        "today",
        "please",
    ]
)
_WORD = re.compile(r"[a-z][a-z0-9]+")
_CJK = re.compile(r"[\u4e00-\u9fff]+")


def _name_words(name: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()
    return {w for w in _WORD.findall(spaced) if len(w) >= 3 and w not in _VERBS}


def _content_words(text: str) -> set[str]:
    words = {w for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in _STOP}
    for run in _CJK.findall(text):
        words.update(run[i : i + 2] for i in range(len(run) - 1))
    return words


def _stem(words: set[str]) -> set[str]:
    # "forecasts" asks for `get_forecast`: a plural s is dropped on both sides.
    return {w[:-1] if len(w) > 4 and w.endswith("s") else w for w in words}


def wanted_tools(text: str, tools: Sequence[Mapping[str, object]]) -> list[str]:
    """The names of the tools that `text` (the last user message) asks for, in order.

    Args:
        text: the message.
        tools: the request's tool definitions (OpenAI format).
    """
    said = _stem(_content_words(text) | set(_WORD.findall(text.lower())))
    lowered = text.lower()
    wanted = []
    for tool in tools:
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        name = str(function["name"])
        description = function.get("description")
        about = _stem(_content_words(description)) if isinstance(description, str) else set()
        if name.lower() in lowered or _stem(_name_words(name)) & said or len(about & said) >= 2:
            wanted.append(name)
    return wanted
