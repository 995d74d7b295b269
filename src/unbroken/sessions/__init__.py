"""Conversation sessions: ChatSession / AsyncChatSession and their stores (memory, SQLite,
Redis). Imports the client, core and errors; never the gateway or the CLI."""

from unbroken.sessions.session import AsyncChatSession, ChatSession
from unbroken.sessions.store import (
    AsyncSessionStore,
    MemorySessionStore,
    RedisSessionStore,
    SessionInfo,
    SessionStore,
    SQLiteSessionStore,
    default_sessions_path,
    export_session,
    import_session,
)

__all__ = [
    "AsyncChatSession",
    "AsyncSessionStore",
    "ChatSession",
    "MemorySessionStore",
    "RedisSessionStore",
    "SQLiteSessionStore",
    "SessionInfo",
    "SessionStore",
    "default_sessions_path",
    "export_session",
    "import_session",
]
