"""One attempt of an answer over an unbroken gateway's `/v1/chat/ws`, without the I/O.

Theory of operation
-------------------
The drivers (`client/_ws.py`) own a WebSocket per route and header set, shared by every
answer of the client; frames are routed to answers by their `id`. For one attempt:

    create  ->  started (stream id)  ->  chunk*  ->  done | error
                  \\ the connection drops: reconnect, `resume` after the last event
                     held, and go on with the same attempt (no gap, no repeat)

A chunk frame becomes the SSE event the gateway's HTTP stream would carry (`id:` + `data:`)
and goes into the attempt's decoder, so timers, splicing, tool-call holding and the end
of the stream are judged exactly as for SSE. An `error` frame before the first chunk
(the gateway refused the request, or its upstream failed before any output) maps to the
status, hence the error class, that the gateway's HTTP answer carries for it
(`status_of`); after a chunk it is an error inside the stream, as a `data: {"error": ...}`
event is over SSE. A drop before `started` is a connection error (the
flow retries it); a refused `resume` ends the attempt as broken (the flow continues the
answer upstream). Imports core, errors, httpx and msgspec.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import httpx
import msgspec

from unbroken.client._common import AnswerRun
from unbroken.client._driver import USER_AGENT, Exchange
from unbroken.client._reconnect import DELAYS_S
from unbroken.core.attempt import Attempt
from unbroken.core.flow import AttemptOutcome
from unbroken.core.routes import Route
from unbroken.core.wire import ChatCompletionChunk
from unbroken.errors import (
    ConfigError,
    TimeoutPhase,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamStatusError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "WS_PATH",
    "Frame",
    "Lost",
    "WsAttempt",
    "check_transport",
    "decode_frame",
    "load_sockets",
    "socket_key",
    "status_of",
]

WS_PATH = "/chat/ws"
# The gateway's types and codes, and the status it answers them with over HTTP
# (gateway/problems.py, keys.py, limits.py): an error frame carries no status of its own.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "upstream_error": 502,
    "server_error": 500,
}
_CODE_STATUS = {
    "not_found": 404,
    "model_not_found": 404,
    "upstream_insufficient_balance": 503,
    "upstream_unavailable": 503,
    "store_unavailable": 503,
    "draining": 503,
    "stream_log_full": 507,
}
_ids = itertools.count(1)


class Frame(msgspec.Struct):
    """A server frame; `data` and `error` stay raw JSON (spliced, never re-encoded)."""

    type: str = ""
    id: str | None = None
    event: str = ""
    stream_id: str = ""
    data: msgspec.Raw = msgspec.Raw()  # empty when absent (a Raw cannot be optional)
    error: msgspec.Raw = msgspec.Raw()


_FRAME = msgspec.json.Decoder(Frame)


def decode_frame(message: str | bytes) -> Frame | None:
    """A frame, or None when the message is not one (it is then ignored)."""
    try:
        return _FRAME.decode(message)
    except msgspec.DecodeError:
        return None


class Lost(msgspec.Struct, frozen=True):
    """Put in an answer's queue when its connection closed; `socket` says which one (a
    late notice from a connection the answer already left is ignored)."""

    socket: object


def check_transport(transport: object, base: type) -> bool:
    """True for `transport="websocket"`, False for HTTP (`None`, `"http"`, an httpx
    transport of class `base`).

    Raises:
        ConfigError: anything else; the message names the bad value.
    """
    if transport is None or isinstance(transport, base) or transport in ("http", "sse"):
        return False
    if transport == "websocket":
        return True
    raise ConfigError(
        f"transport must be 'http' (the default), 'websocket' or an httpx "
        f"{base.__name__}, got {transport!r}"
    )


def load_sockets() -> ModuleType:
    """The WebSocket drivers (`client/_ws.py`), which need the `websockets` package.

    Raises:
        ConfigError: it is not installed; the message names the extra.
    """
    try:
        from unbroken.client import _ws
    except ImportError as exc:  # pragma: no cover - websockets is a dev dependency
        raise ConfigError(
            "transport='websocket' needs the websockets package: pip install 'unbroken[websocket]'"
        ) from exc
    return _ws


def socket_url(run: AnswerRun, route: Route) -> str:
    """The `ws://` / `wss://` URL of the route's `/v1/chat/ws` (with the default query)."""
    url = run.config.url(route, WS_PATH, beta=False)
    return str(url.copy_with(scheme="wss" if url.scheme == "https" else "ws"))


def socket_headers(run: AnswerRun, route: Route) -> dict[str, str]:
    """The upgrade request's headers: the route's and the caller's, and the key."""
    headers = {"User-Agent": USER_AGENT, **route.headers, **run.extra_headers}
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key}"
    return headers


