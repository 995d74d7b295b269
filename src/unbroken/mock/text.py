"""Deterministic answers of the mock DeepSeek: a pure function of the model's mode, the
conversation (without a trailing assistant prefix), the seed and the position.

An answer is a list of *pieces*, one token each, that mix English, Chinese, punctuation,
emoji and awkward characters (quotes, backslashes, U+2028, ZWJ sequences) so that multi-byte
characters cross every boundary. Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

from unbroken.mock.corpus import ANSWER_SENTENCES, REASONING_SENTENCES, draw_pieces
from unbroken.mock.tools import wanted_tools

__all__ = [
    "ECHO_PREFIX",
    "Answer",
    "PrefixMismatch",
    "ToolCallPlan",
    "canonical_messages",
    "conversation_digest",
    "generate_answer",
    "message_text",
    "split_answer",
]

# Theory of operation
# -------------------
# digest = blake2b(thinking flag, seed, canonical conversation). Two generators seeded from
# the digest draw sentences (mock.corpus) for the reasoning and for the content
# independently, so the answer's
# content does not depend on how long its reasoning is, and piece i is the same whatever the
# answer's length (a longer answer only appends). Lengths come from a third generator, or
# from the caller (`X-Mock-Tokens`). Everything downstream - stop sequences, max_tokens, the
# skip of a continuation's prefix - works on these pieces by character position, so the
# continuation of any prefix of an answer is exactly the rest of that answer. A prefix is
# first compared with the answer's own text: one that is not the start of it (a client that
# resumes with the wrong bytes) raises PrefixMismatch rather than being continued.

# A last user message that starts with this is answered with the rest of it, verbatim: a way
# for tests to make the "model" say something exact (Markdown, an XSS payload).
ECHO_PREFIX = "/echo "

_ARG_WORDS = ("北京", "Paris", "東京 🚀", "São Paulo", 'say "hi"', "a\\b", "línea\n2", "Zürich")


@dataclass(frozen=True, slots=True)
class ToolCallPlan:
    """One tool call of an answer: `arguments` is the JSON argument string in pieces (one
    token each); the first streamed fragment (id, name, empty arguments) is one more token."""

    id: str
    name: str
    arguments: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the model answers, as pieces (one token each).

    Attributes:
        reasoning: the chain of thought (thinking mode only; empty otherwise).
        content: the answer text.
        tool_calls: tool calls (then `content` is empty).
    """

    reasoning: tuple[str, ...]
    content: tuple[str, ...]
    tool_calls: tuple[ToolCallPlan, ...] = ()

    @property
    def reasoning_text(self) -> str:
        """The whole reasoning."""
        return "".join(self.reasoning)

    @property
    def content_text(self) -> str:
        """The whole answer text."""
        return "".join(self.content)

    @property
    def n_tokens(self) -> int:
        """Completion tokens: one per piece, plus one per tool call for its first fragment."""
        n_tools = sum(1 + len(call.arguments) for call in self.tool_calls)
        return len(self.reasoning) + len(self.content) + n_tools


def message_text(content: object) -> str:
    """The text of a message's `content`: a string, None (""), or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def _canonical_tool_calls(calls: object) -> list[list[str]]:
    out: list[list[str]] = []
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, Mapping):
                function = call.get("function")
                function = function if isinstance(function, Mapping) else {}
                out.append(
                    [
                        str(call.get("id", "")),
                        str(function.get("name", "")),
                        str(function.get("arguments", "")),
                    ]
                )
    return out


def canonical_messages(messages: Sequence[Mapping[str, object]]) -> list[str]:
    """One canonical JSON string per message: role, text, name, tool_call_id, tool calls.

    `reasoning_content` and `prefix` are left out: they do not change what a message says
    (DeepSeek ignores earlier reasoning outside tool use, protocol.md §1.11).
    """
    return [
        json.dumps(
            [
                str(m.get("role", "")),
                message_text(m.get("content")),
                m.get("name") if isinstance(m.get("name"), str) else None,
                m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None,
                _canonical_tool_calls(m.get("tool_calls")),
            ],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        for m in messages
    ]


def conversation_digest(thinking: bool, canonical: Sequence[str], seed: int) -> bytes:
    """The 16-byte digest an answer is drawn from (`canonical`: `canonical_messages` of the
    conversation)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"think" if thinking else b"chat")
    h.update(str(seed).encode())
    for line in canonical:
        h.update(b"\x00")
        h.update(line.encode("utf-8", "surrogatepass"))
    return h.digest()


def _rng(digest: bytes, label: bytes) -> random.Random:
    seed = int.from_bytes(hashlib.blake2b(digest + label, digest_size=8).digest(), "big")
    return random.Random(seed)  # noqa: S311 - deterministic text, not secrets


