"""Answer-cache backends: bytes under a key with a time to live.

`MemoryAnswerStore` (embedded, bounded in bytes, least recently used out first),
`SQLiteAnswerStore` (a file, survives restarts; sqlite3 in a worker thread) and
`RedisAnswerStore` (shared by every gateway instance). Each entry may carry the model that
produced it, so an operator can forget one model's entries. One table of cases runs
against the three (tests/integration/test_answer_cache.py). What an entry holds and how
keys are made is `core.cache`; here are only bytes. Imports errors and the standard
library (redis lazily, for the `[redis]` extra).
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio

from unbroken.errors import ConfigError, StoreError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

T = TypeVar("T")

__all__ = [
    "AnswerStore",
    "MemoryAnswerStore",
    "RedisAnswerStore",
    "SQLiteAnswerStore",
    "open_answer_store",
]

# Default bound of the memory backend: a few thousand long answers.
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024


class AnswerStore(Protocol):
    """Where cached answers live. Failures raise `StoreError`; time is passed in."""

    async def get(self, key: str, now: float) -> bytes | None:
        """The value stored under `key`, or None when absent or expired."""

    async def put(
        self, key: str, value: bytes, now: float, ttl_s: float, *, model: str = ""
    ) -> None:
        """Store `value` under `key` until `now + ttl_s`, tagged with `model`."""

    async def delete(self, key: str | None = None) -> int:
        """Forget `key` (every entry when None); returns how many were removed."""

    async def delete_model(self, model: str) -> int:
        """Forget every entry tagged with `model`; returns how many were removed."""

    async def aclose(self) -> None:
        """Release connections."""


class MemoryAnswerStore:
    """In-process entries, at most `max_bytes` of values; the least recently used go
    first when a new one does not fit."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"answer cache max_bytes must be > 0, not {max_bytes}")
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()

    def __repr__(self) -> str:
        return f"MemoryAnswerStore(entries={len(self._entries)}, bytes={self._bytes})"

    async def get(self, key: str, now: float) -> bytes | None:
        """See `AnswerStore.get`."""
        item = self._entries.get(key)
        if item is None:
            return None
        expires, value, _ = item
        if expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(
        self, key: str, value: bytes, now: float, ttl_s: float, *, model: str = ""
    ) -> None:
        """See `AnswerStore.put`; a value larger than the whole bound is not stored."""
        if len(value) > self._max_bytes:
            return
        self._drop(key)
        while self._bytes + len(value) > self._max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (now + ttl_s, value, model)
        self._bytes += len(value)

    def _drop(self, key: str) -> bool:
        item = self._entries.pop(key, None)
        if item is None:
            return False
        self._bytes -= len(item[1])
        return True

    async def delete(self, key: str | None = None) -> int:
        """See `AnswerStore.delete`."""
        if key is not None:
            return int(self._drop(key))
        n = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return n

    async def delete_model(self, model: str) -> int:
        """See `AnswerStore.delete_model`."""
        keys = [key for key, (_, _, tag) in self._entries.items() if tag == model]
        for key in keys:
            self._drop(key)
        return len(keys)

    async def aclose(self) -> None:
        """Nothing to release."""


