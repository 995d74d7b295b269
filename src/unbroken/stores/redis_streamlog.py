"""RedisStreamLog: the `StreamLog` on Redis Streams, shared by several gateway instances.

Per stream: a hash of its info (`{p}s:{id}`), a Redis Stream of its events
(`{p}s:{id}:log`, entry ids `0-<seq>`, so the sequence is the entry id) and its request
(`{p}s:{id}:req`). Store-wide: the payload byte total, a sorted set of expiry times (the
sweeper's work list) and one of detached answers' lease expiries (the orphan list). Every
write is one Lua script, so the lease epoch check and the append are atomic: a fenced
writer can never append. Lease and retention rules are those of `core.streamlog`; the
shared case table checks both backends against each other. Imports redis, core and errors.

The writes every live answer makes (create, append, renew, release) are coalesced: the
calls made in one turn of the event loop, across all answers of the process, go to Redis in
one write on one long-lived connection (`_Coalescer`), so thousands of streams cost a few
round trips per turn rather than one per chunk. Each script still runs atomically on its
own; only the transport is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from unbroken.core.streamlog import Lease, Renewal, Retention, StreamInfo
from unbroken.errors import ConfigError, StoreError
from unbroken.stores.redis import _translated
from unbroken.stores.streamlog import (
    END_SLACK_BYTES,
    Batch,
    FencedError,
    LogFullError,
    UnknownStreamError,
)

__all__ = ["RedisStreamLog"]

T = TypeVar("T")

# Connections of one instance's log client (Redis serves 10,000 clients by default).
MAX_CONNECTIONS = 4096

_FMT = "local function fmt(x) return string.format('%.17g', x) end\n"

# KEYS meta, req, exp, live; ARGV id, caller, request, resumable, owner, now, lease_s, keep_ms
_CREATE = (
    _FMT
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local now, lease_s = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'caller', ARGV[2], 'created', ARGV[6], 'updated', ARGV[6],
  'n', 0, 'bytes', 0, 'ended', 0, 'ended_at', '', 'owner', ARGV[5], 'epoch', 1,
  'lease_exp', fmt(now + lease_s), 'stop', 0, 'reader_at', 0, 'resumable', ARGV[4], 'gone', 0,
  'kept', ARGV[6])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[1])
if ARGV[4] == '1' then redis.call('ZADD', KEYS[4], fmt(now + lease_s), ARGV[1]) end
return 1
"""
)

# KEYS meta, log, req, total, exp, live
# ARGV id, epoch, now, end, max_stream, max_total, expires_at, keep_ms, prefix, end_slack,
#      payloads...
_APPEND = """
local m = redis.call('HMGET', KEYS[1], 'epoch', 'n', 'bytes', 'ended', 'gone')
if not m[1] then return -1 end
if m[5] == '1' or m[4] == '1' or tonumber(m[1]) ~= tonumber(ARGV[2]) then return -2 end
local size = 0
for i = 11, #ARGV do size = size + #ARGV[i] end
local sb = tonumber(m[3])
local slack = ARGV[4] == '1' and size <= tonumber(ARGV[10])
if sb + size > tonumber(ARGV[5]) and not slack then return -3 end
local max_total = tonumber(ARGV[6])
-- Reserved at once (no GET first): the other logs' total is the new one less this size.
local total = redis.call('INCRBY', KEYS[4], size) - size
if total + size > max_total and not slack then
  -- Oldest ended logs go first; an unfinished answer is never evicted for another.
  local oldest = redis.call('ZRANGE', KEYS[5], 0, 199)
  for _, sid in ipairs(oldest) do
    if total + size <= max_total then break end
    local meta = ARGV[9] .. 's:' .. sid
    if sid ~= ARGV[1] and redis.call('HGET', meta, 'ended') == '1'
       and redis.call('HGET', meta, 'gone') ~= '1' then
      local b = tonumber(redis.call('HGET', meta, 'bytes') or '0')
      redis.call('DEL', meta .. ':log', meta .. ':req')
      redis.call('HSET', meta, 'gone', 1, 'bytes', 0)
      redis.call('DECRBY', KEYS[4], b)
      redis.call('ZREM', KEYS[5], sid)
      total = total - b
    end
  end
  if total + size > max_total then
    redis.call('DECRBY', KEYS[4], size)
    return -4
  end
end
local n = tonumber(m[2])
for i = 11, #ARGV do
  n = n + 1
  redis.call('XADD', KEYS[2], '0-' .. n, 'd', ARGV[i])
end
redis.call('HSET', KEYS[1], 'n', n, 'bytes', sb + size, 'updated', ARGV[3])
if ARGV[4] == '1' or n == #ARGV - 10 then
  -- The first and the last append set the expiries; the lease renewals (every second)
  -- move them on in between, which keeps the per-chunk script short.
  if ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'ended', 1, 'ended_at', ARGV[3])
    redis.call('ZREM', KEYS[6], ARGV[1])
  end
  redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
end
return n
"""