def _pieces_of(text: str, rng: random.Random, low: int, high: int) -> tuple[str, ...]:
    out = []
    i = 0
    while i < len(text):
        size = rng.randint(low, high)
        out.append(text[i : i + size])
        i += size
    return tuple(out)


def _schema_value(schema: object, rng: random.Random, depth: int) -> object:
    if not isinstance(schema, Mapping):
        return rng.choice(_ARG_WORDS)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(-50.0, 50.0), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [
            _schema_value(schema.get("items"), rng, depth + 1) for _ in range(rng.randint(1, 2))
        ]
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        if depth >= 3 or not isinstance(properties, Mapping):
            return {}
        return {str(k): _schema_value(v, rng, depth + 1) for k, v in properties.items()}
    return rng.choice(_ARG_WORDS)


def _tool_names(
    conversation: Sequence[Mapping[str, object]],
    tools: Sequence[Mapping[str, object]],
    tool_choice: object,
) -> list[str]:
    names = []
    for tool in tools:
        function = tool.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.append(str(function["name"]))
    if not names or tool_choice == "none":
        return []
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and function.get("name") in names:
            return [str(function["name"])]
    last = conversation[-1] if conversation else {}
    wanted: list[str] = []
    if last.get("role") == "user":
        wanted = wanted_tools(message_text(last.get("content")), tools)
    if not wanted and tool_choice == "required":
        wanted = names[:1]
    return wanted


def _tool_calls(
    digest: bytes, names: list[str], tools: Sequence[Mapping[str, object]]
) -> tuple[ToolCallPlan, ...]:
    schemas: dict[str, object] = {}
    for tool in tools:
        function = tool.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            schemas.setdefault(str(function["name"]), function.get("parameters"))
    calls = []
    for i, name in enumerate(names):
        rng = _rng(digest, b"tool" + str(i).encode() + name.encode())
        value = _schema_value(schemas.get(name) or {"type": "object"}, rng, 0)
        arguments = json.dumps(value, ensure_ascii=False)
        id_bytes = hashlib.blake2b(digest + name.encode(), digest_size=16).digest()
        call_id = f"call_{i}_{uuid.UUID(bytes=id_bytes)}"
        calls.append(ToolCallPlan(call_id, name, _pieces_of(arguments, rng, 1, 6)))
    return tuple(calls)


