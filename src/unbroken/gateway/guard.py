"""HTTP-layer limits of the gateway, enforced inside uvicorn's httptools protocol before a
request reaches the app: head size and header count (431), head and body-progress timeouts
(408, then close), connection caps per process and per client address (503), and one
OpenAI-shaped JSON error for everything the HTTP layer refuses (parser errors included).

Theory of operation
-------------------
Each connection is in one of three phases:
  * HEAD: waiting for or reading a request head. The head timer runs from the connection's
    first moment (a silent connection is a slowloris too) or, after a keep-alive response,
    from the first byte of the next head; the keep-alive timeout (uvicorn's
    `timeout_keep_alive`) covers the idle time between requests. Bytes of an unfinished
    head are counted as they arrive, so a huge header is refused after `max_head_bytes`
    plus one read, never buffered whole.
  * BODY: the head is complete and the body is not. The body timer is re-armed by every
    piece of body; it does not fire while reading is paused (the app is not reading yet).
  * APP: the request is whole and the app owns the connection until the response is
    complete, which returns it to HEAD.
All of these are one timer per connection, whose deadline moves with the phase; the timer
is re-made only when a deadline comes earlier than it (see `_set_deadline`).
A WebSocket upgrade hands the connection to uvicorn's WebSocket protocol: the timers stop,
and the connection stays counted until it closes.
A refusal writes one JSON error with `Connection: close` (unless the app already started a
response, in which case the connection is just closed) and nothing more is read.
Imports uvicorn, httptools and gateway siblings.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import http
import logging
import os
import sys
import threading
import time
import urllib.parse
from asyncio import TimerHandle
from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, Literal

import httptools
from uvicorn._types import ASGIVersions, HTTPScope
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import (
    HIGH_WATER_LIMIT,
    FlowControl,
    service_unavailable,
)
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import (
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
)
from uvicorn.server import ServerState

from unbroken._flag import Flag
from unbroken.gateway.accesslog import ACCESS_LOGGER
from unbroken.gateway.asgi import RESPONSE_EXTENSION, TRANSPORT_EXTENSION, LostWatcher, Message
from unbroken.gateway.detach import DETACH_EXTENSION, Detached, resume_asgi, run_asgi
from unbroken.gateway.direct import DIRECT_EXTENSION, DirectBody, writes_held
from unbroken.gateway.eager import EagerStart, eager_task
from unbroken.gateway.metrics import GatewayMetrics
from unbroken.gateway.problems import error_body
from unbroken.settings import GatewaySettings

__all__ = ["CycleHooks", "Guard", "LogLimiter", "guarded_protocol", "install_log_limits"]

logger = logging.getLogger(__name__)
# uvicorn's protocol loggers (the same objects for the process's life).
_ERROR_LOG = logging.getLogger("uvicorn.error")
_ACCESS_LOG = logging.getLogger("uvicorn.access")

# Loggers that a flood of bad connections can make write: asyncio (accept errors), uvicorn
# (protocol and ASGI errors) and the gateway's own.
FLOODABLE_LOGGERS = ("asyncio", "uvicorn.error", "unbroken")


_intern = sys.intern

# Forks of this process so far (as seen by the child): a loop remembered before a fork is
# not the child's.
_forks = [0]


def _forked() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_forked)


# A scope's extensions when it has none (never written to).
_NO_EXTENSIONS: dict[str, Any] = {}
# The scope's `asgi` entry of the ASGI versions uvicorn speaks.
_ASGI_INFO: dict[str, ASGIVersions] = {
    "2.0": {"version": "2.0", "spec_version": "2.3"},
    "3.0": {"version": "3.0", "spec_version": "2.3"},
}


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    APP = "app"


# What `Guard.from_config` takes from a uvicorn config.
_ConfigValues = tuple[Any, Any, str, Any, "int | None", int]


class Guard:
    """The HTTP-layer limits and the connection counts of one gateway process.

    Args:
        settings: the gateway settings (`max_head_bytes`, timeouts, connection caps).
        metrics: where refusals are counted (`unbroken_gateway_rejections_total{reason}`).
    """

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.max_head_bytes = settings.max_head_bytes
        self.max_headers = settings.max_headers
        self.head_timeout_s = settings.head_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.max_connections = settings.max_connections
        self.max_per_client = settings.max_connections_per_client
        self.metrics = metrics
        self.n_connections = 0
        self.per_client: dict[str, int] = {}
        # The listener's address when it is bound to one (not a wildcard): every connection
        # it accepts has it as its local address, so none asks the kernel (~4 us each).
        self.local_address: tuple[str, int] | None = None
        self._loop: tuple[int, int, asyncio.AbstractEventLoop] | None = None  # see event_loop
        # See task_done: the set, and its discard method.
        self._discard: (
            tuple[set[asyncio.Task[None]], Callable[[asyncio.Task[None]], None]] | None
        ) = None
        self._config: tuple[Config, _ConfigValues] | None = None  # see from_config

    def from_config(self, config: Config) -> _ConfigValues:
        """What a protocol takes from uvicorn's `config` (loaded on first use): its app, ws
        protocol class, root path, ASGI version, concurrency limit and keep-alive timeout,
        remembered for the config last asked about."""
        cached = self._config
        if cached is None or cached[0] is not config:
            if not config.loaded:
                config.load()
            values = (
                config.loaded_app,
                config.ws_protocol_class,
                config.root_path,
                config.asgi_version,
                config.limit_concurrency,
                config.timeout_keep_alive,
            )
            self._config = cached = (config, values)
        return cached[1]

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop (call from it), remembered per thread and process: asyncio
        looks it up with a getpid() per call on Python 3.11 (a fork, below, forgets it)."""
        cached = self._loop
        thread = threading.get_ident()
        if cached is None or cached[0] != thread or cached[1] != _forks[0]:
            loop = asyncio.get_running_loop()
            self._loop = cached = (thread, _forks[0], loop)
        return cached[2]

    def admit(self, client: str) -> str | None:
        """Count a new connection from `client`, or say why it is refused."""
        if self.n_connections >= self.max_connections:
            return "too_many_connections"
        held = self.per_client.get(client, 0)
        if held >= self.max_per_client:
            return "too_many_client_connections"
        self.n_connections += 1
        self.per_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        """Forget a connection counted by `admit`."""
        self.n_connections -= 1
        held = self.per_client.get(client, 1) - 1
        if held > 0:
            self.per_client[client] = held
        else:
            self.per_client.pop(client, None)

    def task_done(self, tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
        """`tasks.discard`, made once for the server's set of request tasks."""
        if self._discard is None or self._discard[0] is not tasks:
            self._discard = (tasks, tasks.discard)
        return self._discard[1]

    def refused(self, reason: str) -> None:
        """Count one refusal."""
        self.metrics.rejections.labels(reason).inc()


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing; carries the answer."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _response(status: int, message: str, code: str, retry_after_s: int | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = error_body(message, kind, code)
    phrase = http.HTTPStatus(status).phrase
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Pipeline(list[Any]):
    """The part of a deque uvicorn's pipeline queue uses (`appendleft`, `pop`, truth), on a
    list: requests are queued at the front and taken from the back, first in first out."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


# The pipeline of every connection that has had no pipelined request (never added to).
_NO_PIPELINE = _Pipeline()


# The writable event of every connection whose writes are not paused: shared, set, never
# cleared (`_FlowControl`).
_WRITABLE = Flag()
_WRITABLE.set()


class _FlowControl(FlowControl):
    """uvicorn's flow control with a `Flag` for its writable event (an asyncio.Event holds a
    760-byte deque; see unbroken._flag): the shared set `_WRITABLE` while writes flow, one of
    its own only while they are paused (48 bytes less per live answer)."""

    # The direct body of the response the connection runs now (`_start_asgi_task`): a
    # pause is reported to it (`DirectBody.changed`), whose writes check one flag while
    # none happened. Only that response writes (a pipelined one starts after it ends).
    body: DirectBody | None = None

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = _WRITABLE  # type: ignore[assignment]  # same interface

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            self._is_writable_event = Flag()  # type: ignore[assignment]  # unset: `drain` waits
            if self.body is not None:
                self.body.changed()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            paused = self._is_writable_event
            self._is_writable_event = _WRITABLE  # type: ignore[assignment]  # same interface
            paused.set()


def _address(info: Any) -> tuple[str, int | None] | None:
    """A socket name as uvicorn puts it in the scope (`protocols.utils.get_*_addr`)."""
    if isinstance(info, tuple):
        return (str(info[0]), int(info[1]))
    if isinstance(info, str):
        return (info, None)
    return None


class _Cycle(RequestResponseCycle):
    """uvicorn's request cycle, made from its protocol (`GuardedProtocol`) with its start
    values that are the same for every request at the class level (read as uvicorn reads
    them, set on the instance when they change), and with `take_body`."""

    logger = _ERROR_LOG
    access_logger = _ACCESS_LOG
    more_body = True
    response_started = False
    chunked_encoding: bool | None = None
    expected_content_length = 0

    def __init__(
        self,
        protocol: GuardedProtocol,
        scope: HTTPScope,
        message_event: Flag,
        keep_alive: bool,
    ) -> None:
        # uvicorn's __init__ (as of 0.55) with the protocol's values, less the above.
        self.scope = scope
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.access_log = protocol.access_log
        self.default_headers = protocol.server_state.default_headers
        # uvicorn's asyncio.Event costs a 760-byte deque per request (unbroken._flag).
        self.message_event = message_event  # type: ignore[assignment]  # the same interface
        # The protocol itself (its `__call__`), not a bound method held by each request's
        # cycle (64 bytes per live answer; bench/stream_memory.py).
        self.on_response = protocol
        # Read for every relayed chunk (gateway/direct.py): the instance's own, which is
        # read faster than a class attribute.
        self.disconnected = False
        self.response_complete = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = protocol.expect_100_continue
        self.body = bytearray()

    def take_body(self) -> bytes | None:
        """The whole request body, taken as `receive()` takes it, when `receive()` would
        return it at once (the request is all in, nothing else to say): None otherwise.
        For a reader of the whole body (gateway/asgi.py `Exchange.read_body`): no
        coroutine and no message made for it."""
        if (
            self.more_body
            or self.waiting_for_100_continue
            or self.disconnected
            or self.response_complete
            or not self.message_event.is_set()
        ):
            return None
        self.flow.resume_reading()
        self.message_event.clear()
        body = bytes(self.body)
        self.body = bytearray()
        return body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under a `Guard` (see the theory of operation); it also
    exposes the transport in the scope, so a slow client can be cut at once."""

    guard: Guard

    # The guard's own state in slots: uvicorn's ~28 attributes fill the instance dict, and
    # past 30 keys CPython turns a split (shared-keys) dict into a combined one of ~1.6 KB
    # per connection (bench/stream_memory.py, tracemalloc).
    __slots__ = (
        "_closed",
        "_counted",
        "_deadline",
        "_eager",
        "_head_bytes",
        "_hooks",
        "_idle",
        "_parsing",
        "_phase",
        "_refusal",
        "_timer",
        "url",
    )

    # uvicorn's per-connection attributes whose start values are the same for every
    # connection (see `__init__`).
    logger = _ERROR_LOG
    access_logger = _ACCESS_LOG
    parser: httptools.HttpRequestParser = None  # type: ignore[assignment]  # see data_received
    timeout_keep_alive_task: TimerHandle | None = None
    transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
    flow: _FlowControl = None  # type: ignore[assignment]  # set by connection_made
    server: tuple[str, int | None] | None = None
    client: tuple[str, int] | None = None
    scheme: Literal["http", "https"] | None = None
    # Pipelined requests wait in a list of their own (rarely any; a deque's first block
    # was ~760 bytes per connection), made for the first.
    pipeline: deque[tuple[RequestResponseCycle, Any]] = _NO_PIPELINE  # type: ignore[assignment]  # the deque methods uvicorn uses
    scope: HTTPScope = None  # type: ignore[assignment]  # set per request
    headers: list[tuple[bytes, bytes]] = None  # type: ignore[assignment]  # set per request
    expect_100_continue = False
    cycle: RequestResponseCycle = None  # type: ignore[assignment]  # set per request
    # The config, server state and lifespan state whose values the class holds (the first
    # a protocol was made for: a process serves one), see `_make_for`.
    _made_for: tuple[Config, ServerState, dict[str, Any]] | None = None
    _reset_contextvars = False
    _http_entry: Any = None
    _asgi_info: ASGIVersions  # the scope's `asgi` (`_make_for`)
    _task_done: Callable[[asyncio.Task[None]], None]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's __init__ (as of 0.55), with what is the same for every connection not
        # set per connection: the start values below at the class level (read as uvicorn
        # reads them, set on the instance when they change), and the config's and the
        # server's values too (`_made_for`). The loop is looked up once per thread
        # (`Guard.event_loop`): uvicorn's server makes protocols without it, and asyncio's
        # lookup makes a getpid() system call per connection on Python 3.11.
        made = self._made_for
        if (
            made is None
            or made[0] is not config
            or made[1] is not server_state
            or made[2] is not app_state
        ):
            self._make_for(config, server_state, app_state)
        self.loop = _loop or self.guard.event_loop()
        # Per connection, as uvicorn: a handler added while serving is used.
        self.access_log = _ACCESS_LOG.hasHandlers()
        self._phase = Phase.HEAD
        self._timer: TimerHandle | None = None
        self._deadline = 0.0  # of the phase's timer (loop time)
        self._idle = False  # between a response and the next request's first byte
        self._head_bytes = 0
        self._counted: str | None = None
        self._closed = False
        self._refusal: _Refusal | None = None
        self._hooks: CycleHooks | None = None  # those of the latest request
        self._parsing = False  # a request's message has begun and not completed
        # The request task made by the read being parsed, started when the read is parsed
        # (see `data_received`).
        self._eager: EagerStart[None] | None = None

    def _make_for(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any]
    ) -> None:
        """Set uvicorn's attributes of `config` and the server (its config's values taken
        once, `Guard.from_config`): at the class level for the first config and states a
        protocol is made for, on the instance for any other."""
        (app, ws_protocol_class, root_path, asgi_version, limit_concurrency, keep_alive) = (
            self.guard.from_config(config)
        )
        target: Any = self
        if type(self)._made_for is None:
            target = type(self)
            target._made_for = (config, server_state, app_state)
        target.config = config
        target.app = app
        target.ws_protocol_class = ws_protocol_class
        target.root_path = root_path
        target.asgi_version = asgi_version
        target._asgi_info = _ASGI_INFO.get(asgi_version) or {
            "version": asgi_version,
            "spec_version": "2.3",
        }
        target.limit_concurrency = limit_concurrency
        target.app_state = app_state
        target.timeout_keep_alive = keep_alive
        target.server_state = server_state
        target.connections = server_state.connections
        target.tasks = server_state.tasks
        target._reset_contextvars = config.reset_contextvars
        # The app's own entry of HTTP requests, when it has one (`_start_asgi_task`).
        target._http_entry = getattr(app, "asgi_http", None)
        target._task_done = self.guard.task_done(server_state.tasks)

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows the type too
        # uvicorn's connection_made, leaner (one socket lookup for both addresses, the flow
        # control made with its Flag at once), then the guard's admission.
        self.connections.add(self)
        self.transport = transport
        self.flow = _FlowControl(transport)
        if self.client is not None and self.guard.local_address is not None:
            # Both addresses known (`accepted_from`, the listener's): no socket object
            # made by the loop, no getpeername() system call.
            self.server = self.guard.local_address
        elif (sock := transport.get_extra_info("socket")) is not None:
            self.server = self.guard.local_address or _address(sock.getsockname())
            try:
                peer = sock.getpeername()
            except OSError:  # as uvicorn: seen with uvloop on a unix socket
                peer = None
            # The host's str shared by the connections from it (a proxy's, a load
            # balancer's): ~60 bytes less per connection (interned strs are freed with
            # their last reference).
            self.client = (
                (sys.intern(str(peer[0])), int(peer[1])) if isinstance(peer, tuple) else None
            )
        else:
            self.server = get_local_addr(transport)
            self.client = get_remote_addr(transport)
        self.scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        if self.logger.isEnabledFor(TRACE_LOG_LEVEL):  # cached by logging; no call to log()
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)
        client = self.client[0] if self.client else ""
        reason = self.guard.admit(client)
        if reason is not None:
            self.guard.refused(reason)
            who = "the gateway" if reason == "too_many_connections" else "this client address"
            self._refuse(503, f"{who} has too many open connections; retry later", reason, 1)
            return
        self._counted = client
        self._set_deadline(self.guard.head_timeout_s)

    def accepted_from(self, peer: Any) -> None:
        """The client's address as `accept` returned it (gateway/accept.py), before
        `connection_made`; the host's str interned as in `connection_made`."""
        # (An IP socket's peer: a str and an int, as `connection_made` makes them.)
        self.client = (_intern(peer[0]), peer[1]) if type(peer) is tuple else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted is not None:
            self.guard.release(self._counted)
            self._counted = None
        self._closed = True
        super().connection_lost(exc)
        self._changed()
        self._lost()

    def _changed(self) -> None:
        """The running response is done (complete, client gone, refused): its direct body
        checks its cycle again at its next write (`DirectBody.changed`), and finds it
        done for good, so the flow control lets it go (no reference cycle through the body
        and its cycle left for the garbage collector)."""
        flow = self.flow
        if flow.body is not None:
            flow.body.changed()
            flow.body = None

    def _lost(self) -> None:
        hooks = self._hooks
        if hooks is not None and hooks.cycle.disconnected:
            hooks.lost()

    def _set_deadline(self, delay_s: float) -> None:
        """The phase's timer runs out `delay_s` from now. One timer per connection, moved
        lazily: a later deadline is picked up when the armed timer fires (a call_later and a
        cancel per request read cost ~2 us, and the head, body and renewals made 3 each)."""
        deadline = self.loop.time() + delay_s
        self._deadline = deadline
        if self._timer is None or self._timer.when() > deadline:
            self._disarm()
            self._timer = self.loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self._phase is Phase.APP:
            # A request the app has had for a head timeout: a long answer, most likely.
            # Its parser, between messages, is not needed until the client sends again
            # (`data_received` makes a new one): ~920 bytes less per live answer
            # (bench/stream_memory.py), and no parser made per short request.
            if not self._parsing:
                self.parser = None  # type: ignore[assignment]  # made again by data_received
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._expired)
        elif self._idle:
            # uvicorn's keep-alive timeout: an idle connection is closed without a word.
            if not self.transport.is_closing():
                self.transport.close()
        elif self._phase is Phase.HEAD:
            self._head_timeout()
        else:
            self._body_timeout()

    def streaming_started(self) -> None:
        """A streamed answer's head is out (`CycleHooks.start_now`): the request's parser,
        between messages, is not needed until the client sends again (`data_received`
        makes a new one), nor the phase's timer, moot in APP (the response's end arms the
        keep-alive timer): both go now, as when the head timer finds a long answer
        (`_expired`). Why not at the timer only: let go all at once seconds later, when no
        new connection takes their memory again, they stayed in the process as free memory
        (~0.5 KB a parser, and the timer's handle; bench/stream_memory.py); let go as each
        answer starts, the next connections' parsers and timers reuse it."""
        if self._phase is Phase.APP and not self._parsing and not self._closed:
            self.parser = None  # type: ignore[assignment]  # made again by data_received
            self._disarm()

    def _refuse(
        self, status: int, message: str, code: str, retry_after_s: int | None = None
    ) -> None:
        """Answer with one JSON error (unless a response has started) and close."""
        if self._closed:
            return
        self._closed = True
        self._disarm()
        cycle: RequestResponseCycle | None = self.cycle  # None before the first request
        # No response in progress: none yet, or the previous request's is whole (a slow
        # head on a kept-alive connection gets its 408 too).
        if cycle is None or not cycle.response_started or cycle.response_complete:
            self.transport.write(_response(status, message, code, retry_after_s))
        if cycle is not None:
            # The app sees a disconnect, and its writes go nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
            self._changed()
            self._lost()
        self.transport.close()

    # -- timers ------------------------------------------------------------------------------

    def _head_timeout(self) -> None:
        self.guard.refused("head_timeout")
        self._refuse(
            408,
            f"the request head did not arrive within {self.guard.head_timeout_s:g} s",
            "request_timeout",
        )

    def _body_timeout(self) -> None:
        if self.flow.read_paused:
            # The app is not reading yet; the client cannot be blamed for waiting.
            self._set_deadline(self.guard.body_timeout_s)
            return
        self.guard.refused("body_timeout")
        self._refuse(
            408,
            f"the request body stalled for {self.guard.body_timeout_s:g} s",
            "request_timeout",
        )

    # -- data --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._unset_keepalive_if_required()
        if self._idle:
            # The first bytes of the next head: the head timer runs from here.
            self._idle = False
            self._set_deadline(self.guard.head_timeout_s)
        elif self._phase is Phase.HEAD and self._timer is None:
            self._set_deadline(self.guard.head_timeout_s)
        parser: httptools.HttpRequestParser | None = self.parser
        if parser is None:
            # None yet, or dropped between messages (`_expired`): a new one is the same
            # state between messages.
            parser = self.parser = httptools.HttpRequestParser(self)
            parser.set_dangerous_leniencies(lenient_data_after_close=True)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._start_eager()
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            # Otherwise (no WebSocket implementation) the request goes on as plain HTTP.
            return
        except httptools.HttpParserCallbackError:
            refusal, self._refusal = self._refusal, None
            if refusal is not None:
                self.guard.refused(refusal.code)
                self._refuse(refusal.status, refusal.message, refusal.code)
                self._start_eager()
                return
            self.guard.refused("bad_request")
            self._refuse(400, "malformed HTTP request", "bad_request")
            self._start_eager()
            return
        except httptools.HttpParserError as exc:
            self.guard.refused("bad_request")
            self._refuse(400, f"malformed HTTP request: {exc}"[:160], "bad_request")
            self._start_eager()
            return
        self._after_read(len(data))
        self._start_eager()

    def _start_eager(self) -> None:
        """Run the first step of the request task this read made, now: a request whose
        body came with its head is validated, admitted and sent upstream in this loop turn
        (gateway/eager.py), not in the task's first turn. Only once the read is parsed
        (httptools reports the head before the body) and its timer set."""
        eager = self._eager
        if eager is not None:
            self._eager = None
            eager.step_now()

    def _after_read(self, n_bytes: int) -> None:
        # The timer follows the phase a read ended in (the parser's callbacks only move the
        # phase): a whole request in one read arms nothing more.
        if self._closed:
            return
        if self._phase is Phase.HEAD:
            # Bytes of a head still incomplete: httptools buffers the header being read,
            # and `on_header` the fields so far (their bytes counted at the head's end).
            self._head_bytes += n_bytes
            if self._head_bytes > self.guard.max_head_bytes:
                self._too_large_head()
        elif self._phase is Phase.BODY:
            # A piece of body (or the head's end): the body timer starts over.
            self._set_deadline(self.guard.body_timeout_s)
        # In APP the timer stays armed and does nothing when it fires: the response's end
        # moves it on as the keep-alive timer.

    def _too_large_head(self) -> None:
        self.guard.refused("header_too_large")
        self._refuse(
            431,
            f"the request head exceeds the gateway's limit of {self.guard.max_head_bytes} bytes",
            "header_too_large",
        )

    def _stop(self, status: int, message: str, code: str) -> _Refusal:
        # httptools turns an exception raised in a callback into HttpParserCallbackError;
        # the refusal is kept here for data_received to answer with.
        self._refusal = _Refusal(status, message, code)
        return self._refusal

    # The parser callbacks below are uvicorn's (as of 0.55) merged with the guard's counts in
    # one call each, and `on_headers_complete` makes the cycle with its Flag, direct body and
    # hooks at once (no asyncio.Event made to be replaced, no second scope lookup).

    def on_message_begin(self) -> None:
        self._parsing = True
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {
            "type": "http",
            # One dict per ASGI version, shared (the app reads it): 184 bytes a request less.
            "asgi": self._asgi_info,
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]  # set by connection_made
            "root_path": self.root_path,
            "headers": self.headers,
            "extensions": {TRANSPORT_EXTENSION: self.transport},  # type: ignore[dict-item]  # any values
            # Set by on_headers_complete; here so the dict is made at its final size (no
            # resize and copy when they are set).
            "method": "",
            "path": "",
            "raw_path": b"",
            "query_string": b"",
        }
        # The lifespan's state, copied for each request as uvicorn does, only when the
        # lifespan set any (ASGI: optional): no empty dict held by every live answer's
        # scope (64 bytes; the gateway's lifespan sets none).
        if self.app_state:
            self.scope["state"] = self.app_state.copy()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        # Counted against the head's limit here, not in a call of its own.
        n = self._head_bytes = self._head_bytes + len(url)
        if n > self.guard.max_head_bytes:
            raise self._head_too_large()
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Kept as given: `_fields` counts their bytes, lowers and strips them all at once,
        # in C (~15 bytecodes a header less). Their number is bounded here: a flood of
        # tiny fields in one read is refused at the first one too many, not listed whole.
        headers = self.headers
        if len(headers) >= self.guard.max_headers:
            raise self._too_many_fields()
        headers.append((name, value))

    def _fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The head's fields as uvicorn keeps them (names lowered; values without the
        trailing whitespace that llhttp keeps and RFC 9110 section 5.5 excludes), in place,
        once their bytes are counted against the head's limit; `Expect: 100-continue`
        noted."""
        names, values = zip(*fields, strict=True)
        # Counted against the head's limit here, not in a call of its own.
        n = self._head_bytes = (
            self._head_bytes + sum(map(len, names)) + sum(map(len, values)) + 4 * len(fields)
        )
        if n > self.guard.max_head_bytes:
            raise self._head_too_large()
        # (A name is a token: no newline in it.)
        lowered = b"\n".join(names).lower().split(b"\n")
        stripped = list(map(bytes.rstrip, values, repeat(b" \t")))
        if b"expect" in lowered:
            for name, value in zip(lowered, stripped, strict=True):
                if name == b"expect" and value.lower() == b"100-continue":
                    self.expect_100_continue = True
        fields[:] = zip(lowered, stripped, strict=True)

    def _too_many_fields(self) -> _Refusal:
        return self._stop(
            431,
            f"the request has more than {self.guard.max_headers} header fields",
            "too_many_headers",
        )

    def _head_too_large(self) -> _Refusal:
        return self._stop(
            431,
            f"the request head exceeds the gateway's limit of {self.guard.max_head_bytes} bytes",
            "header_too_large",
        )

    def on_headers_complete(self) -> None:
        if self.headers:
            self._fields(self.headers)
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise self._stop(
                505 if version != "0.9" else 400,
                f"HTTP/{version} is not supported; send HTTP/1.1 requests",
                "unsupported_http_version",
            )
        self._phase = Phase.BODY
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]  # an HTTP scope
        scope["method"] = parser.get_method().decode("ascii")
        if version != "1.1":
            scope["http_version"] = version
        if parser.should_upgrade() and self._should_upgrade():
            return  # data_received hands the connection to the WebSocket protocol
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path = self.root_path
        if root_path:
            path = root_path + path
            raw_path = root_path.encode("ascii") + raw_path
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = parsed_url.query or b""
        app: Any = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing: RequestResponseCycle | None = self.cycle  # None before the first
        cycle = self.cycle = _Cycle(
            self, self.scope, Flag(), version != "1.0" and parser.should_keep_alive()
        )
        # The fast path of streamed answers (gateway/direct.py) and the response hooks.
        extensions = scope["extensions"]
        direct = extensions[DIRECT_EXTENSION] = DirectBody(cycle)
        self._hooks = extensions[RESPONSE_EXTENSION] = CycleHooks(cycle)
        if existing is None or existing.response_complete:
            # Pauses go to the direct body of the response that runs now (a pipelined
            # one's when it starts: `on_response_complete`).
            self.flow.body = direct
            # The request's ASGI task: its first step runs once this read is parsed.
            self._start_asgi_task(cycle, app)
        else:
            # A pipelined request waits for the one before it.
            self.flow.pause_reading()
            pipeline: Any = self.pipeline
            if pipeline is _NO_PIPELINE:
                pipeline = self.pipeline = _Pipeline()  # type: ignore[assignment]  # see `pipeline`
            pipeline.appendleft((cycle, app))

    def on_body(self, body: bytes) -> None:
        # uvicorn's, with the cycle looked up once.
        if self.parser.should_upgrade() and self._should_upgrade():
            return  # (no cycle: see on_headers_complete)
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._phase = Phase.APP  # data_received stops the timer
        self._parsing = False
        # uvicorn's, with the cycle looked up once.
        if self.parser.should_upgrade() and self._should_upgrade():
            return  # (no cycle: see on_headers_complete)
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn's, with one `tasks.discard` bound method for every request (uvicorn made
        # one a request, held by the task for its life: 72 bytes per live answer).
        if self._reset_contextvars:
            super()._start_asgi_task(cycle, app)
            return
        if app is self.app and self._http_entry is not None:
            # The app's own entry of HTTP requests (gateway/app.py): uvicorn's run_asgi
            # below, but this app's live answer's reader may end the task early and
            # resume in a new one (gateway/detach.py): offered only to it (a middleware
            # in between would see its call end early).
            app = self._http_entry
            cycle.scope["extensions"][DETACH_EXTENSION] = True  # type: ignore[assignment]  # any values
        # Scheduled as uvicorn schedules it; the read that made it runs its first step when
        # parsed (`_start_eager`). A request started later (a pipelined one, when the one
        # before it ends) just waits for its turn.
        task, self._eager = eager_task(self.loop, run_asgi(cycle, app))
        task.add_done_callback(self._task_done)
        self.tasks.add(task)

    def resume_task(
        self, cycle: RequestResponseCycle, detached: Detached, context: contextvars.Context
    ) -> None:
        """Run the rest of a detached request (gateway/detach.py) in a new request task, in
        the request's `context`."""
        task = self.loop.create_task(resume_asgi(cycle, detached), context=context)
        task.add_done_callback(self.guard.task_done(self.tasks))
        self.tasks.add(task)

    def __call__(self) -> None:
        """The cycle's `on_response` (see `on_headers_complete`)."""
        self.on_response_complete()

    def on_response_complete(self) -> None:
        # uvicorn's, with the connection's one timer as the keep-alive timer: left armed
        # since the head, it is moved, not re-made (a call_later and a cancel less a request).
        self._changed()
        self._phase = Phase.HEAD
        self._head_bytes = 0
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        flow = self.flow
        flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            # Pauses go to the direct body of the response that runs now (set in
            # on_headers_complete).
            flow.body = cycle.scope["extensions"][DIRECT_EXTENSION]  # type: ignore[assignment]  # a DirectBody
            self._start_asgi_task(cycle, app)
            self._eager = None  # it starts in its turn (this may be inside another task)
        else:
            self._idle = True
            self._set_deadline(self.timeout_keep_alive)

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to uvicorn's WebSocket protocol; it stays counted against the
        caps until it closes, and our head and body timers stop here."""
        self._disarm()
        self._closed = True
        super().handle_websocket_upgrade()
        counted, self._counted = self._counted, None
        if counted is None:
            return
        ws = self.transport.get_protocol()
        lost = ws.connection_lost
        guard = self.guard

        def connection_lost(exc: Exception | None) -> None:
            guard.release(counted)
            lost(exc)

        ws.connection_lost = connection_lost  # type: ignore[method-assign]  # count the close

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400, as our JSON error."""
        self.guard.refused("bad_request")
        self._refuse(400, "malformed HTTP request", "bad_request")