def socket_key(url: str, headers: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Answers with equal keys share one connection."""
    return url, tuple(sorted((k.lower(), v) for k, v in headers.items()))


def status_of(error: Mapping[str, Any]) -> int:
    """The HTTP status the gateway gives the error object of an `error` frame."""
    code = error.get("code")
    if isinstance(code, str):
        if code in _CODE_STATUS:
            return _CODE_STATUS[code]
        if code.startswith("upstream_timeout"):
            return 504
    kind = error.get("type")
    return _TYPE_STATUS.get(kind, 500) if isinstance(kind, str) else 500


class WsAttempt:
    """One attempt's exchange over the socket (see the theory of operation above).

    The driver sends `create_frame()`, hands every frame of its id to `on_frame` (and the
    chunks it returns to the consumer) until `over`, calls `lost()` when the connection
    drops (True: reconnect and send `resume_frame()`), and ends with `ended(fired, now)`
    unless `outcome` was set (the attempt failed before it streamed).
    """

    __slots__ = (
        "_body",
        "attempt",
        "ex",
        "n_events",
        "n_reconnects",
        "outcome",
        "over",
        "resuming",
        "rid",
        "route",
        "server_ended",
        "stream_id",
    )

    def __init__(self, run: AnswerRun, attempt: Attempt) -> None:
        self.attempt = attempt
        self.ex = Exchange(run, attempt, read_s=None)
        self.route = attempt.plan.route
        self.rid = f"u{next(_ids)}"
        self._body = attempt.plan.body
        self.stream_id: str | None = None
        self.n_events = 0
        self.n_reconnects = 0  # in a row, without a chunk since
        self.resuming = False
        self.over = False
        # The gateway ended the answer (done or error): nothing to cancel there.
        self.server_ended = False
        self.outcome: AttemptOutcome | None = None

    # -- frames out ----------------------------------------------------------------------------

    def create_frame(self) -> bytes:
        """The `create` frame of this attempt."""
        return msgspec.json.encode({"type": "create", "id": self.rid, "body": self._body})

    def resume_frame(self) -> bytes:
        """The `resume` frame after the last event this attempt holds."""
        after = self.attempt.decoder.last_event_id or "0"
        self.attempt.decoder.reconnected()
        self.resuming = True
        return msgspec.json.encode(
            {"type": "resume", "id": self.rid, "stream_id": self.stream_id, "after": after}
        )

    def cancel_frame(self) -> bytes | None:
        """The `cancel` frame when the gateway may still be generating, else None."""
        if self.stream_id is None or self.server_ended:
            return None
        return msgspec.json.encode({"type": "cancel", "id": self.rid})

    # -- frames in -----------------------------------------------------------------------------

    def on_frame(self, frame: Frame, now: float) -> list[ChatCompletionChunk]:
        """One frame of this attempt; returns the chunks to show."""
        kind = frame.type
        if kind == "chunk" and frame.data:
            self.n_events += 1
            self.resuming = False
            self.n_reconnects = 0
            if self.ex.response is None:
                self._started(now)
            event = frame.event.encode()
            data = b"id: " + event + b"\ndata: " + bytes(frame.data) + b"\n\n"
            chunks = self.attempt.feed(data, now)
            if self.attempt.decoder.finished:
                self.over = True
            return chunks
        if kind == "started":
            self.stream_id = frame.stream_id or None
            self._started(now)
        elif kind == "done":
            self.server_ended = self.over = True
            return self.attempt.feed(b"data: [DONE]\n\n", now)
        elif kind == "error":
            self.server_ended = self.over = True
            raw = bytes(frame.error) or b"{}"
            if self.resuming:
                # The log cannot go on: the attempt ends broken, the flow decides.
                logger.debug("answer %s: resume refused: %s", self.rid, raw[:200])
                return []
            if self.n_events == 0:
                self._refused(raw, now)
                return []
            return self.attempt.feed(b'data: {"error":' + raw + b"}\n\n", now)
        return []

    def _started(self, now: float) -> None:
        headers = {"x-unbroken-gateway": "1"}
        if self.stream_id:
            headers["x-unbroken-stream-id"] = self.stream_id
        # No HTTP response exists: this stands for the upgrade's, so `stream.response`
        # and the attempt's bookkeeping read as for SSE.
        self.ex.streaming(httpx.Response(200, headers=headers, request=self.ex.request), now)

    def _refused(self, raw: bytes, now: float) -> None:
        try:
            error = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            error = {}
        status = status_of(error if isinstance(error, dict) else {})
        self.ex.streaming(httpx.Response(status, request=self.ex.request), now)
        self.outcome = self.ex.error_status(b'{"error":' + raw + b"}", now)

    # -- the connection ------------------------------------------------------------------------

    def lost(self, now: float) -> bool:
        """The connection dropped: True when the answer can be resumed on a new one; else
        the attempt is over (`outcome` is set when it never started)."""
        if self.over:
            return False
        if self.stream_id is None:
            logger.debug("answer %s: connection lost before it started", self.rid)
            self.failed(
                UpstreamConnectError(
                    f"the WebSocket to route {self.route.name!r} closed before the answer started",
                    kind="server_error",
                    route=self.route.name,
                ),
                now,
            )
            return False
        return True

    def next_delay(self) -> float | None:
        """The wait before the next reconnect, or None: out of tries (the gateway's delays
        of an SSE reconnect, `client._reconnect.DELAYS_S`)."""
        if self.n_reconnects >= len(DELAYS_S):
            return None
        delay = DELAYS_S[self.n_reconnects]
        self.n_reconnects += 1
        return delay

    def failed(self, error: UnbrokenError, now: float) -> AttemptOutcome:
        """The attempt failed before it streamed (no connection, a refused handshake)."""
        self.over = True
        attempt = self.attempt
        attempt.finish(now, timed_out=True)
        status = error.status_code if isinstance(error, UpstreamStatusError) else None
        self.outcome = self.ex.run.end_attempt(attempt, now, status_code=status, error=error)
        return self.outcome

    def ended(
        self, fired: TimeoutPhase | None, now: float
    ) -> tuple[list[ChatCompletionChunk], AttemptOutcome]:
        """The stream ended, broke or a timer fired: the last chunks and the outcome."""
        if self.ex.response is None:
            # A timer fired before `started`: as an HTTP attempt without headers.
            return [], self.ex.failed(None, now)
        return self.ex.ended(fired, now)
