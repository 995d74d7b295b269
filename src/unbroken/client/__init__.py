"""The SDK shell: Client (blocking) and AsyncClient (anyio), both driving core.flow.

Imports core, errors, settings, instrumentation and httpx; never the gateway or the CLI.
"""

from unbroken.client._common import RateLimit
from unbroken.client._options import ClientOptions
from unbroken.client.async_ import AsyncChatStream, AsyncClient, AsyncStream, AsyncTextStream
from unbroken.client.cache import AnswerCache, CachedChunk, CacheEvent
from unbroken.client.sync import ChatStream, Client, Stream, TextStream
from unbroken.client.transport import AsyncHTTPTransport, HTTPTransport

__all__ = [
    "AnswerCache",
    "AsyncChatStream",
    "AsyncClient",
    "AsyncHTTPTransport",
    "AsyncStream",
    "AsyncTextStream",
    "CacheEvent",
    "CachedChunk",
    "ChatStream",
    "Client",
    "ClientOptions",
    "HTTPTransport",
    "RateLimit",
    "Stream",
    "TextStream",
]