def generate_answer(
    thinking: bool,
    conversation: Sequence[Mapping[str, object]],
    seed: int,
    *,
    n_tokens: int | None = None,
    answer_tokens: tuple[int, int] = (24, 96),
    reasoning_tokens: tuple[int, int] = (32, 128),
    tools: Sequence[Mapping[str, object]] = (),
    tool_choice: object = None,
    json_mode: bool = False,
    canonical: Sequence[str] | None = None,
) -> Answer:
    """The whole answer to a conversation, before stop sequences and max_tokens.

    Args:
        thinking: thinking mode (reasoning first, then content).
        conversation: the messages, without a trailing assistant prefix.
        seed: the seed.
        n_tokens: the answer's length in tokens (reasoning + content); None draws it from
            the ranges. In thinking mode the content gets a third (rounded down).
        answer_tokens: inclusive range of the content length.
        reasoning_tokens: inclusive range of the reasoning length (thinking mode).
        tools: the request's tools; a user message naming one gets a call to it (several
            named: several calls in one turn).
        tool_choice: `none`, `auto`, `required` or a named function.
        json_mode: the content is a JSON object (`response_format` json_object).
        canonical: `canonical_messages(conversation)`, when the caller has it already.
    """
    if canonical is None:
        canonical = canonical_messages(conversation)
    digest = conversation_digest(thinking, canonical, seed)
    sizes = _rng(digest, b"len")
    if n_tokens is None:
        n_content = sizes.randint(*answer_tokens)
        n_reasoning = sizes.randint(*reasoning_tokens) if thinking else 0
    elif thinking:
        n_content = n_tokens // 3
        n_reasoning = n_tokens - n_content
    else:
        n_content, n_reasoning = n_tokens, 0
    reasoning: tuple[str, ...] = ()
    if n_reasoning:
        reasoning = draw_pieces(_rng(digest, b"think"), n_reasoning, REASONING_SENTENCES)
    names = _tool_names(conversation, tools, tool_choice) if tools else []
    if names:
        return Answer(reasoning, (), _tool_calls(digest, names, tools))
    last = conversation[-1] if conversation else {}
    said = message_text(last.get("content")) if last.get("role") == "user" else ""
    if said.startswith(ECHO_PREFIX):
        echoed = said[len(ECHO_PREFIX) :]
        return Answer(reasoning, _pieces_of(echoed, _rng(digest, b"echo"), 1, 4))
    words = draw_pieces(_rng(digest, b"say"), n_content, ANSWER_SENTENCES)
    if json_mode:
        document = {
            "answer": "".join(words[: max(1, n_content * 2 // 3)]).strip(),
            "language": ["zh", "en"],
            "tokens": n_content,
            "ok": True,
        }
        text = json.dumps(document, ensure_ascii=False, indent=1)
        return Answer(reasoning, _pieces_of(text, _rng(digest, b"json"), 1, 4))
    return Answer(reasoning, words)


def _cut(pieces: tuple[str, ...], n_chars: int) -> tuple[str, ...]:
    """The first `n_chars` characters of the pieces, still in pieces (the last maybe cut)."""
    if n_chars <= 0:
        return ()
    ends = list(accumulate(len(p) for p in pieces))
    index = bisect_right(ends, n_chars - 1)
    if index >= len(pieces):
        return pieces
    start = ends[index] - len(pieces[index])
    head = pieces[:index]
    rest = pieces[index][: n_chars - start]
    return (*head, rest) if rest else head


def _skip(pieces: tuple[str, ...], n_chars: int) -> tuple[str, ...]:
    """The pieces after the first `n_chars` characters (the first maybe cut)."""
    if n_chars <= 0:
        return pieces
    ends = list(accumulate(len(p) for p in pieces))
    index = bisect_right(ends, n_chars)
    if index >= len(pieces):
        return ()
    start = ends[index] - len(pieces[index])
    rest = pieces[index][n_chars - start :]
    return (rest, *pieces[index + 1 :]) if rest else pieces[index + 1 :]


def apply_stop(answer: Answer, stop: Sequence[str]) -> tuple[Answer, bool]:
    """Cut the content before the first stop sequence (the stop text is not included).

    Returns:
        The cut answer and whether a stop sequence was found.
    """
    if not stop or not answer.content:
        return answer, False
    text = answer.content_text
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not hits:
        return answer, False
    return Answer(answer.reasoning, _cut(answer.content, min(hits)), answer.tool_calls), True


class PrefixMismatch(ValueError):
    """A continuation's prefix is not the start of the answer it continues.

    Attributes:
        part: `content` or `reasoning`.
        at: the first character position where the prefix and the answer differ.
        n_prefix: the prefix's length in characters.
        n_answer: the length of that part of the answer.
    """

    def __init__(self, part: str, at: int, n_prefix: int, n_answer: int) -> None:
        super().__init__(
            f"the assistant prefix is not the start of the answer it continues: its {part} "
            f"differs from the answer's at character {at} (prefix {n_prefix} characters, "
            f"answer {n_answer})"
        )
        self.part = part
        self.at = at
        self.n_prefix = n_prefix
        self.n_answer = n_answer


def _check_prefix(part: str, prefix: str, text: str, *, whole: bool) -> None:
    """Raise PrefixMismatch unless `prefix` starts `text` (equals it when `whole`)."""
    if text.startswith(prefix) and (not whole or len(prefix) == len(text)):
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(prefix, text, strict=False)) if a != b),
        min(len(prefix), len(text)),
    )
    raise PrefixMismatch(part, at, len(prefix), len(text))


def split_answer(
    answer: Answer, prefix_reasoning: str | None, prefix_content: str | None
) -> Answer:
    """The rest of `answer` after a prefix, by character position, once the prefix is
    checked against the answer's own text.

    With a non-empty `prefix_content` the reasoning is taken as complete (a reasoning sent
    with it must be the whole reasoning) and the content continues after the prefix, which
    must start the content; otherwise the reasoning continues after `prefix_reasoning`,
    which must start the reasoning, and the content starts from its beginning.

    Raises:
        PrefixMismatch: the prefix is not the start of the answer (a wrong resume).
    """
    if prefix_content:
        if prefix_reasoning:
            _check_prefix("reasoning", prefix_reasoning, answer.reasoning_text, whole=True)
        _check_prefix("content", prefix_content, answer.content_text, whole=False)
        return Answer((), _skip(answer.content, len(prefix_content)), answer.tool_calls)
    _check_prefix("reasoning", prefix_reasoning or "", answer.reasoning_text, whole=False)
    skipped = _skip(answer.reasoning, len(prefix_reasoning or ""))
    return Answer(skipped, answer.content, answer.tool_calls)


def limit_answer(answer: Answer, max_tokens: int | None) -> tuple[Answer, bool]:
    """Keep at most `max_tokens` tokens (reasoning first, then content, then tool calls).

    Returns:
        The kept answer and whether anything was dropped (finish_reason `length`).
    """
    if max_tokens is None or answer.n_tokens <= max_tokens:
        return answer, False
    budget = max_tokens
    reasoning = answer.reasoning[:budget]
    budget -= len(reasoning)
    content = answer.content[:budget]
    budget -= len(content)
    calls = []
    for call in answer.tool_calls:
        if budget <= 0:
            break
        budget -= 1
        arguments = call.arguments[:budget]
        budget -= len(arguments)
        calls.append(ToolCallPlan(call.id, call.name, arguments))
    return Answer(reasoning, content, tuple(calls)), True
