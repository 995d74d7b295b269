"""unbroken: streaming chat completions from DeepSeek (and any OpenAI-compatible server)
that arrive whole. Public SDK surface: re-exports only, no logic."""

from unbroken.client import (
    AsyncChatStream,
    AsyncClient,
    AsyncStream,
    ChatStream,
    Client,
    RateLimit,
    Stream,
)
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Timeouts
from unbroken.core.backoff import RetryBudget, RetryPolicy
from unbroken.core.events import (
    ChatEvent,
    ControlEvent,
    DoneEvent,
    FellBackEvent,
    FinishEvent,
    ReasoningEvent,
    RestartedEvent,
    ResumedEvent,
    RetryingEvent,
    RoleEvent,
    TextEvent,
    ToolCallEvent,
    UsageEvent,
)
from unbroken.core.pricing import Price, PriceTable
from unbroken.core.routes import Route
from unbroken.core.sse import SSEDecoder
from unbroken.core.stream import ChatStreamDecoder
from unbroken.core.wire import Answer, AnswerMeta, ChatCompletion, ChatCompletionChunk, Usage
from unbroken.errors import (
    ConfigError,
    EncodeError,
    InvalidRequestError,
    ProtocolError,
    RateLimited,
    ResumeError,
    RetriesExhausted,
    SessionNotFound,
    StoreError,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from unbroken.instrumentation import PrometheusHook
from unbroken.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "AnswerMeta",
    "AsyncChatStream",
    "AsyncClient",
    "AsyncStream",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatEvent",
    "ChatStream",
    "ChatStreamDecoder",
    "ChunkAccumulator",
    "Client",
    "ConfigError",
    "ControlEvent",
    "DoneEvent",
    "EncodeError",
    "FellBackEvent",
    "FinishEvent",
    "InvalidRequestError",
    "Price",
    "PriceTable",
    "PrometheusHook",
    "ProtocolError",
    "RateLimit",
    "RateLimited",
    "ReasoningEvent",
    "RestartedEvent",
    "ResumeError",
    "ResumedEvent",
    "RetriesExhausted",
    "RetryBudget",
    "RetryPolicy",
    "RetryingEvent",
    "RoleEvent",
    "Route",
    "SSEDecoder",
    "SessionNotFound",
    "Settings",
    "StoreError",
    "Stream",
    "TextEvent",
    "Timeouts",
    "ToolCallEvent",
    "UnbrokenError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamStreamError",
    "UpstreamTimeout",
    "UpstreamTruncated",
    "Usage",
    "UsageEvent",
]
