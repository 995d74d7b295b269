"""The answer cache's pure half: request keys, what may be stored, and how a hit replays.

No I/O and no clock: the gateway and the clients look entries up in a store and pass the
time in. Imports the standard library, msgspec and core siblings only.

Theory of operation
-------------------
* **Key.** Two requests share an entry only when everything that shapes the answer is
  equal: model, messages, tools, `response_format`, sampling parameters, `max_tokens` and
  seed. Fields that do not shape it (`stream`, `stream_options`, `user`, our own
  `unbroken` options) are left out, and a parameter given at the API's default value
  counts as absent, so `temperature=1` and no temperature are one entry.
* **What is stored.** An entry is the answer's own chunks, in order, each as the JSON the
  gateway relayed: a hit replays as a stream, reasoning included, never as one aggregated
  chunk. Only answers that ended with `finish_reason: stop` on every choice are stored
  (tool calls by opt-in), and never a degraded one (an answer served by a route of another
  model, or one that broke and could not be healed): caching an apology poisons every
  later hit.
* **Marking.** A replayed chunk carries `"unbroken": {"cache": "hit"}` (or `"stale"` when
  it stands in for an upstream that is down), and the replay opens with an SSE comment that
  says the same, so a consumer can tell a cached answer from a fresh one in the stream
  itself, not only in a header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from unbroken.errors import ConfigError

__all__ = [
    "CACHE_KEY_VERSION",
    "CacheStatus",
    "CachedAnswer",
    "RenderedReplay",
    "cache_key",
    "decode_entry",
    "encode_entry",
    "frames_due",
    "is_storable",
    "mark_chunk",
    "render_replay",
    "replay_batches",
    "replay_comment",
]

CacheStatus = Literal["hit", "stale"]

# Bumped when the normalization changes, so old entries are never matched by new rules.
CACHE_KEY_VERSION = "v1"

# Request fields that shape the answer (OpenAI and DeepSeek chat completions).
_KEY_FIELDS = (
    "model",
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "n",
    "thinking",
    "reasoning_effort",
)
# API defaults (DeepSeek's and OpenAI's agree): a field set to its default is left out.
_DEFAULTS: Mapping[str, object] = {
    "temperature": 1,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "n": 1,
    "logprobs": False,
    "parallel_tool_calls": True,
}
# Message fields that shape the answer; anything else (ids, metadata) is left out.
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "prefix")


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: message[k] for k in _MESSAGE_FIELDS if message.get(k) is not None}
    content = out.get("content")
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" for p in content
    ):
        # A list of text parts is the same prompt as their concatenation.
        out["content"] = "".join(str(p.get("text", "")) for p in content)
    return out


def cache_key(body: Mapping[str, Any]) -> str:
    """The cache key of a chat completion request body.

    Args:
        body: the request as sent (a JSON object).

    Returns:
        `v1:` and the SHA-256 (hex) of the canonical JSON of the fields that shape the
        answer; equal for requests that differ only in fields that do not.
    """
    norm: dict[str, Any] = {}
    for name in _KEY_FIELDS:
        value = body.get(name)
        if value is None or (name in _DEFAULTS and value == _DEFAULTS[name]):
            continue
        if name == "messages" and isinstance(value, list):
            value = [_message(m) if isinstance(m, Mapping) else m for m in value]
        norm[name] = value
    canonical = json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{CACHE_KEY_VERSION}:{digest}"


def is_storable(
    finish_reasons: Sequence[str | None],
    *,
    degraded: bool = False,
    tool_calls_ok: bool = False,
) -> bool:
    """Whether an answer may be cached.

    Args:
        finish_reasons: the finish reason of each choice.
        degraded: the answer came from a route of another model, or a fault was not healed.
        tool_calls_ok: tool-call answers may be stored (opt-in).

    Returns:
        True when every choice ended with `stop` (or `tool_calls` when allowed) and the
        answer is not degraded.
    """
    if degraded or not finish_reasons:
        return False
    allowed = ("stop", "tool_calls") if tool_calls_ok else ("stop",)
    return all(reason in allowed for reason in finish_reasons)


class CachedAnswer(msgspec.Struct, frozen=True):
    """One cache entry.

    Attributes:
        model: the model that produced it.
        created: Unix time it was stored.
        chunks: the answer's chunks, each the JSON object the gateway relayed.
    """

    model: str
    created: float
    chunks: list[bytes]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(CachedAnswer)


def encode_entry(entry: CachedAnswer) -> bytes:
    """The stored form of an entry (msgpack)."""
    return _ENCODER.encode(entry)


def decode_entry(data: bytes) -> CachedAnswer | None:
    """An entry from its stored form; None when the bytes are not one (a corrupt or
    foreign value is a miss, never an error shown to a caller)."""
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError:
        return None


def mark_chunk(chunk: bytes, status: CacheStatus) -> bytes:
    """`chunk` (a JSON object) with `"unbroken": {"cache": status}` as its first field.

    Splices bytes rather than decoding and re-encoding, so a replay costs one
    concatenation per chunk. Chunks are stored without an `unbroken` field of their own.
    """
    return b'{"unbroken":{"cache":"' + status.encode() + b'"},' + chunk[1:]


def replay_comment(entry: CachedAnswer, status: CacheStatus, now: float) -> bytes:
    """The SSE comment a replay opens with: the cache status and the entry's age."""
    age_s = max(0.0, now - entry.created)
    return f": unbroken cache={status} age={age_s:.0f}s\n\n".encode()