# Response header names as given (the gateway's own, a few dozen) -> lowered, once checked
# for forbidden characters: `_start_bytes` renders them with no check and no `lower()`.
# Names that mean something to the response's framing are never in it.
_PLAIN_NAMES: dict[bytes, bytes] = {}
_MAX_PLAIN_NAMES = 256
_MEANT = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def _start_bytes(cycle: RequestResponseCycle, start: Message, body: Message) -> bytes:
    """The bytes uvicorn's `RequestResponseCycle.send` writes for `start` then `body` (more
    to come) when both go out at once, with the cycle's response state set as its send
    sets it. Rendered here, not through two sends into a held transport (two coroutines
    driven by hand, a regex search per header name and value): the same checks, one search
    over all names not seen before (`_PLAIN_NAMES`) and one over all values.

    Raises:
        RuntimeError: as uvicorn's send, for a bad header or body; nothing is changed then.
    """
    status: int = start["status"]
    pairs = cycle.default_headers + list(start.get("headers", ()))
    chunked = cycle.chunked_encoding
    length = cycle.expected_content_length
    keep_alive = cycle.keep_alive
    has_close = False
    if pairs:
        # The common head, whole: every name checked, lowered and rendered at once, in C
        # (~20 bytecodes a header less than the loop below). Only when no name can mean
        # anything to the framing (a substring test, so a name that merely contains one
        # takes the loop too, which handles it as before).
        names, values_ = zip(*pairs, strict=True)
        all_lower = b"\n".join(names).lower()
        if not (
            b"content-length" in all_lower
            or b"transfer-encoding" in all_lower
            or b"connection" in all_lower
        ):
            if HEADER_RE.search(b"".join(names)):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(b"\t".join(values_)):
                raise RuntimeError("Invalid HTTP header value.")
            content = [
                STATUS_LINE[status],
                b"".join(map(_LINE.__mod__, zip(all_lower.split(b"\n"), values_, strict=True))),
            ]
            return _start_rest(cycle, status, content, body, chunked, length, keep_alive, False)
    content = [STATUS_LINE[status]]
    values = []
    new_names: list[tuple[bytes, bytes]] = []  # (as given, lowered)
    length_value: bytes | None = None  # a Content-Length, read once the values are checked
    for name, value in pairs:
        values.append(value)
        lowered = _PLAIN_NAMES.get(name)
        if lowered is not None:  # a name seen before, checked, of no meaning to HTTP here
            content += (lowered, b": ", value, b"\r\n")
            continue
        raw, name = name, name.lower()
        new_names.append((raw, name))
        if name == b"content-length" and chunked is None:
            length_value = value
            chunked = False
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            length_value = None
            length = 0
            chunked = True
        elif name == b"connection" and b"close" in [
            token.lower().strip() for token in value.split(b",")
        ]:
            keep_alive = False
            has_close = True
        content += (name, b": ", value, b"\r\n")
    # A forbidden character in any name (or value) is one in their concatenation (tab, the
    # values' separator, is allowed in a value). Names seen before were checked then.
    if new_names:
        if HEADER_RE.search(b"".join([raw for raw, _ in new_names])):
            raise RuntimeError("Invalid HTTP header name.")
        for raw, name in new_names:
            if name not in _MEANT and len(_PLAIN_NAMES) < _MAX_PLAIN_NAMES:
                _PLAIN_NAMES[raw] = name
    if HEADER_VALUE_RE.search(b"\t".join(values)):
        raise RuntimeError("Invalid HTTP header value.")
    if length_value is not None:
        length = int(length_value.decode())
    return _start_rest(cycle, status, content, body, chunked, length, keep_alive, has_close)


