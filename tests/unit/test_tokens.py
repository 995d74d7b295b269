"""Unit tests of core.tokens: token estimates and usage arithmetic."""

from __future__ import annotations

import json
import unicodedata

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken import Client
from unbroken.core.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    add_usage,
    estimate_prompt_tokens,
    estimate_tokens,
    estimate_usage,
    max_tokens_of,
)
from unbroken.core.wire import CompletionTokensDetails, PromptTokensDetails, Usage


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 1),  # 0.3 rounds up
        ("abcdefghij", 3),  # 10 ASCII characters: 3.0
        ("abcdefghijk", 4),  # 3.3
        ("你好", 2),  # CJK: 0.6 each
        ("한국어", 2),  # Hangul: 1.8
        ("\uf900\uf901", 2),  # compatibility ideographs
        ("\uff01\uff01\uff01\uff01\uff01", 3),  # full-width forms: 3.0
        ("\u2e80", 1),  # first CJK radical
        ("\u2e7f", 1),  # just before the CJK range: 1 token
        ("é", 1),
        ("🚀🚀", 2),  # emoji: 1 each
        ("a你", 1),  # 0.3 + 0.6
        ("𠀀𠀁𠀂𠀃𠀄", 3),  # CJK extension B: 0.6 each
        ("é" + "a" * 30, 10),  # 1 + 9.0 exactly, no float drift
    ],
)
def test_estimate_tokens(text: str, tokens: int) -> None:
    """ASCII counts 0.3, CJK and wide characters 0.6, others 1 per character, rounded up."""
    assert estimate_tokens(text) == tokens


# The oracle, from Unicode's own character names (not from the code's ranges): characters
# DeepSeek's "Chinese" rate is about, and letters of alphabetic scripts that it is not.
WIDE_NAMES = (
    "CJK UNIFIED IDEOGRAPH",
    "CJK COMPATIBILITY IDEOGRAPH",
    "HANGUL SYLLABLE",
    "FULLWIDTH ",
    "HIRAGANA LETTER",
    "KATAKANA LETTER",
    "CJK RADICAL",
    "KANGXI RADICAL",
)
OTHER_NAMES = ("LATIN ", "GREEK ", "CYRILLIC ", "ARABIC ", "HEBREW ", "DEVANAGARI ", "THAI ")


def tenths(char: str) -> int | None:
    """Tenths of a token of one character by the documented rule, or None when the names
    say nothing clear about it."""
    if ord(char) < 0x80:
        return 3
    name = unicodedata.name(char, "")
    if name.startswith(WIDE_NAMES):
        return 6
    if name.startswith(OTHER_NAMES) or unicodedata.category(char) == "So":
        return 10  # accented and other-script letters, symbols and emoji
    return None


CLEAR = st.characters(codec="utf-8").filter(lambda c: tenths(c) is not None)


SAMPLES = "a你한Ａ🚀é𠀀ひカΩжא"


def test_each_class_costs_what_the_names_say() -> None:
    """Ten of a character cost its tenths exactly (the oracle sees every class)."""
    assert [tenths(c) for c in SAMPLES] == [3, 6, 6, 6, 10, 10, 6, 6, 6, 10, 10, 10]
    assert [estimate_tokens(c * 10) for c in SAMPLES] == [tenths(c) for c in SAMPLES]


@given(st.text(CLEAR, max_size=200), st.text(max_size=200))
def test_estimate_is_exact_and_subadditive(a: str, b: str) -> None:
    """Property: the estimate is exact in tenths by Unicode's names, monotone, and
    subadditive over concatenation."""
    exact = sum(tenths(c) or 0 for c in a)
    assert estimate_tokens(a) == -(-exact // 10)
    whole = estimate_tokens(a + b)
    assert max(estimate_tokens(a), estimate_tokens(b)) <= whole
    assert whole <= estimate_tokens(a) + estimate_tokens(b)


def test_estimate_prompt_tokens_adds_framing_per_message() -> None:
    """Each message costs its text plus a few framing tokens."""
    assert estimate_prompt_tokens([]) == 0
    assert estimate_prompt_tokens(["abcdefghij", ""]) == 3 + 2 * MESSAGE_OVERHEAD_TOKENS


def test_estimate_usage_without_reasoning() -> None:
    """An estimated usage counts the whole prompt as a cache miss and has no reasoning detail."""
    assert estimate_usage(12, "abcdefghij") == Usage(
        prompt_tokens=12,
        completion_tokens=3,
        total_tokens=15,
        prompt_cache_hit_tokens=0,
        prompt_cache_miss_tokens=12,
        completion_tokens_details=None,
    )


def test_estimate_usage_with_reasoning() -> None:
    """Reasoning tokens are part of the completion and reported in the details."""
    usage = estimate_usage(1, "你好", "abcdefghij")
    assert (usage.completion_tokens, usage.total_tokens, usage.reasoning_tokens) == (5, 6, 3)


def test_add_usage_with_none() -> None:
    """None counts as nothing: the other record is returned as is."""
    u = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert add_usage(None, None) is None
    assert add_usage(u, None) is u
    assert add_usage(None, u) is u


def test_add_usage_sums_every_field() -> None:
    """Counts add field by field; an optional field missing on one side counts as 0."""
    a = Usage(
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        prompt_cache_hit_tokens=4,
        prompt_cache_miss_tokens=6,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=4),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=2),
    )
    b = Usage(prompt_tokens=20, completion_tokens=7, total_tokens=27, prompt_cache_miss_tokens=20)
    assert add_usage(a, b) == Usage(
        prompt_tokens=30,
        completion_tokens=12,
        total_tokens=42,
        prompt_cache_hit_tokens=4,
        prompt_cache_miss_tokens=26,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=4),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=2),
    )
    assert add_usage(b, a) == add_usage(a, b)