class RenderedReplay(msgspec.Struct, frozen=True):
    """A replay's SSE bytes, rendered once per entry and status and then written in slices.

    Attributes:
        body: one `data:` event per chunk (marked with the status), then `data: [DONE]`.
        ends: the end offset in `body` of each of those events, in order.
    """

    body: bytes
    ends: list[int]


def render_replay(entry: CachedAnswer, status: CacheStatus) -> RenderedReplay:
    """The SSE events of a replayed entry, as one buffer (see `RenderedReplay`)."""
    frames = [b"data: " + mark_chunk(c, status) + b"\n\n" for c in entry.chunks]
    frames.append(b"data: [DONE]\n\n")
    ends = []
    end = 0
    for frame in frames:
        end += len(frame)
        ends.append(end)
    return RenderedReplay(b"".join(frames), ends)


def frames_due(elapsed_s: float, pace_s: float, n_frames: int) -> int:
    """How many of a paced replay's `n_frames` events are due `elapsed_s` after it began.

    Event i is due at `i * pace_s`, so the first goes at once; `pace_s == 0` makes every
    event due at once. A writer that wakes on a shared tick writes the events that became
    due since its last write: at most one tick late, never early.

    Raises:
        ConfigError: a negative pace.
    """
    if pace_s < 0:
        raise ConfigError(f"cache replay pace_s must be >= 0, not {pace_s}")
    if pace_s == 0:
        return n_frames
    return min(n_frames, max(0, int(elapsed_s / pace_s)) + 1)


def replay_batches(n_frames: int, pace_s: float, tick_s: float) -> list[tuple[float, int]]:
    """When to write a replay's frames: (offset in seconds, end index) pairs; at each offset
    the frames up to that end index (exclusive) are written (the SDK's paced replays).

    Frame i is due at `i * pace_s`. Frames due within the same `tick_s` are written
    together, so a paced replay costs one timer per tick, not per chunk; `pace_s == 0`
    writes everything at once.

    Raises:
        ConfigError: a negative pace or a tick that is not positive.
    """
    if pace_s < 0 or tick_s <= 0:
        raise ConfigError(
            f"cache replay pace_s must be >= 0 and tick_s > 0, not {pace_s} and {tick_s}"
        )
    if n_frames <= 0:
        return []
    if pace_s == 0:
        return [(0.0, n_frames)]
    per_tick = max(1, int(tick_s / pace_s))
    # A batch goes out when its first frame is due: its later frames arrive up to one
    # tick early, which a typing effect does not show.
    return [
        (start * pace_s, min(start + per_tick, n_frames)) for start in range(0, n_frames, per_tick)
    ]
