"""Where conversation sessions live: memory, SQLite (the default, a file in the user's data
directory) or Redis. One protocol, one shared table of tests for all three.

Turns are appended, never rewritten: SQLite rows keyed by an autoincrement id, Redis RPUSH.
So two writers adding turns to one session at the same time both keep theirs. Imports
errors and msgspec; redis lazily.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import anyio.to_thread
import msgspec

from unbroken.errors import InvalidRequestError, SessionNotFound, StoreError

if TYPE_CHECKING:
    import redis

__all__ = [
    "AsyncSessionStore",
    "MemorySessionStore",
    "RedisSessionStore",
    "SQLiteSessionStore",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "default_sessions_path",
    "export_session",
    "import_session",
]


class SessionInfo(msgspec.Struct, omit_defaults=True):
    """What is known about a session besides its messages.

    Attributes:
        id: the session id.
        created_s, updated_s: wall-clock times (epoch seconds).
        title: a short label (the first user message, cut).
        model: the model the session talks to.
        owner: who may read it (the gateway stores a hash of the API key), or "".
        n_messages: how many messages it holds.
    """

    id: str
    created_s: float = 0.0
    updated_s: float = 0.0
    title: str = ""
    model: str = ""
    owner: str = ""
    n_messages: int = 0


class SessionStore(Protocol):
    """A place to keep sessions (blocking API; `AsyncSessionStore` wraps one for asyncio)."""

    def create(self, *, model: str = "", title: str = "", owner: str = "") -> SessionInfo:
        """A new, empty session."""

    def append(
        self, session_id: str, messages: Sequence[dict[str, Any]], *, keep: int | None = None
    ) -> None:
        """Add messages at the end, atomically (all or none); with `keep`, first drop every
        stored message after the first `keep` (in the same transaction)."""

    def load(self, session_id: str) -> tuple[SessionInfo, list[dict[str, Any]]]:
        """The session and its messages, oldest first. Raises SessionNotFound if unknown."""

    def update(
        self, session_id: str, *, title: str | None = None, model: str | None = None
    ) -> None:
        """Change the title or model."""

    def list(self, *, owner: str | None = None, limit: int = 100) -> list[SessionInfo]:
        """Sessions, most recently updated first; only `owner`'s when given."""

    def delete(self, session_id: str) -> bool:
        """Forget a session; False if it did not exist."""

    def close(self) -> None:
        """Release connections."""


def default_sessions_path(data_home: str | None = None) -> Path:
    """`$XDG_DATA_HOME/unbroken/sessions.db` (default `~/.local/share/unbroken/...`)."""
    base = Path(data_home) if data_home else Path.home() / ".local" / "share"
    return base / "unbroken" / "sessions.db"


def _new_id() -> str:
    return "sess_" + uuid.uuid4().hex


def _title(messages: Sequence[dict[str, Any]]) -> str:
    for message in messages:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            text = " ".join(message["content"].split())
            return text if len(text) <= 60 else text[:57] + "..."
    return ""


_encode = msgspec.json.encode
_decode = msgspec.json.decode