# One header line of a rendered head.
_LINE = b"%s: %s\r\n"


def _start_rest(
    cycle: RequestResponseCycle,
    status: int,
    content: list[bytes],
    body: Message,
    chunked: bool | None,
    length: int,
    keep_alive: bool,
    has_close: bool,
) -> bytes:
    """`_start_bytes` once the header lines are in `content`: the framing's lines, the
    first body part, the cycle's response state, the access log line."""
    if not keep_alive and not has_close:
        content.append(b"connection: close\r\n")
    head_request = cycle.scope["method"] == "HEAD"
    if chunked is None and not head_request and status not in (204, 304):
        chunked = True
        content.append(b"transfer-encoding: chunked\r\n")
    content.append(b"\r\n")
    data: bytes = body.get("body", b"")
    if head_request:
        length = 0
    elif chunked:
        if data:
            content += (b"%x\r\n" % len(data), data, b"\r\n")
    else:
        if len(data) > length:
            raise RuntimeError("Response content longer than Content-Length")
        length -= len(data)
        content.append(data)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.chunked_encoding = chunked
    cycle.expected_content_length = length
    cycle.keep_alive = keep_alive
    if cycle.access_log:
        scope = cycle.scope
        cycle.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            status,
        )
    return b"".join(content)


class CycleHooks:
    """What the gateway's protocol offers one request's app beyond ASGI (the scope extension
    `RESPONSE_EXTENSION`, gateway/asgi.py `ResponseHooks`).

    * `start_with` sends the response's start and its first body part in one write, the
      bytes uvicorn's own `send` would write for them (`_start_bytes`; one write syscall
      less per answer). Only for a body with more to come (ending the response may close
      the transport, which must follow the bytes), and only while the transport takes
      writes; otherwise through uvicorn's `send`. `start_now` does the same from a
      callback (the producer's first append).
    * `watch` calls back when the client disconnects (what `receive()` would return as
      `http.disconnect`), so a relay needs no task parked in `receive()` to notice.

    Args:
        cycle: uvicorn's `RequestResponseCycle` of the request (httptools protocol).
    """

    __slots__ = ("_watcher", "cycle")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        self._watcher: LostWatcher | None = None

    def _direct(self, body: Message) -> bool:
        """Whether `start` and `body` may be written at once now: the response not started,
        the client connected and draining, more body to come."""
        cycle = self.cycle
        return not (
            cycle.response_started
            or cycle.disconnected
            or cycle.flow.write_paused
            or cycle.transport.is_closing()
            or body.get("more_body") is not True
        )

    async def start_with(self, start: Message, body: Message) -> None:
        """Send `start` then `body` as uvicorn's ASGI `send` would, in one write."""
        if self.start_now(start, body):
            return
        cycle = self.cycle
        await cycle.send(start)  # type: ignore[arg-type]  # an ASGI message
        await cycle.send(body)  # type: ignore[arg-type]  # an ASGI message

    def start_now(self, start: Message, body: Message) -> bool:
        """`start_with` from a callback (no await): False, and nothing sent, unless
        uvicorn's `send` would write both at once now (see `_direct`).

        Raises:
            RuntimeError: as uvicorn's send, for a bad header or body (nothing sent).
        """
        if not self._direct(body):
            return False
        cycle = self.cycle
        data = _start_bytes(cycle, start, body)
        # While writes are held (an upstream read of several events), the head and first
        # events go out with the rest of the read, in the direct body's one write.
        direct: DirectBody | None = None
        if writes_held():
            direct = cycle.scope.get("extensions", _NO_EXTENSIONS).get(DIRECT_EXTENSION)  # type: ignore[assignment]  # set in `_start_asgi_task`
        if direct is not None:
            direct.write_raw(data)
        else:
            cycle.transport.write(data)
        protocol = cycle.on_response  # the connection's protocol (`on_headers_complete`)
        if isinstance(protocol, GuardedProtocol):
            protocol.streaming_started()
        return True

    def watch(self, watcher: LostWatcher) -> None:
        """Call `watcher.client_gone()` (once, from the loop) when the client is gone."""
        cycle = self.cycle
        # As `receive()` does before it waits: a paused read would not see the close.
        cycle.flow.resume_reading()
        if cycle.disconnected:
            asyncio.get_running_loop().call_soon(watcher.client_gone)
            return
        self._watcher = watcher

    def unwatch(self) -> None:
        """Stop watching (the relay ended)."""
        self._watcher = None

    def lost(self) -> None:
        """The protocol saw the client go (the cycle is marked disconnected)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.client_gone()


def guarded_protocol(guard: Guard) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (`http=`) for a gateway process under `guard`."""
    return type("GatewayHttpProtocol", (GuardedProtocol,), {"guard": guard, "__slots__": ()})


