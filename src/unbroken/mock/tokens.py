"""Token counting and the context cache of the mock DeepSeek (how usage numbers are made).

Prompt tokens are estimated from the text with DeepSeek's rule of thumb (protocol.md §1.7:
an ASCII character ~0.3 token, any other ~0.6), per message plus a fixed overhead, so they
add up message by message; completion tokens are exact (one per piece of the answer).
`PromptCache` remembers message-list prefixes that earlier requests persisted, for
`prompt_cache_hit_tokens`. Imports only the standard library and `mock.text`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from unbroken.mock.text import canonical_messages, message_text

__all__ = ["MESSAGE_OVERHEAD_TOKENS", "PromptCache", "message_tokens", "text_tokens"]

# Role markers and separators of the chat template; 4 is what OpenAI's cookbook counts per
# message for its own models, close enough for an estimate.
MESSAGE_OVERHEAD_TOKENS = 4


def text_tokens(text: str) -> int:
    """Estimated tokens of `text`: ceil(0.3 * ASCII chars + 0.6 * other chars)."""
    if not text:
        return 0
    n_ascii = len(text) if text.isascii() else sum(1 for c in text if c < "\x80")
    n_other = len(text) - n_ascii
    return (3 * n_ascii + 6 * n_other + 9) // 10


def message_tokens(message: Mapping[str, object]) -> int:
    """Estimated prompt tokens of one message: overhead + its text, name, tool-call id,
    tool calls (as JSON) and, on a prefix message, its reasoning_content."""
    n = MESSAGE_OVERHEAD_TOKENS + text_tokens(message_text(message.get("content")))
    for key in ("name", "tool_call_id"):
        value = message.get(key)
        if isinstance(value, str):
            n += text_tokens(value)
    calls = message.get("tool_calls")
    if calls:
        n += text_tokens(json.dumps(calls, ensure_ascii=False, separators=(",", ":")))
    reasoning = message.get("reasoning_content")
    if message.get("prefix") is True and isinstance(reasoning, str):
        n += text_tokens(reasoning)
    return n


def tools_tokens(tools: Sequence[Mapping[str, object]]) -> int:
    """Estimated prompt tokens of the tool definitions (their JSON)."""
    if not tools:
        return 0
    return text_tokens(json.dumps(list(tools), ensure_ascii=False, separators=(",", ":")))


class PromptCache:
    """The context cache on disk (protocol.md §1.13), reduced to its arithmetic.

    Each request persists the chain hash of its whole message list (the end of the user
    input) and, when its answer completed, of that list plus the answer as an assistant
    message. A later request whose messages start with a persisted list gets the tokens of
    that list (tools included) as `prompt_cache_hit_tokens`; the rest is a miss. At most
    `max_entries` lists are kept, least recently used dropped first.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, None] = OrderedDict()

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    @staticmethod
    def chain(
        model: str, tools: Sequence[Mapping[str, object]], canonical: Sequence[str]
    ) -> list[bytes]:
        """The chain hashes: element k covers the model, the tools and messages[:k+1], given
        as `canonical_messages` lines (each model has its own cache)."""
        seed = model + (json.dumps(list(tools), sort_keys=True) if tools else "")
        h = hashlib.blake2b(seed.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        out = []
        for line in canonical:
            h = hashlib.blake2b(h + line.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            out.append(h)
        return out

    def hit_tokens(self, chain: Sequence[bytes], per_message: Sequence[int], base: int) -> int:
        """Tokens served from the cache: the longest persisted prefix of the chain."""
        for k in range(len(chain) - 1, -1, -1):
            if chain[k] in self._entries:
                self._entries.move_to_end(chain[k])
                return base + sum(per_message[: k + 1])
        return 0

    def persist(self, key: bytes) -> None:
        """Remember one chain hash."""
        if self._max <= 0:
            return
        self._entries[key] = None
        self._entries.move_to_end(key)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def extend(self, last: bytes, message: Mapping[str, object]) -> bytes:
        """The chain hash after appending `message` to the list that `last` covers."""
        line = canonical_messages([message])[0]
        return hashlib.blake2b(
            last + line.encode("utf-8", "surrogatepass"), digest_size=16
        ).digest()
