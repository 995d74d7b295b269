"""ChatSession / AsyncChatSession: multi-turn conversations that remember, stay inside the
context window, and survive restarts (with a store).

A session keeps the whole history; each request sends the system prompt and the newest
turns that fit `context_tokens - reserve_tokens` (core.window). Both turns of an exchange
are stored together once the answer is complete, so a failed answer leaves no half turn.
`retry()` asks the last question again without the old answer, and the new exchange
replaces the old one (in memory and in the store, in one write).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from unbroken.client.async_ import AsyncChatStream, AsyncClient
from unbroken.client.cache import CacheEvent
from unbroken.client.sync import ChatStream, Client
from unbroken.core.events import ChatEvent as _ChatEvent
from unbroken.core.events import ControlEvent, DoneEvent
from unbroken.core.window import (
    Calibration,
    estimate_message_tokens,
    messages_for_request,
    trim_to_budget,
)
from unbroken.core.wire import Answer, ChatCompletion, Usage
from unbroken.errors import InvalidRequestError
from unbroken.sessions.store import AsyncSessionStore, SessionStore

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_RESERVE_TOKENS",
    "AsyncChatSession",
    "ChatSession",
    "reply_message",
]

# DeepSeek V3.2's context (protocol.md §1.2); override per session for other models.
DEFAULT_CONTEXT_TOKENS = 128_000
# Room kept for the answer (DeepSeek chat's default max_tokens is 4K).
DEFAULT_RESERVE_TOKENS = 8_192

SessionEvent = _ChatEvent | ControlEvent | CacheEvent | DoneEvent


class _History:
    """What both session flavours share: the messages, trimming, and turn building."""

    def __init__(
        self,
        *,
        model: str,
        system: str | None,
        context_tokens: int,
        reserve_tokens: int,
        is_deepseek: bool,
        params: dict[str, Any],
    ) -> None:
        if context_tokens <= reserve_tokens:
            raise InvalidRequestError(
                f"context_tokens ({context_tokens}) must exceed reserve_tokens ({reserve_tokens})"
            )
        self.model = model
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.context_tokens = context_tokens
        self.reserve_tokens = reserve_tokens
        self.is_deepseek = is_deepseek
        self.params = dict(params)
        self.calibration = Calibration()
        self.usage = Usage()
        self.cost_usd = 0.0
        self.last: Answer | None = None
        self.dropped = 0

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first["content"] if first and first.get("role") == "system" else None

    def set_system(self, text: str | None) -> dict[str, Any] | None:
        if self.system is not None:
            self.messages.pop(0)
        if text:
            message = {"role": "system", "content": text}
            self.messages.insert(0, message)
            return message
        return None

    def retry_point(self) -> tuple[int, list[dict[str, Any]]]:
        """Where the last exchange starts, and its question: the last user message and
        everything after it (the answer, tool turns) are what a retry replaces."""
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index].get("role") == "user":
                return index, [dict(self.messages[index])]
        raise InvalidRequestError("nothing to retry: the session has no question yet")

    def request(
        self, pending: list[dict[str, Any]], params: dict[str, Any], keep: int | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        merged = {**self.params, **params}
        history = self.messages if keep is None else self.messages[:keep]
        trimmed = trim_to_budget(
            history + pending,
            self.context_tokens - self.reserve_tokens,
            calibration=self.calibration,
        )
        self.dropped = trimmed.dropped
        estimate = sum(estimate_message_tokens(m) for m in trimmed.messages)
        messages = messages_for_request(
            trimmed.messages, is_deepseek=self.is_deepseek, has_tools=bool(merged.get("tools"))
        )
        return messages, estimate

    def finish(
        self, pending: list[dict[str, Any]], done: Answer, estimate: int, keep: int | None = None
    ) -> list[dict[str, Any]]:
        new = [*pending, reply_message(done)]
        if keep is not None:
            del self.messages[keep:]
        self.messages.extend(new)
        self.last = done
        meta = done.unbroken
        first = meta.attempts[0].usage if meta.attempts else None
        # Calibrate on a clean single attempt: its prompt is exactly what was estimated.
        if first is not None and len(meta.attempts) == 1:
            self.calibration = self.calibration.update(estimate, first.prompt_tokens)
        if done.usage is not None:
            self.usage = Usage(
                prompt_tokens=self.usage.prompt_tokens + done.usage.prompt_tokens,
                completion_tokens=self.usage.completion_tokens + done.usage.completion_tokens,
                total_tokens=self.usage.total_tokens + done.usage.total_tokens,
            )
        self.cost_usd += meta.cost_usd
        return new


def reply_message(done: ChatCompletion) -> dict[str, Any]:
    """The assistant turn to store for an answer: its content, its reasoning (kept in the
    history; `messages_for_request` decides when it is sent back) and its tool calls."""
    message = done.choices[0].message if done.choices else None
    reply: dict[str, Any] = {"role": "assistant", "content": message.content if message else ""}
    if message is not None and message.reasoning_content:
        reply["reasoning_content"] = message.reasoning_content
    if message is not None and message.tool_calls:
        reply["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ]
    return reply


def _pending(content: str | None) -> list[dict[str, Any]]:
    return [] if content is None else [{"role": "user", "content": content}]


class ChatSession:
    """A conversation with memory (blocking).

    `send(text)` streams the answer as events (see `ChatStream`) and, once it is complete,
    stores both turns. Tool results go in with `add_tool_result`, then `send(None)` asks for
    the answer that uses them.

    Args:
        client: the Client to talk through.
        model: the model id.
        system: the system prompt.
        store: where to persist it (None: memory only).
        context_tokens: the model's context window.
        reserve_tokens: room kept for the answer.
        params: request parameters for every turn (temperature, tools...).
    """

    def __init__(
        self,
        client: Client,
        *,
        model: str = "deepseek-chat",
        system: str | None = None,
        store: SessionStore | None = None,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
        owner: str = "",
        **params: Any,
    ) -> None:
        self._client = client
        self._store = store
        self._h = _History(
            model=model,
            system=system,
            context_tokens=context_tokens,
            reserve_tokens=reserve_tokens,
            is_deepseek=client.routes[0].dialect == "deepseek",
            params=params,
        )
        self.id: str | None = None
        # Messages in memory minus messages in the store: `set_system` changes only the
        # memory, and a retry must cut the stored list at the same turn as the memory's.
        self._drift = 0
        if store is not None:
            self.id = store.create(model=model, owner=owner).id
            if self._h.messages:
                store.append(self.id, self._h.messages)

    @classmethod
    def load(
        cls, client: Client, store: SessionStore, session_id: str, **params: Any
    ) -> ChatSession:
        """Reopen a stored session."""
        info, messages = store.load(session_id)
        session = cls(client, model=info.model or "deepseek-chat", **params)
        session._store = store
        session.id = info.id
        session._h.messages = messages
        return session

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The whole history (a copy)."""
        return [dict(m) for m in self._h.messages]

    @property
    def model(self) -> str:
        """The model the next turn uses."""
        return self._h.model

    @model.setter
    def model(self, value: str) -> None:
        self._h.model = value
        if self._store is not None and self.id is not None:
            self._store.update(self.id, model=value)

    @property
    def system(self) -> str | None:
        """The system prompt."""
        return self._h.system

    @property
    def usage(self) -> Usage:
        """Tokens billed by this session object so far."""
        return self._h.usage

    @property
    def cost_usd(self) -> float:
        """Cost of this session object's answers so far."""
        return self._h.cost_usd

    @property
    def last(self) -> Answer | None:
        """The last complete answer."""
        return self._h.last

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (kept in memory; stored sessions keep their history)."""
        before = len(self._h.messages)
        self._h.set_system(text)
        self._drift += len(self._h.messages) - before

    def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """Add the result of a tool call the model asked for."""
        message = {"role": "tool", "tool_call_id": tool_call_id, "content": content}
        self._h.messages.append(message)
        if self._store is not None and self.id is not None:
            self._store.append(self.id, [message])

    def send(self, content: str | None, **params: Any) -> Iterator[SessionEvent]:
        """Send a user message (or None after tool results) and stream the answer's events.
        Both turns are stored when the answer completes."""
        return self._exchange(_pending(content), None, params)

    def retry(self, **params: Any) -> Iterator[SessionEvent]:
        """Regenerate the last answer: the last question is sent again with the history
        before it (not the old answer), and once the new answer completes it replaces the
        old exchange, so the question stays once. A stopped or failed retry changes nothing.

        Raises:
            InvalidRequestError: the session has no question yet.
        """
        keep, pending = self._h.retry_point()
        return self._exchange(pending, keep, params)

    def _exchange(
        self, pending: list[dict[str, Any]], keep: int | None, params: dict[str, Any]
    ) -> Iterator[SessionEvent]:
        messages, estimate = self._h.request(pending, params, keep)
        stream: ChatStream = self._client.chat.stream(
            model=self._h.model, messages=messages, **{**self._h.params, **params}
        )
        try:
            for event in stream:
                if isinstance(event, DoneEvent):
                    new = self._h.finish(pending, event.completion, estimate, keep)
                    if self._store is not None and self.id is not None:
                        stored_keep = None if keep is None else keep - self._drift
                        self._store.append(self.id, new, keep=stored_keep)
                yield event
        finally:
            stream.close()

    def ask(self, content: str | None, **params: Any) -> Answer:
        """`send` without streaming: the whole answer."""
        for _ in self.send(content, **params):
            pass
        assert self._h.last is not None  # noqa: S101 - set by the DoneEvent
        return self._h.last


class AsyncChatSession:
    """The async twin of `ChatSession`, over an AsyncClient and an AsyncSessionStore."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        model: str = "deepseek-chat",
        system: str | None = None,
        store: AsyncSessionStore | None = None,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
        **params: Any,
    ) -> None:
        self._client = client
        self._store = store
        self._h = _History(
            model=model,
            system=system,
            context_tokens=context_tokens,
            reserve_tokens=reserve_tokens,
            is_deepseek=client.routes[0].dialect == "deepseek",
            params=params,
        )
        self.id: str | None = None

    @classmethod
    async def create(
        cls, client: AsyncClient, store: AsyncSessionStore, *, owner: str = "", **kwargs: Any
    ) -> AsyncChatSession:
        """A new stored session."""
        session = cls(client, store=store, **kwargs)
        session.id = (await store.create(model=session._h.model, owner=owner)).id
        if session._h.messages:
            await store.append(session.id, session._h.messages)
        return session

    @classmethod
    async def load(
        cls, client: AsyncClient, store: AsyncSessionStore, session_id: str, **params: Any
    ) -> AsyncChatSession:
        """Reopen a stored session."""
        info, messages = await store.load(session_id)
        session = cls(client, model=info.model or "deepseek-chat", store=store, **params)
        session.id = info.id
        session._h.messages = messages
        return session

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The whole history (a copy)."""
        return [dict(m) for m in self._h.messages]

    @property
    def last(self) -> Answer | None:
        """The last complete answer."""
        return self._h.last

    @property
    def usage(self) -> Usage:
        """Tokens billed by this session object so far."""
        return self._h.usage

    async def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """Add the result of a tool call the model asked for."""
        message = {"role": "tool", "tool_call_id": tool_call_id, "content": content}
        self._h.messages.append(message)
        if self._store is not None and self.id is not None:
            await self._store.append(self.id, [message])

    def send(self, content: str | None, **params: Any) -> AsyncIterator[SessionEvent]:
        """Send a user message (or None) and stream the answer's events; see ChatSession."""
        return self._exchange(_pending(content), None, params)

    def retry(self, **params: Any) -> AsyncIterator[SessionEvent]:
        """Regenerate the last answer; see ChatSession.retry."""
        keep, pending = self._h.retry_point()
        return self._exchange(pending, keep, params)

    async def _exchange(
        self, pending: list[dict[str, Any]], keep: int | None, params: dict[str, Any]
    ) -> AsyncIterator[SessionEvent]:
        messages, estimate = self._h.request(pending, params, keep)
        stream: AsyncChatStream = self._client.chat.stream(
            model=self._h.model, messages=messages, **{**self._h.params, **params}
        )
        try:
            async for event in stream:
                if isinstance(event, DoneEvent):
                    new = self._h.finish(pending, event.completion, estimate, keep)
                    if self._store is not None and self.id is not None:
                        await self._store.append(self.id, new, keep=keep)
                yield event
        finally:
            await stream.aclose()

    async def ask(self, content: str | None, **params: Any) -> Answer:
        """`send` without streaming: the whole answer."""
        async for _ in self.send(content, **params):
            pass
        assert self._h.last is not None  # noqa: S101 - set by the DoneEvent
        return self._h.last
