"""ChunkAccumulator: folds streamed chunks into the final completion; pure, no I/O.

Imports only the standard library and core siblings.
"""

from __future__ import annotations

from typing import Any, Protocol

from unbroken.core.events import (
    ChatEvent,
    FinishEvent,
    ReasoningEvent,
    RoleEvent,
    TextEvent,
    ToolCallEvent,
    UsageEvent,
)
from unbroken.core.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    Delta,
    Function,
    Message,
    TokenLogprob,
    ToolCall,
    Usage,
)

__all__ = ["ChunkAccumulator", "EventSplitter", "TextSource", "join_text"]

# Theory of operation
# -------------------
# State per choice index: role, content pieces, reasoning pieces, refusal pieces, tool calls
# keyed by their `index`, logprob lists and the finish_reason. A text field stays None until
# a delta carries a non-null value for it (so a chat answer has `reasoning_content: None`
# exactly as its non-streamed twin does), then it is the concatenation of the pieces in order.
# Tool calls take `id`, `type` and `name` from the first fragment that carries each, and
# concatenate `arguments`. finish_reason: a later non-null value replaces an earlier one.
# Usage: the last non-null usage wins (absent usage never clears it). id, model, created and
# system_fingerprint: the first non-empty value wins, so Azure's empty first chunk and its
# annotation chunks (empty id, no delta) change nothing.
#
# A choice counts as *started* once a delta or a finish_reason arrived for it; annotation
# choices without either do not start one.


class TextSource(Protocol):
    """Where a `ChunkAccumulator` reads the text of its choices instead of keeping a copy
    (`ChunkAccumulator.keep_text_in`): a log of the chunks it folds, in the same order
    (the gateway's stream log)."""

    def text_mark(self) -> int:
        """A mark of how far the log is (a choice whose text starts now: its chunks follow)."""

    def text_since(self, mark: int, until: int | None, index: int, reasoning: bool) -> str:
        """Choice `index`'s content (its reasoning with `reasoning`) in the chunks logged
        after mark `mark`, up to mark `until` (None: all of them)."""


class _Elsewhere:
    """A choice's text kept by a `TextSource`, not here: after mark `mark` (up to mark
    `until` in a snapshot). An append only notes that it was not empty (so it is true once
    some text came, as a bytearray is)."""

    __slots__ = ("any", "mark", "until")

    def __init__(self, mark: int, until: int | None = None) -> None:
        self.mark = mark
        self.until = until
        self.any = False

    def __iadd__(self, data: bytes) -> _Elsewhere:
        if data:
            self.any = True
        return self

    # (mypy checks `+=` on a union of types through `__add__`; nothing adds one. A def, not
    # `__add__ = __iadd__`: mypyc compiles no aliased method.)
    def __add__(self, data: bytes) -> _Elsewhere:  # pragma: no cover - never called
        return self.__iadd__(data)

    def __bool__(self) -> bool:
        return self.any


# A choice's text as kept: its UTF-8 (see `_text`), or where a `TextSource` holds it.
_Kept = bytearray | _Elsewhere


