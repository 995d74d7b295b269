"""The SDK shell: Client (blocking) and AsyncClient (anyio), both driving core.flow.

Imports core, errors, settings, instrumentation and httpx; never the gateway or the CLI.
"""

from unbroken.client._common import RateLimit
from unbroken.client._options import ClientOptions
from unbroken.client.async_ import AsyncChatStream, AsyncClient, AsyncStream
from unbroken.client.sync import ChatStream, Client, Stream

__all__ = [
    "AsyncChatStream",
    "AsyncClient",
    "AsyncStream",
    "ChatStream",
    "Client",
    "ClientOptions",
    "RateLimit",
    "Stream",
]
