"""unbroken: streaming chat completions from DeepSeek (and any OpenAI-compatible server)
that arrive whole. Public SDK surface: re-exports only, no logic."""

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.sse import SSEDecoder
from unbroken.core.stream import ChatStreamDecoder
from unbroken.core.wire import ChatCompletion, ChatCompletionChunk, Usage
from unbroken.errors import (
    ConfigError,
    EncodeError,
    InvalidRequestError,
    ProtocolError,
    RateLimited,
    ResumeError,
    RetriesExhausted,
    StoreError,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from unbroken.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatStreamDecoder",
    "ChunkAccumulator",
    "ConfigError",
    "EncodeError",
    "InvalidRequestError",
    "ProtocolError",
    "RateLimited",
    "ResumeError",
    "RetriesExhausted",
    "SSEDecoder",
    "Settings",
    "StoreError",
    "UnbrokenError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamStreamError",
    "UpstreamTimeout",
    "UpstreamTruncated",
    "Usage",
]
