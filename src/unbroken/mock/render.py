"""Byte templates of the mock's answers: SSE chunks exactly as DeepSeek frames them
(protocol.md §1.5) and whole `chat.completion` bodies (§1.4).

Every chunk of a stream shares its head (`id`, `created`, `model`, fingerprint) and tail, so
they are encoded once per stream and a chunk costs two concatenations around the pre-encoded
JSON of its piece. Imports the standard library and mock siblings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from unbroken.mock.corpus import VOCABULARY
from unbroken.mock.text import Answer, ToolCallPlan

__all__ = ["FINGERPRINT", "ChunkRenderer", "Usage", "completion_body", "encode_json"]

# The fingerprint DeepSeek reported for V3.2 in 2025 (protocol.md §1.4).
FINGERPRINT = "fp_5417b77867_prod0820_fp8_kvcache"


def encode_json(value: object) -> bytes:
    """Compact JSON with raw UTF-8 (DeepSeek does not escape non-ASCII)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


_PIECE_JSON: dict[str, bytes] = {piece: encode_json(piece) for piece in VOCABULARY}


def _encode_pieces(pieces: Sequence[str]) -> list[bytes]:
    # The vocabulary is pre-encoded; pieces cut by stop sequences or a prefix are not.
    get = _PIECE_JSON.get
    return [get(p) or encode_json(p) for p in pieces]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one answer (protocol.md §1.7): prompt = hit + miss,
    total = prompt + completion, completion includes reasoning."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cache_hit_tokens: int
    thinking: bool

    def as_dict(self) -> dict[str, object]:
        """The `usage` object, fields in DeepSeek's order."""
        usage: dict[str, object] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cache_hit_tokens},
        }
        if self.thinking:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        usage["prompt_cache_hit_tokens"] = self.cache_hit_tokens
        usage["prompt_cache_miss_tokens"] = self.prompt_tokens - self.cache_hit_tokens
        return usage


class ChunkRenderer:
    """Encodes the events of one stream.

    Args:
        completion_id: the `id` of every chunk.
        created: the `created` of every chunk.
        model: the model id to echo.
        thinking: thinking-mode deltas (`reasoning_content` beside `content`).
        include_usage: `"usage":null` on every chunk but the last.
        eol: the line ending (`\\n`; faults use `\\r\\n` or `\\r`).
        data_prefix: `data: ` (a fault uses `data:`).
    """

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        *,
        thinking: bool,
        include_usage: bool,
        eol: bytes = b"\n",
        data_prefix: bytes = b"data: ",
    ) -> None:
        self._thinking = thinking
        self._head = (
            data_prefix
            + encode_json(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": FINGERPRINT,
                }
            )[:-1]
            + b',"choices":[{"index":0,"delta":'
        )
        self._end = eol + eol
        self._open_tail = (
            b',"logprobs":null,"finish_reason":null}]'
            + (b',"usage":null' if include_usage else b"")
            + b"}"
            + self._end
        )
        self._data_prefix = data_prefix

    @property
    def end_of_event(self) -> bytes:
        """The blank line that ends an event (mock/fim.py's usage chunk ends with it)."""
        return self._end

    def role(self) -> bytes:
        """The first chunk: the role and an empty text (protocol.md §1.5 observed shapes)."""
        delta = (
            b'{"role":"assistant","content":null,"reasoning_content":""}'
            if self._thinking
            else b'{"role":"assistant","content":""}'
        )
        return self._head + delta + self._open_tail

    def reasoning(self, pieces: Sequence[str]) -> list[bytes]:
        """One chunk per reasoning piece."""
        before = self._head + b'{"content":null,"reasoning_content":'
        after = b"}" + self._open_tail
        return [before + p + after for p in _encode_pieces(pieces)]

    def content(self, pieces: Sequence[str]) -> list[bytes]:
        """One chunk per content piece."""
        before = self._head + b'{"content":'
        after = (b',"reasoning_content":null}' if self._thinking else b"}") + self._open_tail
        return [before + p + after for p in _encode_pieces(pieces)]

    def tool_call(self, index: int, call: ToolCallPlan) -> list[bytes]:
        """The chunks of one tool call: id, type and name first, then argument pieces."""
        first = encode_json(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        )
        out = [self._head + first + self._open_tail]
        before = self._head + b'{"tool_calls":[{"index":%d,"function":{"arguments":' % index
        after = b"}}]}" + self._open_tail
        out.extend(before + p + after for p in _encode_pieces(call.arguments))
        return out

    def events(self, answer: Answer) -> list[bytes]:
        """Role chunk, then one chunk per token (reasoning, content, tool calls)."""
        out = [self.role()]
        if answer.reasoning:
            out += self.reasoning(answer.reasoning)
        if answer.content:
            out += self.content(answer.content)
        for index, call in enumerate(answer.tool_calls):
            out += self.tool_call(index, call)
        return out

    def final(self, finish_reason: str, usage: Usage) -> bytes:
        """The last chunk: no new text, the finish_reason and the usage."""
        delta = b'{"content":"","reasoning_content":null}' if self._thinking else b'{"content":""}'
        return (
            self._head
            + delta
            + b',"logprobs":null,"finish_reason":'
            + encode_json(finish_reason)
            + b'}],"usage":'
            + encode_json(usage.as_dict())
            + b"}"
            + self._end
        )

    def done(self) -> bytes:
        """`data: [DONE]`."""
        return self._data_prefix + b"[DONE]" + self._end

    def error(self) -> bytes:
        """A mid-stream error event (protocol.md TV21)."""
        return (
            self._data_prefix
            + b'{"error":{"message":"Internal server error","type":"server_error",'
            + b'"param":null,"code":"internal_error"}}'
            + self._end
        )

    def malformed(self) -> bytes:
        """A chunk whose JSON is cut short (then the blank line, as if the server crashed
        while encoding)."""
        return self._head + b'{"content":"\xe4\xb8\x80 broken' + self._end

    def keepalive(self) -> bytes:
        """`: keep-alive` and a blank line (protocol.md §1.8)."""
        return b": keep-alive" + self._end


def _message(answer: Answer, thinking: bool) -> dict[str, object]:
    message: dict[str, object] = {"role": "assistant", "content": answer.content_text}
    if thinking:
        message["reasoning_content"] = answer.reasoning_text
    if answer.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": "".join(call.arguments)},
            }
            for call in answer.tool_calls
        ]
    return message


def completion_body(
    completion_id: str,
    created: int,
    model: str,
    answer: Answer,
    *,
    thinking: bool,
    finish_reason: str,
    usage: Usage,
) -> bytes:
    """A whole non-streamed `chat.completion` (protocol.md §1.4)."""
    return encode_json(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": _message(answer, thinking),
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage.as_dict(),
        }
    )


def answer_message(answer: Answer) -> dict[str, object]:
    """The answer as the assistant message a client sends back next turn (for the cache)."""
    return _message(answer, thinking=False)
