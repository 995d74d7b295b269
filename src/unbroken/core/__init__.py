"""The pure core of unbroken: no sockets, files, clocks, randomness or logging.

Shells (clients, gateway, stores, CLI) do the I/O, feed what they got to the core and act on
its answer. Only the standard library, msgspec, `unbroken.errors` and core siblings are
imported here (enforced by tests/unit/test_layering.py).
"""

from unbroken.core.accumulator import ChunkAccumulator, join_text
from unbroken.core.events import (
    ChatEvent,
    Comment,
    FinishEvent,
    IgnoredField,
    IncompleteEvent,
    ReasoningEvent,
    RoleEvent,
    SSEEvent,
    SSEItem,
    TextEvent,
    ToolCallEvent,
    UsageEvent,
)
from unbroken.core.sse import DEFAULT_MAX_EVENT_BYTES, SSEDecoder, encode_comment, encode_event
from unbroken.core.stream import ChatStreamDecoder, EndState, StreamEnd, classify_end, fold

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "ChatEvent",
    "ChatStreamDecoder",
    "ChunkAccumulator",
    "Comment",
    "EndState",
    "FinishEvent",
    "IgnoredField",
    "IncompleteEvent",
    "ReasoningEvent",
    "RoleEvent",
    "SSEDecoder",
    "SSEEvent",
    "SSEItem",
    "StreamEnd",
    "TextEvent",
    "ToolCallEvent",
    "UsageEvent",
    "classify_end",
    "encode_comment",
    "encode_event",
    "fold",
    "join_text",
]