class LogLimiter(logging.Filter):
    """Lets at most `burst` records per (logger, message template) through in each
    `window_s`; the first record after a suppressed stretch says how many were dropped.

    Args:
        burst: records per window and template.
        window_s: the window.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self, burst: int = 10, window_s: float = 10.0, clock: Any = time.monotonic
    ) -> None:
        super().__init__()
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True to let `record` through."""
        if record.name == ACCESS_LOGGER:
            # One line per request by contract (operators count on it); its volume is the
            # traffic's, and `gateway.access_log = false` turns it off.
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self._window_s:
            dropped = int(state[2]) if state is not None else 0
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = [now, 1.0, 0.0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar messages suppressed)"
            return True
        if state[1] < self._burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


def install_log_limits(
    limiter: LogLimiter | None = None, names: Iterable[str] = FLOODABLE_LOGGERS
) -> LogLimiter:
    """Attach one `LogLimiter` to the floodable loggers and to the root logger's handlers
    (child loggers' records pass only through handlers); idempotent per logger."""
    limiter = limiter or LogLimiter()
    targets: list[logging.Filterer] = [logging.getLogger(n) for n in names]
    targets += logging.getLogger().handlers
    for target in targets:
        if not any(isinstance(f, LogLimiter) for f in target.filters):
            target.addFilter(limiter)
    return limiter
