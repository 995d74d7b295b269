"""Conversation sessions over HTTP, for browser apps that should not hold the history:

    POST   /v1/sessions                  create   {"model"?, "system"?, "title"?}
    GET    /v1/sessions                  list the caller's sessions
    GET    /v1/sessions/{id}             one session and its messages (`live_stream_id`: the
                                         answer being streamed now, or null)
    DELETE /v1/sessions/{id}             forget it
    POST   /v1/sessions/{id}/messages    {"content", "stream"?, any chat parameter}: answers
                                         (SSE or JSON, as /v1/chat/completions) and stores
                                         both turns once the answer is complete

A session belongs to the key that created it; other keys get 404, as if it did not exist.
The history is trimmed to the context window (core.window) on every turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from unbroken.core.window import messages_for_request, trim_to_budget
from unbroken.core.wire import ChatCompletion
from unbroken.errors import StoreError
from unbroken.gateway.asgi import Exchange
from unbroken.gateway.keys import Caller
from unbroken.gateway.problems import GatewayError
from unbroken.gateway.request import parse_chat_request
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
    SQLiteSessionStore,
    default_sessions_path,
)
from unbroken.settings import data_home

if TYPE_CHECKING:
    from unbroken.gateway.app import Gateway

__all__ = ["SESSIONS_PATH", "SessionEndpoints", "open_session_store"]

SESSIONS_PATH = "/v1/sessions"
# The largest session message accepted (the body limit still applies on top).
MAX_CONTENT_CHARS = 1_000_000


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


class SessionEndpoints:
    """The /v1/sessions handlers of one gateway."""

    def __init__(self, gateway: Gateway, store: AsyncSessionStore) -> None:
        self._gateway = gateway
        self.store = store

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
                infos = await self.store.list(owner=caller.id)
                await ex.respond_json(200, {"object": "list", "data": [_info(i) for i in infos]})
            else:
                raise _method(method, path, "GET, POST")
            return
        session_id = parts[0]
        if len(parts) == 1:
            if method == "GET":
                info, messages = await self._owned(caller, session_id)
                # The answer being streamed now, so a page reloaded mid-answer can follow it
                # (GET /v1/streams/{id}); null when none is.
                live = await self._gateway.streams.live_stream(session_id)
                await ex.respond_json(
                    200, {**_info(info), "messages": messages, "live_stream_id": live}
                )
            elif method == "DELETE":
                await self._owned(caller, session_id)
                await self.store.delete(session_id)
                await ex.respond_json(200, {"id": session_id, "object": "session", "deleted": True})
            else:
                raise _method(method, path, "GET, DELETE")
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
        except StoreError as exc:
            if "no session" in exc.message:
                raise _not_found(session_id) from None
            raise
        if info.owner != caller.id:
            raise _not_found(session_id)
        return info, messages

    async def _create(self, ex: Exchange, caller: Caller) -> None:
        raw = await ex.read_body(self._gateway.settings.gateway.max_body_bytes)
        try:
            body = msgspec.json.decode(raw or b"{}", type=_NewSession)
        except msgspec.DecodeError as exc:
            raise GatewayError(400, f"invalid session body: {exc}", code="invalid_body") from None
        models = self._gateway.models
        model = body.model or sorted(models)[0]
        if model not in models:
            raise GatewayError(
                400,
                f"unknown model {model!r}; served: {', '.join(sorted(models))}",
                code="model_not_found",
                param="model",
            )
        info = await self.store.create(model=model, title=body.title, owner=caller.id)
        if body.system:
            await self.store.append(info.id, [{"role": "system", "content": body.system}])
        info, _ = await self.store.load(info.id)
        await ex.respond_json(201, _info(info))

    async def _message(self, ex: Exchange, caller: Caller, session_id: str) -> None:
        gateway = self._gateway
        gateway._check_draining()
        raw = await ex.read_body(gateway.settings.gateway.max_body_bytes)
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise GatewayError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "the body must be a JSON object", code="invalid_body")
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
        info, history = await self._owned(caller, session_id)
        user = {"role": "user", "content": content}
        trimmed = trim_to_budget(
            [*history, user], DEFAULT_CONTEXT_TOKENS - DEFAULT_RESERVE_TOKENS
        ).messages
        is_deepseek = gateway.client.routes[0].dialect == "deepseek"
        messages = messages_for_request(
            trimmed, is_deepseek=is_deepseek, has_tools=bool(body.get("tools"))
        )
        chat = {"stream": True, **body, "model": body.get("model") or info.model}
        chat["messages"] = messages
        request = parse_chat_request(msgspec.json.encode(chat), gateway.models, gateway.route_names)

        async def store_turns(completion: ChatCompletion) -> None:
            await self.store.append(session_id, [user, reply_message(completion)])

        await gateway.serve_chat(ex, caller, request, after=store_turns, session_id=session_id)


def _method(method: str, path: str, allowed: str) -> GatewayError:
    return GatewayError(
        405,
        f"method {method} is not allowed on {path[:200]}; use {allowed}",
        code="method_not_allowed",
        headers=[(b"allow", allowed.encode())],
    )