class MemorySessionStore:
    """Sessions in this process only (tests, the demo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._infos: dict[str, SessionInfo] = {}
        self._messages: dict[str, list[dict[str, Any]]] = {}

    def create(self, *, model: str = "", title: str = "", owner: str = "") -> SessionInfo:
        now = time.time()
        info = SessionInfo(_new_id(), now, now, title, model, owner)
        with self._lock:
            self._infos[info.id] = info
            self._messages[info.id] = []
        return info

    def append(
        self, session_id: str, messages: Sequence[dict[str, Any]], *, keep: int | None = None
    ) -> None:
        with self._lock:
            info = self._get(session_id)
            stored = self._messages[session_id]
            if keep is not None:
                del stored[keep:]
            stored.extend(_decode(_encode(list(messages))))  # a copy the caller cannot change
            self._infos[session_id] = msgspec.structs.replace(
                info,
                updated_s=time.time(),
                n_messages=len(stored),
                title=info.title or _title(messages),
            )

    def _get(self, session_id: str) -> SessionInfo:
        info = self._infos.get(session_id)
        if info is None:
            raise SessionNotFound(session_id)
        return info

    def load(self, session_id: str) -> tuple[SessionInfo, list[dict[str, Any]]]:
        with self._lock:
            info = self._get(session_id)
            return info, _decode(_encode(self._messages[session_id]))

    def update(
        self, session_id: str, *, title: str | None = None, model: str | None = None
    ) -> None:
        with self._lock:
            info = self._get(session_id)
            self._infos[session_id] = msgspec.structs.replace(
                info,
                title=info.title if title is None else title,
                model=info.model if model is None else model,
                updated_s=time.time(),
            )

    def list(self, *, owner: str | None = None, limit: int = 100) -> list[SessionInfo]:
        with self._lock:
            infos = [i for i in self._infos.values() if owner is None or i.owner == owner]
        return sorted(infos, key=lambda i: i.updated_s, reverse=True)[:limit]

    def delete(self, session_id: str) -> bool:
        with self._lock:
            self._messages.pop(session_id, None)
            return self._infos.pop(session_id, None) is not None

    def close(self) -> None:
        """Nothing to release."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created_s REAL NOT NULL,
    updated_s REAL NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, seq);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated_s);