def test_add_usage_keeps_absent_fields_absent() -> None:
    """Fields neither record has stay None instead of becoming 0."""
    a = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    total = add_usage(a, a)
    assert total == Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4)
    assert total is not None
    assert total.prompt_cache_hit_tokens is None
    assert total.prompt_tokens_details is None
    assert total.completion_tokens_details is None


@pytest.mark.parametrize(
    ("body", "cap"),
    [
        ({"max_tokens": 60}, 60),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 5, "max_completion_tokens": 9}, 5),
        ({"max_tokens": None, "max_completion_tokens": 9}, 9),
        ({"max_tokens": True}, None),
        ({"max_tokens": 0}, None),
        ({"max_tokens": "60"}, None),
        ({}, None),
    ],
)
def test_max_tokens_of(body: dict[str, object], cap: int | None) -> None:
    assert max_tokens_of(body) == cap


def test_estimated_usage_never_exceeds_max_tokens() -> None:
    """271 characters of English estimate to 82 tokens; with max_tokens 60 the server
    cannot have billed more than 60, so neither does the estimate."""
    text = ("The quick brown fox jumps over the lazy dog. " * 7)[:271]
    assert estimate_tokens(text) == 82
    capped = estimate_usage(10, text, max_tokens=60)
    assert (capped.completion_tokens, capped.total_tokens) == (60, 70)
    both = estimate_usage(10, text, "r" * 300, max_tokens=60)
    assert both.completion_tokens == 60
    assert both.completion_tokens_details is not None
    assert both.completion_tokens_details.reasoning_tokens == 60
    assert estimate_usage(10, "short", max_tokens=60).completion_tokens == 2


def test_a_server_without_usage_is_billed_at_most_max_tokens() -> None:
    """A stream with no usage (llama.cpp's server sends none) ends at max_tokens: the
    client's estimate of what was billed stays within max_tokens."""
    text = ("The quick brown fox jumps over the lazy dog. " * 7)[:271]
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    chunks = [
        {
            "id": "l",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}],
        }
        for p in pieces
    ]
    chunks.append(
        {
            "id": "l",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        }
    )
    blob = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    blob += b"data: [DONE]\n\n"

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=httpx.ByteStream(blob)
        )

    http = httpx.Client(transport=httpx.MockTransport(upstream))
    with Client(api_key="sk", http_client=http, dialect="none") as client:
        done = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "go"}], max_tokens=60
        )
    http.close()
    assert done.choices[0].message.content == text
    assert done.usage is not None
    assert done.usage.completion_tokens == 60
    assert done.unbroken is not None
    assert done.unbroken.usage_estimated
    assert done.unbroken.answer_usage is not None
    assert done.unbroken.answer_usage.completion_tokens <= 60


def _per_character(text: str) -> int:
    """The rule a character at a time, with the ranges of the module's docstring."""
    total = 0
    for char in text:
        code = ord(char)
        if code < 0x80:
            total += 3
        elif (
            0x2E80 <= code <= 0x9FFF
            or 0xAC00 <= code <= 0xD7AF
            or 0xF900 <= code <= 0xFAFF
            or 0xFF00 <= code <= 0xFFEF
            or 0x1AFF0 <= code <= 0x1B16F
            or 0x20000 <= code <= 0x3FFFF
        ):
            total += 6
        else:
            total += 10
    return -(-total // 10)


EDGES = "\x7f\x80\u2e7f\u2e80\u9fff\ua000\uabff\uac00\ud7af\ud7b0\ud800\udfff\uf8ff\uf900"
EDGES += "\ufaff\ufb00\ufeff\uff00\uffef\ufff0\U0001afef\U0001aff0\U0001b16f\U0001b170"
EDGES += "\U0001ffff\U00020000\U0003ffff\U00040000\U0010ffff"


@given(st.text(st.characters(codec=None, exclude_categories=()), max_size=300))
def test_estimate_counts_each_class_as_the_rule_says(text: str) -> None:
    """Property: the classes counted at once are the rule's, a character at a time (the
    ranges' edges and lone surrogates included)."""
    assert estimate_tokens(text) == _per_character(text)
    assert estimate_tokens(text + EDGES) == _per_character(text + EDGES)
