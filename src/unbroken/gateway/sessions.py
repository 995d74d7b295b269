"""Conversation sessions over HTTP, for browser apps that should not hold the history:

    POST   /v1/sessions                  create   {"model"?, "system"?, "title"?}
    GET    /v1/sessions                  list the caller's sessions
    GET    /v1/sessions/{id}             one session and its messages (`live_stream_id`: the
                                         answer being streamed now, or null)
    PATCH  /v1/sessions/{id}             rename: {"title"}
    DELETE /v1/sessions/{id}             forget it
    POST   /v1/sessions/{id}/messages    {"content", "stream"?, "keep"?, any chat parameter}:
                                         answers (SSE or JSON, as /v1/chat/completions) and
                                         stores both turns once the answer is complete;
                                         `keep: N` answers after the first N stored messages
                                         only and replaces the rest (regenerate, edit)

A session belongs to the key that created it; other keys get 404, as if it did not exist.
The history is trimmed on every turn (core.window) to the context window of the route that
will serve the turn (its `context_tokens`, DeepSeek's 128K when unset), with estimates
calibrated per route on the prompt tokens that route reported for earlier turns.

The endpoints see the gateway through `SessionHost`, so this module does not import
gateway.app (which imports it).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import msgspec

from unbroken.core.routes import Route
from unbroken.core.window import (
    Calibration,
    estimate_message_tokens,
    messages_for_request,
    trim_to_budget,
)
from unbroken.core.wire import Answer, ChatCompletion
from unbroken.gateway.asgi import Exchange
from unbroken.gateway.keys import Caller, KeyRing
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import ChatRequest, decode_json, parse_chat_request
from unbroken.gateway.session_limits import (
    DEFAULT_PAGE,
    MAX_MESSAGES_PAGE,
    MAX_PAGE,
    SessionLimits,
    page_query,
    paged,
)
from unbroken.sessions.session import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_RESERVE_TOKENS,
    reply_message,
)
from unbroken.sessions.store import (
    AsyncSessionStore,
    MemorySessionStore,
    RedisSessionStore,
    SessionInfo,
    SessionNotFound,
    SQLiteSessionStore,
    default_sessions_path,
)
from unbroken.settings import Settings, data_home

__all__ = ["SESSIONS_PATH", "SessionEndpoints", "SessionHost", "open_session_store"]

SESSIONS_PATH = "/v1/sessions"
# The largest session message accepted: ~50K tokens; even as JSON escapes (12 bytes per
# character at worst) it stays under the default body limit, so it is a 400, never a 413.
MAX_CONTENT_CHARS = 200_000


class SessionHost(Protocol):
    """What the session endpoints need from the gateway (`gateway.app.Gateway` is one)."""

    @property
    def settings(self) -> Settings:
        """The gateway's settings."""

    @property
    def keys(self) -> KeyRing:
        """Who may call."""

    @property
    def models(self) -> Collection[str]:
        """The model names clients may ask for (`in` also answers for patterns)."""

    @property
    def route_names(self) -> frozenset[str]:
        """The configured route names (allowed in `fallbacks`)."""

    def check_draining(self) -> None:
        """Raise the 503 of a gateway that is shutting down."""

    def serving_route(self) -> Route:
        """The route the next answer would start on."""

    async def serve_chat(
        self,
        ex: Exchange,
        caller: Caller,
        request: ChatRequest,
        after: Callable[[ChatCompletion], Awaitable[None]] | None = None,
        session_id: str | None = None,
    ) -> None:
        """Admit, relay and book one chat request; `after` runs with the whole answer; a
        streamed answer's log is linked to `session_id`."""

    async def live_stream(self, session_id: str) -> str | None:
        """The stream id of the answer the session is getting now, if any."""


def open_session_store(spec: str) -> AsyncSessionStore:
    """The session store `gateway.sessions` names."""
    if spec == "memory":
        return AsyncSessionStore(MemorySessionStore())
    if spec == "sqlite":
        return AsyncSessionStore(SQLiteSessionStore(default_sessions_path(data_home())))
    if spec.startswith("sqlite:"):
        return AsyncSessionStore(SQLiteSessionStore(spec[len("sqlite:") :]))
    return AsyncSessionStore(RedisSessionStore(spec))


def _not_found(session_id: str) -> GatewayError:
    return GatewayError(
        404, f"no session {session_id[:80]!r}", type="not_found_error", code="session_not_found"
    )


def _info(info: SessionInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "session",
        "created": int(info.created_s),
        "updated": int(info.updated_s),
        "title": info.title,
        "model": info.model,
        "n_messages": info.n_messages,
    }


class _NewSession(msgspec.Struct, forbid_unknown_fields=True):
    model: str | None = None
    system: str | None = None
    title: str = ""


class _Rename(msgspec.Struct, forbid_unknown_fields=True):
    title: str


# The longest session title accepted.
MAX_TITLE_CHARS = 200