"""


class SQLiteSessionStore:
    """Sessions in one SQLite file (WAL mode, so readers never block the writer).

    One connection per thread; several processes may share the file (appends are single
    transactions of INSERTs, so concurrent writers never lose a turn).

    Args:
        path: the database file (parents are created); ":memory:" for a private one.
        timeout_s: how long to wait for another writer's lock.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0) -> None:
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self._conn().executescript(_SCHEMA)  # executescript manages its own transaction
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prepare the session database {self._path!r}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the session database {self._path!r}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"session database error: {exc}") from exc

    def create(self, *, model: str = "", title: str = "", owner: str = "") -> SessionInfo:
        now = time.time()
        info = SessionInfo(_new_id(), now, now, title, model, owner)
        with self._tx() as db:
            db.execute(
                "INSERT INTO sessions(id, created_s, updated_s, title, model, owner) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (info.id, now, now, title, model, owner),
            )
        return info

    def append(
        self, session_id: str, messages: Sequence[dict[str, Any]], *, keep: int | None = None
    ) -> None:
        with self._tx() as db:
            row = db.execute("SELECT title FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise SessionNotFound(session_id)
            if keep is not None:
                db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND seq NOT IN "
                    "(SELECT seq FROM messages WHERE session_id = ? ORDER BY seq LIMIT ?)",
                    (session_id, session_id, keep),
                )
            db.executemany(
                "INSERT INTO messages(session_id, body) VALUES (?, ?)",
                [(session_id, _encode(m)) for m in messages],
            )
            db.execute(
                "UPDATE sessions SET updated_s = ?, title = ? WHERE id = ?",
                (time.time(), row[0] or _title(messages), session_id),
            )

    def _info(self, db: sqlite3.Connection, session_id: str) -> SessionInfo:
        row = db.execute(
            "SELECT id, created_s, updated_s, title, model, owner, "
            "(SELECT COUNT(*) FROM messages WHERE session_id = sessions.id) "
            "FROM sessions WHERE id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            raise SessionNotFound(session_id)
        return SessionInfo(*row)

    def load(self, session_id: str) -> tuple[SessionInfo, list[dict[str, Any]]]:
        with self._tx() as db:
            info = self._info(db, session_id)
            rows = db.execute(
                "SELECT body FROM messages WHERE session_id = ? ORDER BY seq", (session_id,)
            ).fetchall()
        return info, [_decode(r[0]) for r in rows]

    def update(
        self, session_id: str, *, title: str | None = None, model: str | None = None
    ) -> None:
        with self._tx() as db:
            info = self._info(db, session_id)
            db.execute(
                "UPDATE sessions SET title = ?, model = ?, updated_s = ? WHERE id = ?",
                (
                    info.title if title is None else title,
                    info.model if model is None else model,
                    time.time(),
                    session_id,
                ),
            )

    def list(self, *, owner: str | None = None, limit: int = 100) -> list[SessionInfo]:
        query = (
            "SELECT id, created_s, updated_s, title, model, owner, "
            "(SELECT COUNT(*) FROM messages WHERE session_id = sessions.id) FROM sessions"
        )
        args: tuple[Any, ...] = ()
        if owner is not None:
            query += " WHERE owner = ?"
            args = (owner,)
        query += " ORDER BY updated_s DESC LIMIT ?"
        with self._tx() as db:
            rows = db.execute(query, (*args, limit)).fetchall()
        return [SessionInfo(*row) for row in rows]

    def delete(self, session_id: str) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            cursor = db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


class RedisSessionStore:
    """Sessions in Redis: a hash per session, a list of messages (RPUSH), and a sorted set
    of ids by update time (per owner too). `append` is one MULTI/EXEC transaction.

    Args:
        url: e.g. `redis://127.0.0.1:6379/0`.
        prefix: key prefix.
        client: an existing `redis.Redis` to use instead.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "unbroken:sess:",
        client: Any = None,
    ) -> None:
        import redis as redis_lib

        self._redis: redis.Redis = client or redis_lib.Redis.from_url(url)
        self._p = prefix
        self._errors: tuple[type[Exception], ...] = (redis_lib.RedisError,)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._errors as exc:
            raise StoreError(f"redis session store failed: {exc}") from exc

    def _keys(self, session_id: str) -> tuple[str, str]:
        return f"{self._p}{session_id}", f"{self._p}{session_id}:messages"

    def create(self, *, model: str = "", title: str = "", owner: str = "") -> SessionInfo:
        now = time.time()
        info = SessionInfo(_new_id(), now, now, title, model, owner)
        meta, _ = self._keys(info.id)
        fields = {
            "created_s": now,
            "updated_s": now,
            "title": title,
            "model": model,
            "owner": owner,
        }

        def run() -> None:
            pipe = self._redis.pipeline()
            # redis-py types `mapping` invariantly; our str/float values are what it accepts.
            pipe.hset(meta, mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(f"{self._p}index", {info.id: now})
            pipe.zadd(f"{self._p}owner:{owner}", {info.id: now})
            pipe.execute()

        self._call(run)
        return info

    def append(
        self, session_id: str, messages: Sequence[dict[str, Any]], *, keep: int | None = None
    ) -> None:
        meta, key = self._keys(session_id)
        info = self._meta(session_id)
        now = time.time()

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            if keep == 0:
                pipe.delete(key)
            elif keep is not None:
                pipe.ltrim(key, 0, keep - 1)
            if messages:
                pipe.rpush(key, *[_encode(m) for m in messages])
            pipe.hset(meta, mapping={"updated_s": now, "title": info.title or _title(messages)})
            pipe.zadd(f"{self._p}index", {session_id: now})
            pipe.zadd(f"{self._p}owner:{info.owner}", {session_id: now})
            pipe.execute()

        if messages or keep is not None:
            self._call(run)

    def _meta(self, session_id: str) -> SessionInfo:
        meta, key = self._keys(session_id)
        raw = self._call(lambda: self._redis.hgetall(meta))
        if not raw:
            raise SessionNotFound(session_id)
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        count = self._call(lambda: self._redis.llen(key))
        return SessionInfo(
            session_id,
            float(fields.get("created_s", 0)),
            float(fields.get("updated_s", 0)),
            fields.get("title", ""),
            fields.get("model", ""),
            fields.get("owner", ""),
            int(count),
        )

    def load(self, session_id: str) -> tuple[SessionInfo, list[dict[str, Any]]]:
        info = self._meta(session_id)
        _, key = self._keys(session_id)
        raw = self._call(lambda: self._redis.lrange(key, 0, -1))
        return info, [_decode(r) for r in raw]

    def update(
        self, session_id: str, *, title: str | None = None, model: str | None = None
    ) -> None:
        info = self._meta(session_id)
        meta, _ = self._keys(session_id)
        fields = {
            "title": info.title if title is None else title,
            "model": info.model if model is None else model,
            "updated_s": time.time(),
        }
        # redis-py types `mapping` invariantly; our str/float values are what it accepts.
        self._call(lambda: self._redis.hset(meta, mapping=fields))  # type: ignore[arg-type]

    def list(self, *, owner: str | None = None, limit: int = 100) -> list[SessionInfo]:
        index = f"{self._p}index" if owner is None else f"{self._p}owner:{owner}"
        ids = self._call(lambda: self._redis.zrevrange(index, 0, limit - 1))
        infos = []
        for raw in ids:
            with contextlib.suppress(StoreError):  # deleted meanwhile
                infos.append(self._meta(raw.decode()))
        return infos

    def delete(self, session_id: str) -> bool:
        try:
            info = self._meta(session_id)
        except StoreError:
            return False
        meta, key = self._keys(session_id)

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(meta, key)
            pipe.zrem(f"{self._p}index", session_id)
            pipe.zrem(f"{self._p}owner:{info.owner}", session_id)
            pipe.execute()

        self._call(run)
        return True

    def close(self) -> None:
        self._call(self._redis.close)


P = ParamSpec("P")
T = TypeVar("T")


class AsyncSessionStore:
    """Any SessionStore for asyncio code: each call runs in a worker thread, so the event
    loop never waits on SQLite's file locks or a Redis round trip."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def create(self, *, model: str = "", title: str = "", owner: str = "") -> SessionInfo:
        """See SessionStore.create."""
        return await self._run(self.store.create, model=model, title=title, owner=owner)

    async def append(
        self, session_id: str, messages: Sequence[dict[str, Any]], *, keep: int | None = None
    ) -> None:
        """See SessionStore.append."""
        await self._run(self.store.append, session_id, messages, keep=keep)

    async def load(self, session_id: str) -> tuple[SessionInfo, list[dict[str, Any]]]:
        """See SessionStore.load."""
        return await self._run(self.store.load, session_id)

    async def update(
        self, session_id: str, *, title: str | None = None, model: str | None = None
    ) -> None:
        """See SessionStore.update."""
        await self._run(self.store.update, session_id, title=title, model=model)

    async def list(self, *, owner: str | None = None, limit: int = 100) -> list[SessionInfo]:
        """See SessionStore.list."""
        return await self._run(self.store.list, owner=owner, limit=limit)

    async def delete(self, session_id: str) -> bool:
        """See SessionStore.delete."""
        return await self._run(self.store.delete, session_id)

    async def aclose(self) -> None:
        """Release connections."""
        await self._run(self.store.close)


def export_session(store: SessionStore, session_id: str) -> bytes:
    """A session as JSON: `{"session": {...}, "messages": [...]}`."""
    info, messages = store.load(session_id)
    return msgspec.json.encode({"session": info, "messages": messages})


def import_session(store: SessionStore, data: bytes, *, owner: str = "") -> SessionInfo:
    """Create a session from `export_session` output (a new id)."""
    try:
        doc = msgspec.json.decode(data)
        session = doc["session"]
        messages = doc["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of objects")
    except (msgspec.DecodeError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"not a session export: {exc}") from exc
    info = store.create(
        model=str(session.get("model", "")), title=str(session.get("title", "")), owner=owner
    )
    store.append(info.id, messages)
    return info