class _Tool:
    __slots__ = ("args", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.args: list[str] = []


class _Choice:
    __slots__ = (
        "content",
        "finish_reason",
        "index",
        "logprobs",
        "logprobs_content",
        "logprobs_reasoning",
        "n_text_deltas",
        "reasoning",
        "refusal",
        "role",
        "tools",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        # Non-empty content and reasoning deltas: counted as they come (the text is kept
        # whole, not as its deltas).
        self.n_text_deltas = 0
        # The text so far as UTF-8 (surrogate halves as `surrogatepass` writes them),
        # appended in place (see `_text`).
        self.content: _Kept | None = None
        self.reasoning: _Kept | None = None
        self.refusal: list[str] | None = None
        # None until a tool-call fragment arrives (an empty dict is 64 bytes per live answer).
        self.tools: dict[int, _Tool] | None = None
        self.logprobs = False
        self.logprobs_content: list[TokenLogprob] | None = None
        self.logprobs_reasoning: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None

    def copy(self, source: TextSource | None, until: int | None) -> _Choice:
        """A twin that keeps its text itself (read from `source` where that holds it), or,
        `until` given, that leaves it there up to that mark (a snapshot)."""
        twin = _Choice(self.index)
        twin.role = self.role
        twin.n_text_deltas = self.n_text_deltas
        twin.content = _owned(self.content, source, until, self.index, False)
        twin.reasoning = _owned(self.reasoning, source, until, self.index, True)
        twin.refusal = _copied(self.refusal)
        if self.tools:
            tools: dict[int, _Tool] = {}
            for key, tool in self.tools.items():
                copied = tools[key] = _Tool()
                copied.id, copied.type, copied.name = tool.id, tool.type, tool.name
                copied.args = list(tool.args)
            twin.tools = tools
        twin.logprobs = self.logprobs
        twin.logprobs_content = _copied(self.logprobs_content)
        twin.logprobs_reasoning = _copied(self.logprobs_reasoning)
        twin.finish_reason = self.finish_reason
        return twin


def _owned(
    kept: _Kept | None, source: TextSource | None, until: int | None, index: int, reasoning: bool
) -> _Kept | None:
    """A copy of `kept` as bytes of its own, or (`until` given, for a snapshot) as where
    the source holds it up to `until`."""
    if kept is None:
        return None
    if isinstance(kept, _Elsewhere):
        if until is not None:
            twin = _Elsewhere(kept.mark, until if kept.until is None else kept.until)
            twin.any = kept.any
            return twin
        assert source is not None  # noqa: S101 - an _Elsewhere is made with a source only
        return bytearray(_utf8(source.text_since(kept.mark, kept.until, index, reasoning)))
    return bytearray(kept)


def _copied(items: list[Any] | None) -> list[Any] | None:
    return None if items is None else list(items)


def join_text(pieces: list[str]) -> str:
    """Concatenate text pieces, rejoining UTF-16 surrogate halves that some servers escape
    token by token (`\\ud83d` then `\\ude80`); a lone half becomes U+FFFD."""
    text = "".join(pieces)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


# A choice's text is kept as one bytearray of UTF-8, each delta appended in place: a str
# per delta cost ~55 bytes, and folding them into a few strs still left ~400 bytes
# around the text of a 110-token answer, against ~100 for the bytearray (a gateway holds
# every live answer's text; bench/hotpath.py per chunk: no slower). Text decoded from JSON
# may hold UTF-16 surrogate halves (`\ud83d`): they are kept as `surrogatepass` writes
# them, and rejoined by `join_text` when the text is read.


def _utf8(text: str) -> bytes:
    """`text` as UTF-8, surrogate halves included."""
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytearray) -> str:
    """The text kept as `data` (see the comment above)."""
    if data.isascii():
        return data.decode("ascii")
    return join_text([data.decode("utf-8", "surrogatepass")])


# The model, fingerprint and role of an answer: the same few strs in every live answer, kept
# once each instead of a copy per answer (~200 bytes per held stream, bench/hotpath.py
# --memory). Bounded: an upstream that names a new model per answer fills it, then is
# simply not shared.
_SHARED: dict[str, str] = {}
SHARED_MAX = 256
SHARED_MAX_CHARS = 128


def _share(text: str) -> str:
    shared = _SHARED.get(text)
    if shared is not None:
        return shared
    if len(_SHARED) < SHARED_MAX and len(text) <= SHARED_MAX_CHARS:
        _SHARED[text] = text
    return text


def _by_index(state: _Choice) -> int:
    return state.index


# Made with chr(), not "\ud800" literals: mypyc cannot store a lone surrogate as a C string.
_HIGH_FIRST = chr(0xD800)
_HIGH_LAST = chr(0xDBFF)


def _is_high_surrogate(text: str) -> bool:
    return _HIGH_FIRST <= text[-1] <= _HIGH_LAST


class EventSplitter:
    """Turns chunks into chat events, in order: per choice its role (first time only),
    reasoning, text, tool-call fragments, finish; then usage. Empty text is not an event,
    and a trailing UTF-16 high surrogate is held back until its pair arrives."""

    __slots__ = ("_held", "_roles")

    def __init__(self) -> None:
        self._roles: set[int] = set()
        self._held: dict[tuple[int, int], str] = {}

    def split(self, chunk: ChatCompletionChunk) -> list[ChatEvent]:
        """The events of one chunk."""
        events: list[ChatEvent] = []
        for choice in chunk.choices:
            delta = choice.delta
            index = choice.index
            if delta is not None:
                if delta.role is not None and index not in self._roles:
                    self._roles.add(index)
                    events.append(RoleEvent(index, delta.role))
                reasoning = self._release(index, 1, delta.reasoning_text)
                if reasoning:
                    events.append(ReasoningEvent(index, reasoning))
                text = self._release(index, 0, delta.content)
                if text:
                    events.append(TextEvent(index, text))
                for position, fragment in enumerate(delta.tool_calls or ()):
                    function = fragment.function
                    events.append(
                        ToolCallEvent(
                            index,
                            position if fragment.index is None else fragment.index,
                            (function.arguments or "") if function is not None else "",
                            id=fragment.id,
                            name=function.name if function is not None else None,
                            call_type=fragment.type,
                        )
                    )
            if choice.finish_reason is not None:
                events.append(FinishEvent(index, choice.finish_reason))
        usage = chunk.usage
        if usage is not None:
            events.append(
                UsageEvent(
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.total_tokens,
                    usage.prompt_cache_hit_tokens,
                    usage.prompt_cache_miss_tokens,
                    usage.reasoning_tokens,
                )
            )
        return events

    def _release(self, index: int, slot: int, text: str | None) -> str:
        if not text:
            return ""
        held = self._held.pop((index, slot), "")
        if held:
            text = held + text
        if _is_high_surrogate(text):
            self._held[(index, slot)] = text[-1]
            text = text[:-1]
        return join_text([text]) if held else text


class ChunkAccumulator:
    """Folds the chunks of one answer into a `ChatCompletion`.

    `feed(chunk)` folds only (the cheap path for raw chunk iteration);
    `feed_events(chunk)` folds and also returns the chat events the chunk carries
    (role once per choice, reasoning, text, tool-call fragments, finish, usage).
    Folding the chunks of a stream gives the same completion, field for field, as the
    non-streamed request for the same answer.
    """

    __slots__ = (
        "_first",
        "_more",
        "_source",
        "_splitter",
        "created",
        "id",
        "model",
        "n_chunks",
        "system_fingerprint",
        "usage",
    )

    def __init__(self) -> None:
        # The first choice started, and the others by index when there are any: most answers
        # have one choice, and a dict of one was 224 bytes per live stream.
        self._first: _Choice | None = None
        # Next to `_first` (compiled, fields lie in the order first set): both are read for
        # each relayed chunk (core/attempt.py `relay_one`).
        self.n_chunks = 0
        self._more: dict[int, _Choice] | None = None
        # Made on the first `feed_events`: folding alone (two accumulators per answer in a
        # gateway) needs none, and one cost ~350 bytes per live stream.
        self._splitter: EventSplitter | None = None
        # Where the text of the choices is read, when not kept here (`keep_text_in`).
        self._source: TextSource | None = None
        self.id = ""
        self.model = ""
        self.created = 0
        self.system_fingerprint: str | None = None
        self.usage: Usage | None = None

    def _head(self, chunk: ChatCompletionChunk) -> None:
        if not self.id and chunk.id:
            self.id = chunk.id
        if not self.model and chunk.model:
            self.model = _share(chunk.model)
        if not self.created and chunk.created:
            self.created = chunk.created
        if self.system_fingerprint is None and chunk.system_fingerprint:
            self.system_fingerprint = _share(chunk.system_fingerprint)
        if chunk.usage is not None:
            self.usage = chunk.usage

    def feed(self, chunk: ChatCompletionChunk) -> None:
        """Fold one chunk."""
        self.n_chunks += 1
        if not self.id or chunk.usage is not None:
            self._head(chunk)
        for choice in chunk.choices:
            delta = choice.delta
            if delta is None and choice.finish_reason is None:
                continue
            state = self._first
            if state is None or state.index != choice.index:
                state = self._state(choice.index)
            if delta is not None:
                if delta.role is not None and state.role is None:
                    state.role = _share(delta.role)
                content = delta.content
                if content is not None:
                    kept = state.content
                    if kept is None:
                        kept = state.content = self._new_text()
                    try:  # (`_utf8` inlined: this runs twice per relayed chunk)
                        kept += content.encode()
                    except UnicodeEncodeError:  # surrogate halves
                        kept += _utf8(content)
                    if content:
                        state.n_text_deltas += 1
                reasoning = delta.reasoning_content
                if reasoning is None:
                    reasoning = delta.reasoning
                if reasoning is not None:
                    if state.reasoning is None:
                        state.reasoning = self._new_text()
                    state.reasoning += _utf8(reasoning)
                    state.n_text_deltas += reasoning != ""
                if delta.tool_calls:
                    self._fold_tools(state, delta)
                if delta.refusal is not None:
                    if state.refusal is None:
                        state.refusal = []
                    state.refusal.append(delta.refusal)
            if choice.logprobs is not None:
                self._fold_logprobs(state, choice.logprobs)
            if choice.finish_reason is not None:
                state.finish_reason = choice.finish_reason

    def feed_text(self, index: int, text: str, reasoning: bool = False) -> None:
        """`feed` of a chunk that only brings `text` as choice `index`'s content (its
        reasoning_content with `reasoning`; no role, finish or usage), its head (id,
        model...) that of a chunk folded before: the relay's text chunks (core/stream.py
        `ChatStreamDecoder.feed_one`), not decoded."""
        self.n_chunks += 1
        state = self._first
        if state is None or state.index != index:
            state = self._state(index)
        if reasoning:
            kept = state.reasoning
            if kept is None:
                kept = state.reasoning = self._new_text()
        else:
            kept = state.content
            if kept is None:
                kept = state.content = self._new_text()
        if type(kept) is _Elsewhere:
            # Kept by the source (`keep_text_in`): no copy to append, so no encoding either
            # (a relay's text chunk: an allocation and a call less).
            if text:
                kept.any = True
                state.n_text_deltas += 1
            return
        try:
            kept += text.encode()
        except UnicodeEncodeError:  # surrogate halves
            kept += _utf8(text)
        if text:
            state.n_text_deltas += 1

    def keep_text_in(self, source: TextSource) -> bool:
        """Keep no copy of the text (content, reasoning) of the answer: `source`, a log of
        the chunks folded here in the same order, holds it, and is read when the text is
        asked for (`content`, `completion`, `copy`...). Only while no text came (a role
        chunk's empty content may have): False, and nothing changed, after that. The chunks
        folded before are logged before those after, if not already.

        Why: a gateway logs each answer's chunks (gateway/streams.py); the text kept here
        as well was a second copy of every live answer's text (bench/stream_memory.py)."""
        states = self._states()
        if self._source is not None or any(s.content or s.reasoning for s in states):
            return False
        self._source = source
        for state in states:  # an empty text: what is logged from now on is all of it
            if state.content is not None:
                state.content = _Elsewhere(source.text_mark())
            if state.reasoning is not None:
                state.reasoning = _Elsewhere(source.text_mark())
        return True

    def _new_text(self) -> _Kept:
        """The text kept of a choice's content or reasoning that starts now."""
        source = self._source
        return bytearray() if source is None else _Elsewhere(source.text_mark())

    def _read(self, state: _Choice, kept: _Kept, reasoning: bool) -> str:
        """The text `kept` (choice `state`'s content, or its reasoning with `reasoning`)."""
        if isinstance(kept, _Elsewhere):
            assert self._source is not None  # noqa: S101 - an _Elsewhere is made with a source only
            return self._source.text_since(kept.mark, kept.until, state.index, reasoning)
        return _text(kept)

    def _get(self, index: int) -> _Choice | None:
        state = self._first
        if state is not None and state.index == index:
            return state
        more = self._more
        return None if more is None else more.get(index)

    def _state(self, index: int) -> _Choice:
        """Choice `index`'s state, started now if it was not."""
        state = self._get(index)
        if state is None:
            state = _Choice(index)
            if self._first is None:
                self._first = state
            else:
                if self._more is None:
                    self._more = {}
                self._more[index] = state
        return state

    def _states(self) -> list[_Choice]:
        """The states of the choices started, by index."""
        states = [] if self._first is None else [self._first]
        if self._more:
            states += self._more.values()
            states.sort(key=_by_index)
        return states

    @staticmethod
    def _fold_tools(state: _Choice, delta: Delta) -> None:
        tools = state.tools
        if tools is None:
            tools = state.tools = {}
        for position, fragment in enumerate(delta.tool_calls or ()):
            key = position if fragment.index is None else fragment.index
            tool = tools.get(key)
            if tool is None:
                tool = tools[key] = _Tool()
            if tool.id is None and fragment.id:
                tool.id = fragment.id
            if tool.type is None and fragment.type:
                tool.type = fragment.type
            function = fragment.function
            if function is not None:
                if tool.name is None and function.name:
                    tool.name = function.name
                if function.arguments:
                    tool.args.append(function.arguments)

    @staticmethod
    def _fold_logprobs(state: _Choice, logprobs: ChoiceLogprobs) -> None:
        state.logprobs = True
        if logprobs.content is not None:
            if state.logprobs_content is None:
                state.logprobs_content = []
            state.logprobs_content.extend(logprobs.content)
        if logprobs.reasoning_content is not None:
            if state.logprobs_reasoning is None:
                state.logprobs_reasoning = []
            state.logprobs_reasoning.extend(logprobs.reasoning_content)

    def copy(self) -> ChunkAccumulator:
        """An independent accumulator in the same state (what was folded so far)."""
        return self._twin(None)

    def snapshot(self) -> ChunkAccumulator:
        """`copy` for reading only: the state folded so far, never fed again. Its text,
        when a `TextSource` holds it (`keep_text_in`), stays there (read up to the
        source's mark of now), not copied."""
        source = self._source
        if source is None:
            return self._twin(None)
        twin = self._twin(source.text_mark())
        twin._source = source
        return twin

    def _twin(self, until: int | None) -> ChunkAccumulator:
        twin = ChunkAccumulator()
        twin.id = self.id
        twin.model = self.model
        twin.created = self.created
        twin.system_fingerprint = self.system_fingerprint
        twin.usage = self.usage
        twin.n_chunks = self.n_chunks
        if self._splitter is not None:
            twin._splitter = EventSplitter()
            twin._splitter._roles = set(self._splitter._roles)
            twin._splitter._held = dict(self._splitter._held)
        source = self._source
        if self._first is not None:
            twin._first = self._first.copy(source, until)
        if self._more is not None:
            twin._more = {index: state.copy(source, until) for index, state in self._more.items()}
        return twin

    def feed_events(self, chunk: ChatCompletionChunk) -> list[ChatEvent]:
        """Fold one chunk and return the chat events it carries (see `EventSplitter`)."""
        self.feed(chunk)
        splitter = self._splitter
        if splitter is None:
            splitter = self._splitter = EventSplitter()
        return splitter.split(chunk)

    # -- queries -------------------------------------------------------------------------

    @property
    def indexes(self) -> list[int]:
        """The indexes of the choices started so far, ascending."""
        return [state.index for state in self._states()]

    @property
    def finish_reasons(self) -> list[str | None]:
        """The finish_reason of each choice started so far (None while it runs), by index."""
        if self._more is None:  # one choice or none (asked at every attempt's end)
            first = self._first
            return [] if first is None else [first.finish_reason]
        return [state.finish_reason for state in self._states()]

    def role(self, index: int = 0) -> str | None:
        """The role choice `index` announced, if any."""
        state = self._get(index)
        return None if state is None else state.role

    def discard(self, index: int) -> None:
        """Forget choice `index` (the consumer was told to discard it: a restart)."""
        first = self._first
        if first is not None and first.index == index:
            self._first = None
        elif self._more is not None:
            self._more.pop(index, None)

    def finish_reason(self, index: int = 0) -> str | None:
        """The finish_reason of choice `index` so far (None while it runs)."""
        state = self._get(index)
        return None if state is None else state.finish_reason

    def content(self, index: int = 0) -> str:
        """The answer text of choice `index` so far."""
        state = self._get(index)
        if state is None or state.content is None:
            return ""
        return self._read(state, state.content, False)

    def reasoning(self, index: int = 0) -> str:
        """The reasoning text of choice `index` so far."""
        state = self._get(index)
        if state is None or state.reasoning is None:
            return ""
        return self._read(state, state.reasoning, True)

    def n_text_deltas(self, index: int = 0) -> int:
        """How many non-empty content and reasoning deltas choice `index` got: the tokens
        it streamed, where the server sends one token per delta, as DeepSeek, OpenAI and
        vLLM do (DeepSeek's `completion_tokens` is this count)."""
        state = self._get(index)
        return 0 if state is None else state.n_text_deltas

    @property
    def has_output(self) -> bool:
        """True once any choice received non-empty text, reasoning or a tool-call fragment."""
        if self._more is None:  # one choice or none: no list of the states (asked per attempt)
            first = self._first
            return first is not None and bool(first.tools or first.content or first.reasoning)
        return any(state.tools or state.content or state.reasoning for state in self._states())

    def completion(self) -> ChatCompletion:
        """The folded answer as a `chat.completion` (choices ordered by index)."""
        choices = []
        for state in self._states():
            index = state.index
            tool_calls = None
            if state.tools:
                tool_calls = [
                    ToolCall(
                        id=tool.id or "",
                        type=tool.type or "function",
                        function=Function(name=tool.name or "", arguments="".join(tool.args)),
                    )
                    for _, tool in sorted(state.tools.items())
                ]
            choices.append(
                Choice(
                    index=index,
                    message=Message(
                        role=state.role or "assistant",
                        content=(
                            None
                            if state.content is None
                            else self._read(state, state.content, False)
                        ),
                        reasoning_content=(
                            None
                            if state.reasoning is None
                            else self._read(state, state.reasoning, True)
                        ),
                        tool_calls=tool_calls,
                        refusal=None if state.refusal is None else join_text(state.refusal),
                    ),
                    logprobs=(
                        ChoiceLogprobs(
                            content=state.logprobs_content,
                            reasoning_content=state.logprobs_reasoning,
                        )
                        if state.logprobs
                        else None
                    ),
                    finish_reason=state.finish_reason,
                )
            )
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=self.usage,
        )
