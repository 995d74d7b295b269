"""Events of the SSE layer, the chat layer and the control layer (retries, resumes...).

Imports msgspec and core.wire only.

These are msgspec Structs rather than frozen dataclasses: one is created per streamed chunk,
and a frozen dataclass costs ~1 us to build (object.__setattr__ per field) against ~0.1 us.
They are frozen, compare by value and have slots, which is what a frozen dataclass gives.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from unbroken.core.wire import Answer

__all__ = [
    "ChatEvent",
    "Comment",
    "ControlEvent",
    "DoneEvent",
    "FellBackEvent",
    "FinishEvent",
    "IgnoredField",
    "IncompleteEvent",
    "ReasoningEvent",
    "RestartedEvent",
    "ResumedEvent",
    "RetryingEvent",
    "RoleEvent",
    "SSEEvent",
    "SSEItem",
    "TextEvent",
    "ToolCallEvent",
    "UsageEvent",
]


class SSEEvent(msgspec.Struct, frozen=True, gc=False):
    """A dispatched server-sent event (WHATWG "dispatch the event").

    Attributes:
        data: the data buffer with its one trailing LF removed.
        event: the event type; `message` when the stream named none.
        id: the last event ID string at dispatch time (empty when never set).
    """

    data: str
    event: str = "message"
    id: str = ""


class Comment(msgspec.Struct, frozen=True, gc=False):
    """A comment line (`: keep-alive`); `text` is everything after the colon."""

    text: str


class IgnoredField(msgspec.Struct, frozen=True, gc=False):
    """A field the SSE spec ignores (unknown name). Reported so the chat layer can read the
    legacy llama.cpp `error:` line; never data."""

    name: str
    value: str


class IncompleteEvent(msgspec.Struct, frozen=True, gc=False):
    """At end of input: the block that no blank line closed. The spec discards it; it is
    reported only so that an unterminated `data: [DONE]` can be recognised."""

    data: str


SSEItem = SSEEvent | Comment | IgnoredField | IncompleteEvent


class RoleEvent(msgspec.Struct, frozen=True, gc=False):
    """A choice started; `role` is its role (once per choice)."""

    index: int
    role: str
    type: Literal["role"] = "role"


class TextEvent(msgspec.Struct, frozen=True, gc=False):
    """New answer text for choice `index`."""

    index: int
    text: str
    type: Literal["text"] = "text"


class ReasoningEvent(msgspec.Struct, frozen=True, gc=False):
    """New reasoning (chain of thought) text for choice `index`."""

    index: int
    text: str
    type: Literal["reasoning"] = "reasoning"


class ToolCallEvent(msgspec.Struct, frozen=True, gc=False):
    """A fragment of tool call `tool_index` of choice `index`.

    `id`, `name` and `call_type` are set on the fragment that first carries them;
    `arguments` is the piece of the JSON argument string this fragment adds.
    """

    index: int
    tool_index: int
    arguments: str
    id: str | None = None
    name: str | None = None
    call_type: str | None = None
    type: Literal["tool_call"] = "tool_call"


class FinishEvent(msgspec.Struct, frozen=True, gc=False):
    """Choice `index` finished with `reason` (stop, length, tool_calls, ...)."""

    index: int
    reason: str
    type: Literal["finish"] = "finish"


class UsageEvent(msgspec.Struct, frozen=True, gc=False):
    """The upstream reported token usage (`usage` is a `unbroken.core.wire.Usage`)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int | None = None
    prompt_cache_miss_tokens: int | None = None
    reasoning_tokens: int | None = None
    type: Literal["usage"] = "usage"


ChatEvent = RoleEvent | TextEvent | ReasoningEvent | ToolCallEvent | FinishEvent | UsageEvent


class RetryingEvent(msgspec.Struct, frozen=True, gc=False):
    """An attempt failed; another starts after `delay_s`. `reason` says what the wait is:
    `backoff`, `retry_after` (the server asked) or `budget` (the route's retry budget is
    spent: the retry is paced, not failed)."""

    attempt: int
    delay_s: float
    error: str
    route: str
    reason: str = "backoff"
    type: Literal["retrying"] = "retrying"


class ResumedEvent(msgspec.Struct, frozen=True, gc=False):
    """The answer broke after `offset` characters of choice `index` were shown; a
    continuation on `route` sends only the rest."""

    attempt: int
    route: str
    index: int
    offset: int
    error: str
    type: Literal["resumed"] = "resumed"


class FellBackEvent(msgspec.Struct, frozen=True, gc=False):
    """Route `from_route` failed; the answer continues on `to_route`."""

    attempt: int
    from_route: str
    to_route: str
    error: str
    type: Literal["fell_back"] = "fell_back"


class RestartedEvent(msgspec.Struct, frozen=True, gc=False):
    """The answer of choice `index` starts over: discard what was shown of it."""

    attempt: int
    index: int
    route: str
    error: str
    type: Literal["restarted"] = "restarted"


ControlEvent = RetryingEvent | ResumedEvent | FellBackEvent | RestartedEvent


class DoneEvent(msgspec.Struct, frozen=True, gc=False):
    """The answer is complete; `completion` is the whole of it (with the `unbroken` meta)."""

    completion: Answer
    type: Literal["done"] = "done"