# KEYS meta, live; ARGV id, owner, now, lease_s
_ACQUIRE = (
    _FMT
    + """
local m = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_exp', 'ended', 'gone',
  'resumable')
if not m[2] then return -1 end
if m[4] == '1' or m[5] == '1' then return 0 end
local now = tonumber(ARGV[3])
if now < tonumber(m[3]) and m[1] ~= ARGV[2] then return 0 end
local epoch = tonumber(m[2]) + 1
local expires = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'epoch', epoch, 'lease_exp', fmt(expires),
  'updated', ARGV[3])
if m[6] == '1' then redis.call('ZADD', KEYS[2], fmt(expires), ARGV[1]) end
return epoch
"""
)

# KEYS meta, log, req, live, exp; ARGV id, owner, epoch, now, lease_s, expires_at, keep_ms
_RENEW = (
    _FMT
    + """
local m = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'gone', 'resumable', 'ended')
if m[1] ~= ARGV[2] or tonumber(m[2]) ~= tonumber(ARGV[3]) or m[3] == '1' then return {} end
local expires = tonumber(ARGV[4]) + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'lease_exp', fmt(expires), 'updated', ARGV[4])
if m[4] == '1' and m[5] ~= '1' then redis.call('ZADD', KEYS[4], fmt(expires), ARGV[1]) end
if m[5] ~= '1' then redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
-- The fields of a StreamInfo, by position (_INFO_FIELDS): half the reply of an HGETALL,
-- which a renewal of every live stream each second parses.
return redis.call('HMGET', KEYS[1], 'caller', 'created', 'updated', 'n', 'bytes', 'ended',
  'ended_at', 'owner', 'epoch', 'lease_exp', 'stop', 'reader_at', 'resumable')
"""
)
_INFO_FIELDS = (
    "caller",
    "created",
    "updated",
    "n",
    "bytes",
    "ended",
    "ended_at",
    "owner",
    "epoch",
    "lease_exp",
    "stop",
    "reader_at",
    "resumable",
)

# How often a live answer's lease renewals move Redis' expiry of its keys on (seconds):
# under the minute of slack `_keep_ms` leaves past the sweeper's deadline.
KEEP_REFRESH_S = 30

# KEYS live, exp; ARGV prefix, owner, now, lease_s, expires_at, keep_ms, then (id, epoch)
# pairs. `_RENEW` for many leases at once; per lease, '' when its writer is fenced, 'E' when
# its meta key is not a hash, else 'S' or 'R' (stop requested or not) and its reader_at.
_RENEW_MANY = (
    _FMT
    + f"local KEEP_REFRESH_S = {KEEP_REFRESH_S}\n"
    + """
local now, lease_s = tonumber(ARGV[3]), tonumber(ARGV[4])
local expires = fmt(now + lease_s)
local out = {}
for i = 7, #ARGV, 2 do
  local sid, meta = ARGV[i], ARGV[1] .. 's:' .. ARGV[i]
  local kind = redis.call('TYPE', meta)['ok']
  if kind ~= 'hash' and kind ~= 'none' then
    out[#out + 1] = 'E'
  else
    local m = redis.call('HMGET', meta, 'owner', 'epoch', 'gone', 'resumable', 'ended',
      'stop', 'reader_at', 'kept')
    if m[1] ~= ARGV[2] or tonumber(m[2]) ~= tonumber(ARGV[i + 1]) or m[3] == '1' then
      out[#out + 1] = ''
    else
      if m[5] == '1' or now - tonumber(m[8] or '0') < KEEP_REFRESH_S then
        redis.call('HSET', meta, 'lease_exp', expires, 'updated', ARGV[3])
      else
        -- Redis' expiry moves on every KEEP_REFRESH_S, not every renewal (three calls
        -- per live answer and second): it stays that much less than a minute ahead of
        -- the sweeper's, which it backs up.
        redis.call('HSET', meta, 'lease_exp', expires, 'updated', ARGV[3], 'kept', ARGV[3])
        redis.call('PEXPIRE', meta, ARGV[6])
        redis.call('PEXPIRE', meta .. ':log', ARGV[6])
        redis.call('PEXPIRE', meta .. ':req', ARGV[6])
      end
      if m[4] == '1' and m[5] ~= '1' then redis.call('ZADD', KEYS[1], expires, sid) end
      if m[5] ~= '1' then redis.call('ZADD', KEYS[2], ARGV[5], sid) end
      out[#out + 1] = (m[6] == '1' and 'S' or 'R') .. (m[7] or '0')
    end
  end
end
return out
"""
)
# Leases renewed by one `_RENEW_MANY` call: Redis runs a script alone, so a tick of 10,000
# streams goes as one pipeline of 20 short calls, not one call that blocks Redis throughout.
RENEW_MANY_CHUNK = 500