class SessionEndpoints:
    """The /v1/sessions handlers of one gateway."""

    def __init__(
        self, gateway: SessionHost, store: AsyncSessionStore, limits: SessionLimits
    ) -> None:
        self._gateway = gateway
        self.store = store
        self.limits = limits
        # Per route name: how far our token estimates are from that route's counts.
        self.calibrations: dict[str, Calibration] = {}

    async def aclose(self) -> None:
        """Release the store."""
        await self.store.aclose()

    async def handle(self, ex: Exchange, method: str, path: str) -> None:
        """Dispatch a request under /v1/sessions."""
        parts = [p for p in path[len(SESSIONS_PATH) :].split("/") if p]
        caller = await self._gateway.keys.identify(ex.header(b"authorization"))
        if not parts:
            if method == "POST":
                await self._create(ex, caller)
            elif method == "GET":
                page = page_query(ex.scope.get("query_string", b""), DEFAULT_PAGE, MAX_PAGE)
                infos = await self.store.list(owner=caller.id, limit=self._most_held)
                listed = paged([_info(i) for i in infos], [i.id for i in infos], page)
                await ex.respond_json(200, listed)
            else:
                raise _method(method, path, "GET, POST")
            return
        session_id = parts[0]
        if len(parts) == 1:
            if method == "GET":
                page = page_query(
                    ex.scope.get("query_string", b""), MAX_MESSAGES_PAGE, MAX_MESSAGES_PAGE
                )
                if page.after is not None and not (page.after.isascii() and page.after.isdigit()):
                    raise GatewayError(
                        400,
                        f"after must be a message index, got {page.after[:40]!r}",
                        code="invalid_value",
                        param="after",
                    )
                info, messages = await self._owned(caller, session_id)
                # Messages are paged by position: `after` is the index of the last one seen.
                listed = paged(messages, [str(i) for i in range(len(messages))], page)
                # The answer being streamed now, so a page reloaded mid-answer can follow it
                # (GET /v1/streams/{id}); null when none is.
                live = await self._gateway.live_stream(session_id)
                await ex.respond_json(
                    200,
                    {
                        **_info(info),
                        "messages": listed["data"],
                        "has_more": listed["has_more"],
                        "live_stream_id": live,
                    },
                )
            elif method == "DELETE":
                await self._owned(caller, session_id)
                await self.store.delete(session_id)
                await ex.respond_json(200, {"id": session_id, "object": "session", "deleted": True})
            elif method == "PATCH":
                await self._rename(ex, caller, session_id)
            else:
                raise _method(method, path, "GET, PATCH, DELETE")
            return
        if len(parts) == 2 and parts[1] == "messages":
            if method != "POST":
                raise _method(method, path, "POST")
            await self._message(ex, caller, session_id)
            return
        raise GatewayError(404, f"no such endpoint: {method} {path[:200]}", code="not_found")

    async def _owned(
        self, caller: Caller, session_id: str
    ) -> tuple[SessionInfo, list[dict[str, Any]]]:
        try:
            info, messages = await self.store.load(session_id)
        except SessionNotFound:
            raise _not_found(session_id) from None
        if info.owner != caller.id:
            raise _not_found(session_id)
        return info, messages

    @property
    def _most_held(self) -> int:
        # Creation races between instances can pass the per-key count by a little; a list
        # still reads a bounded number of sessions.
        return self.limits.per_key + MAX_PAGE

    async def _create(self, ex: Exchange, caller: Caller) -> None:
        raw = await ex.read_body(self._gateway.settings.gateway.max_body_bytes)
        try:
            body = msgspec.json.decode(raw or b"{}", type=_NewSession)
        except msgspec.DecodeError as exc:
            raise GatewayError(400, f"invalid session body: {exc}", code="invalid_body") from None
        models = self._gateway.models
        model = sorted(models)[0] if body.model is None else body.model
        if model not in models:
            raise GatewayError(
                400,
                f"unknown model {model!r}; served: {', '.join(sorted(models))}",
                code="model_not_found",
                param="model",
            )
        if body.system:
            self.limits.check_size([], [{"role": "system", "content": body.system}])
        held = await self.store.list(owner=caller.id, limit=self._most_held)
        await self.limits.check_create(caller, len(held), time.time())
        info = await self.store.create(model=model, title=body.title[:200], owner=caller.id)
        if body.system:
            await self.store.append(info.id, [{"role": "system", "content": body.system}])
        info, _ = await self.store.load(info.id)
        await ex.respond_json(201, _info(info))

    async def _rename(self, ex: Exchange, caller: Caller, session_id: str) -> None:
        raw = await ex.read_body(self._gateway.settings.gateway.max_body_bytes)
        try:
            body = msgspec.json.decode(raw or b"{}", type=_Rename)
        except msgspec.DecodeError as exc:
            raise GatewayError(400, f"invalid rename body: {exc}", code="invalid_body") from None
        title = " ".join(body.title.split())
        if len(title) > MAX_TITLE_CHARS:
            raise GatewayError(
                400,
                f"title must be at most {MAX_TITLE_CHARS} characters",
                code="invalid_value",
                param="title",
            )
        await self._owned(caller, session_id)
        await self.store.update(session_id, title=title)
        info, _ = await self._owned(caller, session_id)
        await ex.respond_json(200, _info(info))

    async def _message(self, ex: Exchange, caller: Caller, session_id: str) -> None:
        gateway = self._gateway
        gateway.check_draining()
        raw = await ex.read_body(gateway.settings.gateway.max_body_bytes)
        body = decode_json(raw)
        if not isinstance(body, dict):
            raise GatewayError(400, "the body must be a JSON object", code="invalid_body")
        request, store_turns = await self.prepare_message(caller, session_id, body)
        await gateway.serve_chat(ex, caller, request, after=store_turns, session_id=session_id)

    async def prepare_message(
        self, caller: Caller, session_id: str, body: dict[str, Any]
    ) -> tuple[ChatRequest, Callable[[ChatCompletion], Awaitable[None]]]:
        """The chat request of a session message (`body` as POSTed to
        `/v1/sessions/{id}/messages`; consumed) and the callback that stores both turns
        once the answer is whole. The WebSocket's session `create` uses it too.

        Raises:
            GatewayError: 400 for a bad body, 404 for a session the caller does not own,
                413 for a session grown too large.
        """
        gateway = self._gateway
        content = body.pop("content", None)
        if not isinstance(content, str) or not content or len(content) > MAX_CONTENT_CHARS:
            raise GatewayError(
                400,
                f"content must be a non-empty string of at most {MAX_CONTENT_CHARS} characters",
                code="invalid_value",
                param="content",
            )
        for reserved in ("messages",):
            if reserved in body:
                raise GatewayError(
                    400,
                    f"{reserved} is kept by the session; send only `content`",
                    code="invalid_value",
                    param=reserved,
                )
        keep = body.pop("keep", None)
        info, history = await self._owned(caller, session_id)
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= len(history):
                raise GatewayError(
                    400,
                    f"keep must be an integer from 0 to the {len(history)} stored messages",
                    code="invalid_value",
                    param="keep",
                )
            history = history[:keep]
        user = {"role": "user", "content": content}
        self.limits.check_size(history, [user])
        route = gateway.serving_route()
        calibration = self.calibrations.get(route.name, Calibration())
        trimmed = trim_to_budget(
            [*history, user], session_budget(route, body.get("max_tokens")), calibration=calibration
        ).messages
        estimate = sum(estimate_message_tokens(m) for m in trimmed)
        messages = messages_for_request(
            trimmed, is_deepseek=route.dialect == "deepseek", has_tools=bool(body.get("tools"))
        )
        chat = {
            "stream": True,
            **body,
            "model": info.model if body.get("model") is None else body["model"],
        }
        chat["messages"] = messages
        try:
            request = parse_chat_request(
                msgspec.json.encode(chat), gateway.models, gateway.route_names
            )
        except GatewayError as exc:
            if exc.status != 404:
                raise
            # Under a session's path a 404 says the session is gone; a model this gateway
            # does not serve is a bad body, as it is when the session is created.
            raise GatewayError(
                400, exc.message, code=exc.code, param=exc.param, type=exc.type
            ) from None

        async def store_turns(completion: ChatCompletion) -> None:
            self._calibrate(completion, estimate)
            await self.store.append(session_id, [user, reply_message(completion)], keep=keep)

        return request, store_turns

    def _calibrate(self, completion: ChatCompletion, estimate: int) -> None:
        # As the SDK's sessions do: a clean single attempt's prompt is exactly what was
        # estimated, so its reported prompt_tokens calibrate the route that served it.
        if not isinstance(completion, Answer):
            return
        attempts = completion.unbroken.attempts
        usage = attempts[0].usage if len(attempts) == 1 else None
        if usage is None or attempts[0].usage_estimated:
            return
        name = attempts[0].route
        self.calibrations[name] = self.calibrations.get(name, Calibration()).update(
            estimate, usage.prompt_tokens
        )


def session_budget(route: Route, max_tokens: object = None) -> int:
    """The prompt tokens a session turn may send on `route`: its context window (DeepSeek's
    when unknown) less the room kept for the answer (`max_tokens` when given, else
    `DEFAULT_RESERVE_TOKENS`, never more than half the window)."""
    context = route.context_tokens or DEFAULT_CONTEXT_TOKENS
    reserve = DEFAULT_RESERVE_TOKENS
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        reserve = max_tokens
    return context - min(reserve, context // 2)


def _method(method: str, path: str, allowed: str) -> GatewayError:
    return GatewayError(
        405,
        f"method {method} is not allowed on {path[:200]}; use {allowed}",
        code="method_not_allowed",
        headers=[(b"allow", allowed.encode())],
    )