class SQLiteAnswerStore:
    """Entries in one SQLite table; each call runs in a worker thread on one connection."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self._path, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, expires REAL NOT NULL,"
                " value BLOB NOT NULL, model TEXT NOT NULL DEFAULT '')"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}
            if "model" not in columns:
                # A cache file from before entries were tagged: its rows get no model.
                self._db.execute("ALTER TABLE answers ADD COLUMN model TEXT NOT NULL DEFAULT ''")
            self._db.execute("CREATE INDEX IF NOT EXISTS answers_model ON answers (model)")
            self._db.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the answer cache at {self._path!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteAnswerStore({self._path!r})"

    async def _run(self, sql: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        def call() -> sqlite3.Cursor:
            with self._lock:
                cursor = self._db.execute(sql, args)
                self._db.commit()
                return cursor

        try:
            return await anyio.to_thread.run_sync(call)
        except sqlite3.Error as exc:
            raise StoreError(f"answer cache at {self._path!r} failed: {exc}") from exc

    async def get(self, key: str, now: float) -> bytes | None:
        """See `AnswerStore.get`."""
        cursor = await self._run(
            "SELECT value FROM answers WHERE key = ? AND expires > ?", (key, now)
        )
        row = cursor.fetchone()
        return bytes(row[0]) if row is not None else None

    async def put(
        self, key: str, value: bytes, now: float, ttl_s: float, *, model: str = ""
    ) -> None:
        """See `AnswerStore.put`; expired rows are swept on the way."""
        await self._run("DELETE FROM answers WHERE expires <= ?", (now,))
        await self._run(
            "INSERT OR REPLACE INTO answers (key, expires, value, model) VALUES (?, ?, ?, ?)",
            (key, now + ttl_s, value, model),
        )

    async def delete(self, key: str | None = None) -> int:
        """See `AnswerStore.delete`."""
        if key is None:
            cursor = await self._run("DELETE FROM answers", ())
        else:
            cursor = await self._run("DELETE FROM answers WHERE key = ?", (key,))
        return cursor.rowcount

    async def delete_model(self, model: str) -> int:
        """See `AnswerStore.delete_model`."""
        cursor = await self._run("DELETE FROM answers WHERE model = ?", (model,))
        return cursor.rowcount

    async def aclose(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


class RedisAnswerStore:
    """Entries as Redis strings with a millisecond expiry (`SET PX`), under `prefix`; each
    model's entry keys in a set under `prefix + "models:" + model`, which expires with the
    newest of them (cache keys are `v1:<hex>`, so the two never collide)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "unbroken:cache:") -> None:
        self._client = client
        self._prefix = prefix
        self._models = prefix + "models:"

    def __repr__(self) -> str:
        return f"RedisAnswerStore(prefix={self._prefix!r})"

    @classmethod
    def from_url(cls, url: str, prefix: str = "unbroken:cache:") -> RedisAnswerStore:
        """A store on the Redis at `url` (needs the `[redis]` extra).

        Raises:
            ConfigError: redis is not installed.
        """
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - the [redis] extra is a dev dependency
            raise ConfigError(
                "a redis:// answer cache needs: pip install 'unbroken[redis]'"
            ) from exc
        return cls(aioredis.Redis.from_url(url), prefix)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        from redis.exceptions import RedisError

        try:
            return await call
        except RedisError as exc:
            raise StoreError(f"redis answer cache failed to {what}: {type(exc).__name__}") from exc

    async def get(self, key: str, now: float) -> bytes | None:
        """See `AnswerStore.get` (Redis expires entries itself; `now` is unused)."""
        value = await self._call("get", self._client.get(self._prefix + key))
        return value if isinstance(value, bytes) else None

    async def put(
        self, key: str, value: bytes, now: float, ttl_s: float, *, model: str = ""
    ) -> None:
        """See `AnswerStore.put`."""
        ttl_ms = max(1, round(ttl_s * 1000))
        if not model:
            await self._call("put", self._client.set(self._prefix + key, value, px=ttl_ms))
            return
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._prefix + key, value, px=ttl_ms)
        pipe.sadd(self._models + model, self._prefix + key)
        pipe.pexpire(self._models + model, ttl_ms)
        await self._call("put", pipe.execute())

    async def delete(self, key: str | None = None) -> int:
        """See `AnswerStore.delete`; the whole-cache form scans the prefix."""
        if key is not None:
            n = await self._call("delete", self._client.delete(self._prefix + key))
            return int(n)
        from redis.exceptions import RedisError

        removed = 0
        try:
            async for name in self._client.scan_iter(match=self._prefix + "*", count=500):
                n = await self._call("delete", self._client.delete(name))
                if not name.startswith(self._models.encode()):
                    removed += int(n)
        except RedisError as exc:
            raise StoreError(f"redis answer cache failed to scan: {type(exc).__name__}") from exc
        return removed

    async def delete_model(self, model: str) -> int:
        """See `AnswerStore.delete_model`: one script, so an entry stored meanwhile is
        either removed with the others or keeps its place in the model's set."""
        n = await self._call(
            "delete a model's entries", self._client.eval(_DELETE_MODEL, 1, self._models + model)
        )
        return int(n)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


# Deletes the entries a model's set names (those already expired count nothing), then the set.
_DELETE_MODEL = """
local n = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('DEL', key)
end
redis.call('DEL', KEYS[1])
return n
"""


def open_answer_store(spec: str, *, max_bytes: int = DEFAULT_MEMORY_BYTES) -> AnswerStore:
    """The backend for a cache setting: `memory`, `sqlite:///path` (or a path ending in
    `.db`/`.sqlite`), or a `redis://` URL.

    Raises:
        ConfigError: the spec names no known backend.
    """
    if spec == "memory":
        return MemoryAnswerStore(max_bytes)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisAnswerStore.from_url(spec)
    if spec.startswith("sqlite://"):
        return SQLiteAnswerStore(spec.removeprefix("sqlite:///") or ":memory:")
    if spec.endswith((".db", ".sqlite", ".sqlite3")):
        return SQLiteAnswerStore(spec)
    raise ConfigError(
        f"answer cache store {spec[:100]!r} is not understood; use 'memory', "
        "'sqlite:///path/cache.db' or 'redis://host:port/0'"
    )