# KEYS meta, live; ARGV id, owner, epoch
_RELEASE = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if m[1] == ARGV[2] and tonumber(m[2]) == tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'lease_exp', 0)
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""

# KEYS meta; ARGV field, value
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS exp, total; ARGV now, prefix, tombstone_ms
_SWEEP = """
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local n = 0
for _, sid in ipairs(due) do
  local meta = ARGV[2] .. 's:' .. sid
  local m = redis.call('HMGET', meta, 'lease_exp', 'bytes', 'gone', 'ended')
  if m[1] and m[4] ~= '1' and now < tonumber(m[1]) then
    -- A writer still holds a live lease: not expired (its renewals move the score on).
  else
    if m[2] and m[3] ~= '1' then
      redis.call('DECRBY', KEYS[2], tonumber(m[2]))
      redis.call('HSET', meta, 'gone', 1, 'bytes', 0)
      redis.call('PEXPIRE', meta, ARGV[3])
      n = n + 1
    end
    redis.call('DEL', meta .. ':log', meta .. ':req')
    redis.call('ZREM', KEYS[1], sid)
  end
end
return n
"""


def _pack(parts: Sequence[bytes | bytearray | memoryview | str | int | float]) -> bytes:
    """One command in RESP (an array of bulk strings): what redis-py's packer makes, without
    its per-argument encoder calls (an append's ~20 arguments cost ~25 us there)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part if isinstance(part, (bytes, bytearray, memoryview)) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Then:
    """In place of a call's future: the reply (or its error, as an exception object) goes
    to `fn` as soon as it is read, in that loop turn (a future's callbacks run in the next
    one)."""

    __slots__ = ("_done", "_fn")

    def __init__(self, fn: Callable[[Any], None]) -> None:
        self._fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, reply: Any) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._fn(reply)
        except Exception as exc:  # the caller's bug: not the next replies' reader's
            asyncio.get_running_loop().call_exception_handler(
                {"message": "a Redis reply's callback failed", "exception": exc}
            )

    set_exception = set_result

    def cancel(self) -> None:
        self.set_result(asyncio.CancelledError())


# A queued script call: the script, its keys and arguments, the caller's future (or
# `_Then`), and whether it is a call sent again after NOSCRIPT (sent again once only).
_Call = tuple[AsyncScript, list[Any], list[Any], "asyncio.Future[Any] | _Then", bool]

_CRLF = b"\r\n"


# `_reply_reader().gets()` when the next reply is not all there yet.
_MORE = object()


def _reply_reader() -> hiredis.Reader:
    """An incremental reader of one connection's RESP replies (hiredis): bytes go in with
    `feed` as they arrive, `gets` gives each whole reply (or `_MORE`). An error reply is
    returned as redis-py's exception for it (NoScriptError...), a malformed one raises
    InvalidResponse."""
    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=BaseParser.parse_error,
        notEnoughData=_MORE,
    )


class _Coalescer:
    """Script calls made in one turn of the event loop, sent together on one connection.

    The first call of a turn schedules a flush (a callback, not a task) that writes every
    call queued by then in one write; when Redis owes no reply on the connection, that
    first call is written at once instead (no turn to wait for), and the others of the
    turn follow together. The replies are read by the connection's own protocol
    as they arrive (`_received`): each caller's future gets its own script's reply or error
    in the same loop turn as the bytes, with no reader task between them and no turn per
    reply. A batch is written without waiting for the replies of the one before (Redis
    answers one connection's commands in order). redis-py connects (TLS, AUTH, SELECT);
    its transport is then taken over, so no pipeline object, pool checkout, task or
    `wait_for` is made per batch or per call. One timer fails the calls of a Redis that
    sends nothing for the client's socket timeout while replies are due.

    Scripts go by their SHA (EVALSHA); a Redis that lost them (a restart, SCRIPT FLUSH)
    answers NOSCRIPT, and those calls are sent again once the scripts are loaded. Calls go
    out in the order they were made and Redis runs one connection's commands in order, so
    a call made after another of the same answer (its create, then its appends) is run
    after it, whether or not the first one's reply has come back. A failed connection fails
    every call written on it and not yet answered (a StoreError to each caller); the next
    flush connects again.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._queue: list[_Call] = []
        self._inflight: deque[_Call] = deque()  # written, reply not read yet
        self._flush_due = False
        self._connecting: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None  # the redis.asyncio Connection that connected
        self._transport: asyncio.WriteTransport | None = None  # while one is up
        self._replies = _reply_reader()  # reply bytes not parsed yet
        self._timer: asyncio.TimerHandle | None = None
        self._heard_at = 0.0  # when Redis last sent (or the first reply was due)
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._timeout_s: float = float(timeout) if timeout else 10.0

    def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one script call; the future gives its reply (or raises its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._enqueue((script, keys, args, future, False), loop)
        return future

    def call_then(
        self, script: AsyncScript, keys: list[Any], args: list[Any], then: Callable[[Any], None]
    ) -> None:
        """Queue one script call; `then` gets its reply, or its error as an exception
        object, in the loop turn the reply is read in."""
        self._enqueue((script, keys, args, _Then(then), False), asyncio.get_running_loop())

    def _enqueue(self, call: _Call, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:  # the connection and tasks of another (closed) loop
            self._loop, self._transport, self._connecting = loop, None, None
            self._inflight.clear()
            self._flush_due, self._timer = False, None
        self._queue.append(call)
        if not self._flush_due:
            if not self._inflight and self._transport is not None and len(self._queue) == 1:
                # Redis owes nothing on the connection: this call goes at once (no turn to
                # wait); the ones made after it in this turn go together in the next.
                self._flush()
                return
            self._flush_due = True
            # Runs in the next turn: the calls of this one join.
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not self._queue:
            return
        transport = self._transport
        if transport is None:
            if self._connecting is None:
                loop = asyncio.get_running_loop()
                self._connecting = loop.create_task(self._connect())
            return  # flushed once connected
        batch, self._queue = self._queue, []
        data = b"".join(
            _pack((b"EVALSHA", script.sha, len(keys), *keys, *args))
            for script, keys, args, _, _ in batch
        )
        if not self._inflight:
            self._heard_at = asyncio.get_running_loop().time()
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._check)
        self._inflight.extend(batch)
        transport.write(data)

    async def _connect(self) -> None:
        pool = self._redis.connection_pool
        # Not from the pool: held for good; replies are read by `_Replies`, bounded by
        # `_check` (the connection's socket timeout is not used).
        conn: Any = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        try:
            async with asyncio.timeout(self._timeout_s):
                await conn.connect()
            transport = conn._writer.transport
        except Exception as exc:
            self._connecting = None
            await conn.disconnect(nowait=True)
            failed, self._queue = self._queue, []
            error = _connection_error(exc, self._timeout_s)
            for call in failed:
                if not call[3].done():
                    call[3].set_exception(error)
            return
        except BaseException:
            self._connecting = None
            await conn.disconnect(nowait=True)
            raise
        self._connecting = None
        self._conn, self._transport = conn, transport
        self._replies = _reply_reader()
        transport.set_protocol(_Replies(self, transport))
        self._flush()

    def _received(self, transport: asyncio.BaseTransport, data: bytes) -> None:
        if transport is not self._transport:
            return
        replies = self._replies
        inflight = self._inflight
        lost: list[_Call] | None = None
        try:
            replies.feed(data)
            while inflight:
                reply = replies.gets()
                if reply is _MORE:
                    break
                call = inflight.popleft()
                future = call[3]
                if future.done():  # its caller was cancelled meanwhile
                    continue
                if isinstance(reply, NoScriptError) and not call[4]:
                    lost = [call] if lost is None else [*lost, call]
                elif isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            if not inflight and replies.has_data():
                raise InvalidResponse("Redis sent a reply no call waits for")
        except InvalidResponse as exc:
            self._drop(exc)
            return
        self._heard_at = asyncio.get_running_loop().time()
        if lost:
            task = asyncio.get_running_loop().create_task(self._reload(lost))
            self._reloads.add(task)  # a strong reference until it is done
            task.add_done_callback(self._reloads.discard)

    def _check(self) -> None:
        """The timer: fail the connection when Redis owes replies and sent nothing for the
        socket timeout; else look again when it could be."""
        self._timer = None
        if not self._inflight or self._transport is None:
            return
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._heard_at
        if silent >= self._timeout_s:
            self._drop(TimeoutError())
        else:
            self._timer = loop.call_later(self._timeout_s - silent, self._check)

    def _drop(self, exc: BaseException | None) -> None:
        """The connection failed: every call written on it and not answered fails."""
        transport, self._transport = self._transport, None
        if transport is None:
            return
        self._close_conn()
        self._replies = _reply_reader()
        error = _connection_error(exc, self._timeout_s)
        failed = list(self._inflight)
        self._inflight.clear()
        for call in failed:
            if not call[3].done():
                call[3].set_exception(error)
        if self._queue and not self._flush_due:  # made meanwhile: on a new connection
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _reload(self, lost: list[_Call]) -> None:
        """Load the scripts Redis lost, then send their calls again (once)."""
        try:
            for script in {id(call[0]): call[0] for call in lost}.values():
                await self._redis.script_load(script.script)
        except Exception as exc:
            for call in lost:
                if not call[3].done():
                    call[3].set_exception(exc)
            return
        loop = asyncio.get_running_loop()
        for script, keys, args, future, _ in lost:
            self._enqueue((script, keys, args, future, True), loop)

    async def aclose(self) -> None:
        """Stop (the calls not answered are cancelled) and close the connection."""
        tasks = [t for t in (self._connecting, *self._reloads) if t is not None]
        self._connecting = None
        if self._loop is asyncio.get_running_loop():
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._timer is not None:
                self._timer.cancel()
        self._timer = None
        for call in [*self._inflight, *self._queue]:
            call[3].cancel()
        self._inflight.clear()
        self._queue = []
        self._transport = None
        self._close_conn()

    def _close_conn(self) -> None:
        # Through redis-py's connection, which closes the transport and forgets it (its
        # finalizer warns of a connection it still holds).
        conn, self._conn = self._conn, None
        if conn is not None:
            conn._close()


def _connection_error(exc: BaseException | None, timeout_s: float) -> Exception:
    if isinstance(exc, TimeoutError):
        return RedisTimeoutError(f"no reply from Redis in {timeout_s:g} s")
    if isinstance(exc, RedisError):
        return exc
    if exc is None:
        return RedisConnectionError("Redis closed the connection")
    return RedisConnectionError(str(exc) or type(exc).__name__)


class _Replies(asyncio.Protocol):
    """The coalescer's connection, once taken over from redis-py: bytes go to `_received`."""

    def __init__(self, owner: _Coalescer, transport: asyncio.BaseTransport) -> None:
        self._owner = owner
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._owner._received(self._transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._owner._transport is self._transport:
            self._owner._drop(exc)


def _info(stream_id: str, raw: dict[str, str]) -> StreamInfo:
    ended_at = raw.get("ended_at") or ""
    return StreamInfo(
        id=stream_id,
        caller=raw["caller"],
        created_at=float(raw["created"]),
        updated_at=float(raw["updated"]),
        n_events=int(raw["n"]),
        n_bytes=int(raw["bytes"]),
        ended=raw["ended"] == "1",
        ended_at=float(ended_at) if ended_at else None,
        lease=Lease(raw["owner"], int(raw["epoch"]), float(raw["lease_exp"])),
        stop_requested=raw.get("stop") == "1",
        reader_at=float(raw.get("reader_at") or 0),
        resumable=raw.get("resumable") == "1",
    )


class RedisStreamLog:
    """The `StreamLog` on Redis Streams (see the module docstring).

    Args:
        client: a `redis.asyncio.Redis` with `decode_responses=False` (payloads are bytes).
        retention: how long and how much is kept.
        prefix: the namespace of every key written.
    """

    def __init__(
        self, client: aioredis.Redis, retention: Retention | None = None, prefix: str = "unbroken:"
    ) -> None:
        self._redis = client
        self.retention = retention or Retention()
        self._p = prefix
        # The store-wide keys (made once: an append names three of them).
        self._total = f"{prefix}streams:bytes"
        self._exp = f"{prefix}streams:exp"
        self._live = f"{prefix}streams:live"
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._renew_many = client.register_script(_RENEW_MANY)
        self._release = client.register_script(_RELEASE)
        self._set = client.register_script(_SET_IF_EXISTS)
        self._sweep = client.register_script(_SWEEP)
        self._writes = _Coalescer(client)

    def __repr__(self) -> str:
        return f"RedisStreamLog(prefix={self._p!r})"

    @classmethod
    def from_url(
        cls, url: str, retention: Retention | None = None, prefix: str = "unbroken:"
    ) -> RedisStreamLog:
        """A log on the Redis at `url`.

        Raises:
            ConfigError: the URL is malformed.
        """
        try:
            # Each reader waiting for a live event holds a connection (XREAD BLOCK), so the
            # pool is sized for thousands of readers, not redis-py's default 100.
            client = aioredis.from_url(
                url,
                socket_connect_timeout=2.0,
                socket_timeout=10.0,
                max_connections=MAX_CONNECTIONS,
            )
        except ValueError as exc:
            raise ConfigError(f"gateway store: malformed Redis URL ({exc})") from None
        return cls(client, retention, prefix)

    def _keys(self, stream_id: str) -> tuple[str, str, str]:
        meta = f"{self._p}s:{stream_id}"
        return meta, meta + ":log", meta + ":req"

    def _keep_ms(self) -> int:
        # Redis' own expiry is a safety net behind the sweeper: the whole retention plus
        # the tombstone time plus a minute, counted from the last write.
        r = self.retention
        return int((r.ttl_s + r.tombstone_s + 60) * 1000)

    async def _run(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        with _translated(what):
            return await call()

    async def create(
        self,
        stream_id: str,
        *,
        caller: str,
        request: bytes,
        resumable: bool,
        owner: str,
        now: float,
        lease_s: float,
    ) -> Lease:
        """See `StreamLog.create`."""
        return await self.create_soon(
            stream_id,
            caller=caller,
            request=request,
            resumable=resumable,
            owner=owner,
            now=now,
            lease_s=lease_s,
        )

    def create_soon(
        self,
        stream_id: str,
        *,
        caller: str,
        request: bytes,
        resumable: bool,
        owner: str,
        now: float,
        lease_s: float,
    ) -> asyncio.Future[Lease]:
        """`create`, queued now: its future gives the lease (or raises a `StoreError`).

        Nothing waits for Redis meanwhile, so a new answer's upstream request is made while
        its log is created. Redis runs the calls of this log in the order they are made:
        anything made after this call runs after it.
        """
        meta, _, req = self._keys(stream_id)
        args: list[Any] = [
            stream_id,
            caller,
            request,
            "1" if resumable else "0",
            owner,
            repr(now),
            repr(float(lease_s)),
            self._keep_ms(),
            repr(now + self.retention.ttl_s),
        ]
        lease: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()

        def created(reply: Any) -> None:  # in the turn the reply is read
            if lease.done():  # its caller gave up
                return
            if isinstance(reply, asyncio.CancelledError):
                lease.cancel()
                return
            try:
                with _translated("create a stream log"):
                    if isinstance(reply, BaseException):
                        raise reply
                    if not int(reply):
                        raise StoreError(f"stream {stream_id[:60]!r} exists already")
            except StoreError as exc:
                lease.set_exception(exc)
                return
            except Exception as exc:  # not Redis' own error: still the store's failure
                lease.set_exception(
                    StoreError(f"redis store failed to create a stream log: {exc!r}")
                )
                return
            lease.set_result(Lease(owner, 1, now + lease_s))

        self._writes.call_then(self._create, [meta, req, self._exp, self._live], args, created)
        return lease

    async def append(
        self, stream_id: str, epoch: int, payloads: Sequence[bytes], now: float, *, end: bool
    ) -> int:
        """See `StreamLog.append`."""
        keys, args = self._append_call(stream_id, epoch, payloads, now, end)
        with _translated("append to a stream log"):  # no `_run` coroutine: once a chunk
            n = int(await self._writes.call(self._append, keys, args))
        return n if n > 0 else self._appended(n, stream_id, epoch)

    def append_then(
        self,
        stream_id: str,
        epoch: int,
        payloads: Sequence[bytes],
        now: float,
        *,
        end: bool,
        then: Callable[[Any], None],
    ) -> None:
        """`append`, queued now: `then` gets Redis' reply, which `append_reply` turns into
        append's result or error, in the loop turn it is read in. A writer appending
        through this has no coroutine, task or future per append, and its readers get an
        event in the turn its append's reply arrives in."""
        keys, args = self._append_call(stream_id, epoch, payloads, now, end)
        self._writes.call_then(self._append, keys, args, then)

    def append_reply(self, reply: Any, stream_id: str, epoch: int) -> int:
        """The event number of the last event appended, from an `append_then` reply.

        Raises:
            What `append` raises; a `StoreError` when the log closed meanwhile.
        """
        if isinstance(reply, BaseException):
            if isinstance(reply, RedisError):
                with _translated("append to a stream log"):
                    raise reply
            raise StoreError(f"redis store failed to append to a stream log: {reply!r}")
        with _translated("append to a stream log"):
            n = int(reply)
        return n if n > 0 else self._appended(n, stream_id, epoch)

    def _append_call(
        self, stream_id: str, epoch: int, payloads: Sequence[bytes], now: float, end: bool
    ) -> tuple[list[Any], list[Any]]:
        meta, log, req = self._keys(stream_id)
        r = self.retention
        args: list[Any] = [
            stream_id,
            epoch,
            repr(now),
            "1" if end else "0",
            r.max_stream_bytes,
            r.max_total_bytes,
            repr(now + r.ttl_s),
            self._keep_ms(),
            self._p,
            END_SLACK_BYTES,
            *payloads,
        ]
        return [meta, log, req, self._total, self._exp, self._live], args

    def _appended(self, n: int, stream_id: str, epoch: int) -> int:
        if n == -1:
            raise UnknownStreamError(f"no stream {stream_id[:60]!r}")
        if n == -2:
            raise FencedError(f"stream {stream_id!r}: epoch {epoch} may not append")
        r = self.retention
        if n == -3:
            raise LogFullError(
                f"stream {stream_id!r} outgrew its log's bound of {r.max_stream_bytes} bytes "
                "(gateway.stream_max_bytes)"
            )
        if n == -4:
            raise LogFullError(
                f"the stream logs are full ({r.max_total_bytes} bytes, "
                f"gateway.streams_max_bytes); stream {stream_id!r} cannot be logged"
            )
        return n

    async def read(self, stream_id: str, after: int, *, limit: int, max_bytes: int) -> Batch:
        """See `StreamLog.read`."""
        meta, log, _ = self._keys(stream_id)

        async def both() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrange(log, f"0-{after + 1}", "+", count=limit)
                pipe.hmget(meta, ["n", "ended", "gone"])
                return list(await pipe.execute())

        entries, (n, ended, gone) = await self._run("read a stream log", both)
        if n is None or gone == b"1":
            raise UnknownStreamError(
                f"no stream {stream_id[:60]!r}" if n is None else f"stream {stream_id!r} expired"
            )
        events: list[tuple[int, bytes]] = []
        size = 0
        for entry_id, fields in entries:
            payload = fields[b"d"]
            if events and size + len(payload) > max_bytes:
                break
            events.append((int(entry_id.split(b"-")[1]), payload))
            size += len(payload)
        return Batch(events, ended == b"1", int(n))

    async def wait(self, stream_id: str, after: int, timeout_s: float) -> None:
        """See `StreamLog.wait`: one XREAD BLOCK."""
        _, log, _ = self._keys(stream_id)
        block_ms = max(1, int(timeout_s * 1000))
        await self._run(
            "wait on a stream log",
            lambda: self._redis.xread({log: f"0-{after}"}, count=1, block=block_ms),
        )

    async def info(self, stream_id: str) -> StreamInfo | None:
        """See `StreamLog.info`."""
        meta, _, _ = self._keys(stream_id)
        raw: Any = await self._run("read a stream's info", lambda: self._redis.hgetall(meta))
        if not raw:
            return None
        with _translated("read a stream's info"):
            return _info(stream_id, {k.decode(): v.decode() for k, v in raw.items()})

    async def request(self, stream_id: str) -> bytes | None:
        """See `StreamLog.request`."""
        _, _, req = self._keys(stream_id)
        raw: Any = await self._run("read a stream's request", lambda: self._redis.get(req))
        return None if raw is None else bytes(raw)

    async def acquire(self, stream_id: str, owner: str, now: float, lease_s: float) -> Lease | None:
        """See `StreamLog.acquire`."""
        meta, _, _ = self._keys(stream_id)
        args = [stream_id, owner, repr(now), repr(float(lease_s))]
        raw: Any = await self._run(
            "take a stream's lease", lambda: self._acquire(keys=[meta, self._live], args=args)
        )
        epoch = int(raw)
        if epoch == -1:
            raise UnknownStreamError(f"no stream {stream_id[:60]!r}")
        return Lease(owner, epoch, now + lease_s) if epoch > 0 else None

    async def renew(
        self, stream_id: str, owner: str, epoch: int, now: float, lease_s: float
    ) -> StreamInfo | None:
        """See `StreamLog.renew`."""
        meta, log, req = self._keys(stream_id)
        args: list[Any] = [
            stream_id,
            owner,
            epoch,
            repr(now),
            repr(float(lease_s)),
            repr(now + self.retention.ttl_s),
            self._keep_ms(),
        ]
        raw: Any = await self._run(
            "renew a stream's lease",
            lambda: self._writes.call(self._renew, [meta, log, req, self._live, self._exp], args),
        )
        if not raw:
            return None
        with _translated("renew a stream's lease"):
            fields = {
                k: v.decode() for k, v in zip(_INFO_FIELDS, raw, strict=True) if v is not None
            }
            return _info(stream_id, fields)

    async def renew_many(
        self, owner: str, leases: Sequence[tuple[str, int]], now: float, lease_s: float
    ) -> list[Renewal | StoreError | None]:
        """See `StreamLog.renew_many`: one script call per 500 leases, every call of a
        tick in one pipeline (`_Coalescer`)."""
        head: list[Any] = [
            self._p,
            owner,
            repr(now),
            repr(float(lease_s)),
            repr(now + self.retention.ttl_s),
            self._keep_ms(),
        ]
        calls = []
        for at in range(0, len(leases), RENEW_MANY_CHUNK):
            args = head.copy()
            for stream_id, epoch in leases[at : at + RENEW_MANY_CHUNK]:
                args += (stream_id, epoch)
            calls.append(self._writes.call(self._renew_many, [self._live, self._exp], args))
        parts = await self._run("renew stream leases", lambda: asyncio.gather(*calls))
        replies = [raw for part in parts for raw in part]
        out: list[Renewal | StoreError | None] = []
        for (stream_id, _), raw in zip(leases, replies, strict=True):
            try:
                out.append(Renewal(raw[:1] == b"S", float(raw[1:])) if raw else None)
            except ValueError:  # b"E", or a reader_at that is not a number
                out.append(StoreError(f"redis store holds a malformed stream {stream_id[:60]!r}"))
        return out

    async def release(self, stream_id: str, owner: str, epoch: int) -> None:
        """See `StreamLog.release`."""
        meta, _, _ = self._keys(stream_id)
        await self._run(
            "release a stream's lease",
            lambda: self._writes.call(self._release, [meta, self._live], [stream_id, owner, epoch]),
        )

    async def request_stop(self, stream_id: str) -> None:
        """See `StreamLog.request_stop`."""
        meta, _, _ = self._keys(stream_id)
        raw: Any = await self._run(
            "ask a stream to stop", lambda: self._set(keys=[meta], args=["stop", "1"])
        )
        if not int(raw):
            raise UnknownStreamError(f"no stream {stream_id[:60]!r}")

    async def touch_reader(self, stream_id: str, now: float) -> None:
        """See `StreamLog.touch_reader`."""
        meta, _, _ = self._keys(stream_id)
        await self._run(
            "mark a stream's reader", lambda: self._set(keys=[meta], args=["reader_at", repr(now)])
        )

    async def orphans(self, now: float, limit: int) -> list[str]:
        """See `StreamLog.orphans`."""
        raw: Any = await self._run(
            "list orphaned streams",
            lambda: self._redis.zrangebyscore(self._live, "-inf", repr(now), start=0, num=limit),
        )
        return [item.decode() for item in raw]

    async def sweep(self, now: float) -> int:
        """See `StreamLog.sweep`."""
        tomb_ms = max(1, int(self.retention.tombstone_s * 1000))
        raw: Any = await self._run(
            "sweep stream logs",
            lambda: self._sweep(keys=[self._exp, self._total], args=[repr(now), self._p, tomb_ms]),
        )
        return int(raw)

    async def link_session(self, session_id: str, stream_id: str, now: float) -> None:
        """See `StreamLog.link_session`."""
        ttl_ms = int((self.retention.ttl_s + self.retention.tombstone_s) * 1000)
        await self._run(
            "link a session to its stream",
            lambda: self._redis.set(f"{self._p}session-stream:{session_id}", stream_id, px=ttl_ms),
        )

    async def session_stream(self, session_id: str) -> str | None:
        """See `StreamLog.session_stream`."""
        raw: Any = await self._run(
            "read a session's stream",
            lambda: self._redis.get(f"{self._p}session-stream:{session_id}"),
        )
        return None if raw is None else bytes(raw).decode()

    async def aclose(self) -> None:
        """Close the connection pool and the writes' connection."""
        await self._writes.aclose()
        await self._redis.aclose()
