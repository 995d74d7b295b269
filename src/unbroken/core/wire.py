"""Wire types of the chat completions API (DeepSeek / OpenAI shapes) and their decoding.

msgspec Structs: typed, attribute-shaped like the official `openai` SDK
(`chunk.choices[0].delta.content`), tolerant of unknown fields (ignored) and missing ones
(defaults). Pure: imports msgspec, the standard library, `unbroken.errors` and core siblings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from unbroken.errors import ErrorKind, ProtocolError, UpstreamStreamError

__all__ = [
    "Answer",
    "AnswerMeta",
    "AttemptInfo",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Choice",
    "ChoiceLogprobs",
    "ChunkChoice",
    "CompletionTokensDetails",
    "Delta",
    "ErrorObject",
    "Function",
    "FunctionDelta",
    "Message",
    "Model",
    "ModelsPage",
    "PromptTokensDetails",
    "TextAnswer",
    "TextChoice",
    "TextCompletion",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "TopLogprob",
    "Usage",
    "WireModel",
    "chunk_text",
    "completion_to_chunks",
    "decode_chunk",
    "decode_completion",
    "decode_error_body",
    "decode_text_chunk",
    "decode_text_completion",
    "excerpt",
    "parse_error_object",
    "template_reads",
    "template_text",
    "upstream_error_from_object",
    "values_text",
]


class WireModel(msgspec.Struct):
    """Base of the wire types: the dump methods code written for the `openai` package
    calls on its pydantic models (`model_dump`, `model_dump_json`, `to_dict`, `to_json`)."""

    def model_dump(self, *, exclude_none: bool = False, **_: Any) -> dict[str, Any]:
        """The object as plain dicts and lists (pydantic's `model_dump`). Other pydantic
        arguments are accepted and ignored."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        return _drop_none(data) if exclude_none else data

    def model_dump_json(
        self, *, indent: int | None = None, exclude_none: bool = False, **_: Any
    ) -> str:
        """The object as a JSON string (pydantic's `model_dump_json`)."""
        data = self.model_dump(exclude_none=exclude_none)
        return json.dumps(
            data, ensure_ascii=False, indent=indent, separators=None if indent else (",", ":")
        )

    def to_dict(self, *, exclude_none: bool = False, **_: Any) -> dict[str, Any]:
        """openai's `to_dict`: the object as plain dicts and lists."""
        return self.model_dump(exclude_none=exclude_none)

    def to_json(self, *, indent: int | None = 2, exclude_none: bool = False, **_: Any) -> str:
        """openai's `to_json`: the object as JSON, indented by 2 by default."""
        return self.model_dump_json(indent=indent, exclude_none=exclude_none)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


class FunctionDelta(WireModel, omit_defaults=True):
    """A fragment of a function call: `name` on the first fragment, `arguments` pieces after."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(WireModel, omit_defaults=True):
    """A fragment of tool call `index` (missing `index` means the array position)."""

    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class TopLogprob(WireModel):
    """One alternative token and its log probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(WireModel):
    """Log probability of one sampled token, with the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(WireModel):
    """Log probabilities of a choice's answer (and, in DeepSeek thinking mode, reasoning)."""

    content: list[TokenLogprob] | None = None
    reasoning_content: list[TokenLogprob] | None = None


class Delta(WireModel, omit_defaults=True):
    """What one chunk adds to a choice. `reasoning` is Ollama's/OpenRouter's name for
    `reasoning_content`; `reasoning_text` gives whichever is set."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    refusal: str | None = None

    @property
    def reasoning_text(self) -> str | None:
        """`reasoning_content`, or `reasoning` when only that is set."""
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning


class ChunkChoice(WireModel):
    """One choice in a streamed chunk. Azure annotation chunks carry no `delta`."""

    index: int = 0
    delta: Delta | None = None
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(WireModel, omit_defaults=True):
    """OpenAI-style breakdown of prompt tokens."""

    cached_tokens: int | None = None


class CompletionTokensDetails(WireModel, omit_defaults=True):
    """Breakdown of completion tokens; `reasoning_tokens` counts chain-of-thought tokens."""

    reasoning_tokens: int | None = None


class Usage(WireModel):
    """Token usage. DeepSeek: prompt = cache hit + cache miss; completion includes reasoning."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_cache_hit_tokens: int | None = None
    prompt_cache_miss_tokens: int | None = None
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @property
    def reasoning_tokens(self) -> int | None:
        """Chain-of-thought tokens, when reported."""
        details = self.completion_tokens_details
        return None if details is None else details.reasoning_tokens


class ErrorObject(WireModel):
    """An error as providers report it: `{"error": {message, type, param, code}}`."""

    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class ChatCompletionChunk(WireModel):
    """One `chat.completion.chunk` of a stream."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    system_fingerprint: str | None = None
    choices: list[ChunkChoice] = []
    usage: Usage | None = None


class Function(WireModel):
    """A complete function call; `arguments` is a JSON string that may not be valid JSON."""

    name: str = ""
    arguments: str = ""


class ToolCall(WireModel):
    """A complete tool call of an assistant message."""

    id: str = ""
    type: str = "function"
    function: Function = msgspec.field(default_factory=Function)


class Message(WireModel):
    """The assistant message of a non-streamed choice (or of a folded stream)."""

    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class Choice(WireModel):
    """One choice of a non-streamed completion."""

    index: int = 0
    message: Message = msgspec.field(default_factory=Message)
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class AttemptInfo(WireModel, omit_defaults=True):
    """One HTTP attempt behind an answer (see `AnswerMeta`)."""

    route: str
    model: str
    kind: str
    outcome: str
    status_code: int | None = None
    usage: Usage | None = None
    usage_estimated: bool = False


class AnswerMeta(WireModel, omit_defaults=True):
    """What it took to deliver an answer (unbroken's addition to a completion).

    Attributes:
        route: the route that produced the end of the answer.
        model: the model that did.
        attempts: every HTTP attempt, in order.
        retries, resumes, fallbacks, restarts: counts by kind.
        cost_usd: cost of the billed usage (all attempts), from the price table.
        cost_known: False when a model had no price.
        usage_estimated: some attempt broke before reporting usage; its tokens were
            estimated (see `unbroken.core.tokens`).
        answer_usage: the answer's own usage, what one unbroken request would have been
            billed: the original prompt and the completion tokens of the text shown (the
            completion's `usage` is what was billed, every attempt summed).
        answer_usage_estimated: part of `answer_usage` was estimated.
        ttft_s: time to the first token shown.
        duration_s: total time.
        cache: `hit` or `stale` when the answer came from the answer cache, else None.
    """

    route: str = ""
    model: str = ""
    attempts: list[AttemptInfo] = []
    retries: int = 0
    resumes: int = 0
    fallbacks: int = 0
    restarts: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True
    usage_estimated: bool = False
    answer_usage: Usage | None = None
    answer_usage_estimated: bool = False
    ttft_s: float | None = None
    duration_s: float = 0.0
    cache: str | None = None


class ChatCompletion(WireModel):
    """A whole `chat.completion`: the non-streamed answer, or a folded stream."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    system_fingerprint: str | None = None
    choices: list[Choice] = []
    usage: Usage | None = None


class Answer(ChatCompletion):
    """The completion an unbroken client returns: a `ChatCompletion` plus `unbroken`, what
    it took to deliver it (routes, attempts, cost). `usage` is what was billed for the
    answer: every attempt, summed."""

    unbroken: AnswerMeta = msgspec.field(default_factory=AnswerMeta)


class TextChoice(WireModel):
    """One choice of a text (FIM) completion: `text` instead of a message or delta."""

    index: int = 0
    text: str = ""
    logprobs: Any = None
    finish_reason: str | None = None


class TextCompletion(WireModel):
    """A `text_completion` (DeepSeek FIM, `/beta/completions`): a streamed chunk or the
    whole answer, shaped as openai's `Completion`."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    system_fingerprint: str | None = None
    choices: list[TextChoice] = []
    usage: Usage | None = None


class TextAnswer(TextCompletion):
    """The FIM completion an unbroken client returns, with `unbroken` as on `Answer`."""

    unbroken: AnswerMeta = msgspec.field(default_factory=AnswerMeta)


class Model(WireModel):
    """One model of `GET /models` (openai's `Model`)."""

    id: str = ""
    object: str = "model"
    created: int = 0
    owned_by: str = ""


class ModelsPage(WireModel):
    """`GET /models`: iterate it for the models, or read `data` (openai's `SyncPage`)."""

    object: str = "list"
    data: list[Model] = []

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class _ErrorFrame(msgspec.Struct):
    # Every error shape a 200 stream can carry: `{"error": {...}}` (OpenAI, DeepSeek,
    # current vLLM), `{"object": "error", "message": ...}` (old vLLM), and a string `error`.
    # Loosely typed on purpose: an error must never be lost to a type mismatch in it.
    error: Any = None
    object: Any = None
    message: Any = None
    type: Any = None
    code: Any = None


_chunk_decoder = msgspec.json.Decoder(ChatCompletionChunk)
_text_decoder = msgspec.json.Decoder(TextCompletion)
_completion_decoder = msgspec.json.Decoder(ChatCompletion)
_frame_decoder = msgspec.json.Decoder(_ErrorFrame)

# A literal `"error"` (key or value) can only appear unescaped outside JSON strings, so this
# substring test finds every error frame and costs ~50 ns on ordinary chunks.
_ERROR_MARK = b'"error"'


def excerpt(data: bytes | str, limit: int = 120) -> str:
    """A printable excerpt of at most `limit` characters, for error messages."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lenient(data: bytes | str, type_: type[Any]) -> Any:
    # msgspec rejects lone UTF-16 surrogate escapes ("\ud83d"), which some servers emit when
    # they escape an emoji token by token; the stdlib accepts them. Only then is this slower
    # path taken; the accumulator rejoins the halves.
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    try:
        return msgspec.convert(obj, type_)
    except (msgspec.ValidationError, UnicodeError):  # its message may hold the surrogate
        return None


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else json.dumps(value)


def _error_object(fields: dict[str, Any] | _ErrorFrame) -> ErrorObject:
    get = fields.get if isinstance(fields, dict) else lambda key: getattr(fields, key, None)
    code = get("code")
    return ErrorObject(
        message=_text(get("message")) or "",
        type=_text(get("type")),
        param=_text(get("param")),
        code=code if isinstance(code, int | str) and not isinstance(code, bool) else _text(code),
    )


def parse_error_object(data: bytes | str, *, bare: bool = False) -> ErrorObject | None:
    """The error object in `data`, in any of the shapes of protocol.md §2.7, or None when
    `data` is not JSON or holds no error. With `bare`, an object that is itself the error
    (`{"code":400,"message":...}`, as llama.cpp's legacy `error:` line carries) counts too."""
    try:
        frame = _frame_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if bare and frame.error is None and isinstance(frame.message, str):
        return _error_object(frame)
    if isinstance(frame.error, dict):
        return _error_object(frame.error)
    if isinstance(frame.error, str) and frame.error:
        return ErrorObject(message=frame.error)
    if frame.object == "error":
        return _error_object(frame)
    return None


def upstream_error_from_object(
    error: ErrorObject, *, status_code: int = 200
) -> UpstreamStreamError:
    """Build the typed error for an error object received inside a stream."""
    message = error.message or error.type or "the upstream reported an error"
    return UpstreamStreamError(
        f"upstream error in the stream: {message}",
        status_code=status_code,
        kind=_kind_of(error, status_code),
        error_type=error.type,
        error_code=error.code,
    )


def _kind_of(error: ErrorObject, status_code: int) -> ErrorKind:
    code = error.code
    text = f"{error.type} {code} {error.message}".lower()
    if "context_length" in text or "context size" in text or "maximum context" in text:
        return "context_length_exceeded"
    if "rate_limit" in text or "rate limit" in text:
        return "rate_limited"
    if "overload" in text:
        return "overloaded"
    if isinstance(code, int) and 400 <= code < 500:
        return "bad_request"
    if "invalid_request" in text or "badrequest" in text:
        return "bad_request"
    return "server_error" if status_code == 200 else "unknown"


def decode_chunk(data: bytes | str) -> ChatCompletionChunk:
    """Decode the data of one SSE event into a chunk.

    Raises:
        UpstreamStreamError: the event is an error object (any shape in protocol.md §2.7).
        ProtocolError: the data is not JSON or not a chunk; the message quotes an excerpt.
    """
    has_mark = _ERROR_MARK in data if isinstance(data, bytes) else '"error"' in data
    if has_mark:
        error = parse_error_object(data)
        if error is not None:
            raise upstream_error_from_object(error)
    try:
        return _chunk_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        chunk = _lenient(data, ChatCompletionChunk)
        if chunk is not None:
            return chunk  # type: ignore[no-any-return]  # msgspec.convert returns the type
        raise ProtocolError(
            f"malformed chunk from the upstream ({exc}): {excerpt(data)}", excerpt=excerpt(data)
        ) from exc


def decode_text_chunk(data: bytes | str) -> ChatCompletionChunk:
    """Decode one streamed `text_completion` (FIM) event as a chat chunk: each choice's
    `text` becomes its `delta.content`, so the flow, the accumulator and resume treat a
    FIM answer as any other (logprobs of that shape are dropped).

    Raises:
        UpstreamStreamError: the event is an error object.
        ProtocolError: the data is not JSON or not a completion.
    """
    if (_ERROR_MARK in data if isinstance(data, bytes) else '"error"' in data) and (
        error := parse_error_object(data)
    ) is not None:
        raise upstream_error_from_object(error)
    try:
        text = _text_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(
            f"malformed completion chunk from the upstream ({exc}): {excerpt(data)}",
            excerpt=excerpt(data),
        ) from exc
    return ChatCompletionChunk(
        id=text.id,
        created=text.created,
        model=text.model,
        system_fingerprint=text.system_fingerprint,
        choices=[
            ChunkChoice(
                index=c.index,
                delta=Delta(content=c.text) if c.text else None,
                finish_reason=c.finish_reason,
            )
            for c in text.choices
        ],
        usage=text.usage,
    )


def decode_text_completion(data: bytes | str) -> ChatCompletion:
    """Decode a whole non-streamed `text_completion` body as a chat completion (see
    `decode_text_chunk`).

    Raises:
        UpstreamStreamError: the body is an error object.
        ProtocolError: the body is empty, not JSON or not a completion.
    """
    raw = (data.encode() if isinstance(data, str) else data).strip()
    if not raw:
        raise ProtocolError("the upstream sent an empty body", excerpt="")
    chunk = decode_text_chunk(raw)
    return ChatCompletion(
        id=chunk.id,
        created=chunk.created,
        model=chunk.model,
        system_fingerprint=chunk.system_fingerprint,
        choices=[
            Choice(
                index=c.index,
                message=Message(content=c.delta.content if c.delta else ""),
                finish_reason=c.finish_reason,
            )
            for c in chunk.choices
        ],
        usage=chunk.usage,
    )


def decode_completion(data: bytes | str) -> ChatCompletion:
    """Decode a whole non-streamed completion body (leading keep-alive blank lines and a
    trailing `data: [DONE]` that some proxies append are tolerated).

    Raises:
        UpstreamStreamError: the body is an error object.
        ProtocolError: the body is empty, not JSON or not a completion.
    """
    raw = data.encode() if isinstance(data, str) else data
    raw = raw.strip()
    if raw.endswith(b"data: [DONE]"):
        raw = raw[: -len(b"data: [DONE]")].rstrip()
    if not raw:
        raise ProtocolError(
            "the upstream sent an empty body (only keep-alive blank lines, then end of input)",
            excerpt="",
        )
    if _ERROR_MARK in raw:
        error = parse_error_object(raw)
        if error is not None:
            raise upstream_error_from_object(error)
    try:
        return _completion_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        completion = _lenient(raw, ChatCompletion)
        if completion is not None:
            return completion  # type: ignore[no-any-return]  # msgspec.convert returns the type
        raise ProtocolError(
            f"malformed completion body from the upstream ({exc}): {excerpt(raw)}",
            excerpt=excerpt(raw),
        ) from exc


def decode_error_body(body: bytes) -> ErrorObject:
    """Read an HTTP error body: JSON error object (any shape), else the HTML `<title>` or
    the first line of text. Never raises."""
    error = parse_error_object(body)
    if error is not None:
        return error
    text = body.decode("utf-8", "replace").strip()
    lower = text.lower()
    start = lower.find("<title>")
    if start >= 0:
        end = lower.find("</title>", start)
        if end > start:
            return ErrorObject(message=text[start + 7 : end].strip())
    first = text.splitlines()[0] if text else ""
    return ErrorObject(message=excerpt(first, 200))


def completion_to_chunks(completion: ChatCompletion) -> list[ChatCompletionChunk]:
    """Replay a whole completion as the chunks a stream of it would carry.

    Per choice: a role chunk with the reasoning, a chunk with the content, one chunk per
    tool call (whole), then a finish chunk; usage rides on the last chunk (DeepSeek's
    shape). Folding the result with `ChunkAccumulator` gives `completion` back.
    """
    head: dict[str, Any] = {
        "id": completion.id,
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": completion.system_fingerprint,
    }
    chunks: list[ChatCompletionChunk] = []
    for choice in completion.choices:
        msg = choice.message
        chunks.append(
            ChatCompletionChunk(
                **head,
                choices=[
                    ChunkChoice(
                        index=choice.index,
                        delta=Delta(
                            role=msg.role,
                            content=msg.content,
                            reasoning_content=msg.reasoning_content,
                            refusal=msg.refusal,
                        ),
                        logprobs=choice.logprobs,
                    )
                ],
            )
        )
        for k, call in enumerate(msg.tool_calls or ()):
            fragment = ToolCallDelta(
                index=k,
                id=call.id,
                type=call.type,
                function=FunctionDelta(name=call.function.name, arguments=call.function.arguments),
            )
            chunks.append(
                ChatCompletionChunk(
                    **head,
                    choices=[ChunkChoice(index=choice.index, delta=Delta(tool_calls=[fragment]))],
                )
            )
        chunks.append(
            ChatCompletionChunk(
                **head,
                choices=[
                    ChunkChoice(
                        index=choice.index, delta=Delta(), finish_reason=choice.finish_reason
                    )
                ],
            )
        )
    if completion.usage is not None:
        if chunks:
            last = chunks[-1]
            chunks[-1] = ChatCompletionChunk(**head, choices=last.choices, usage=completion.usage)
        else:
            chunks.append(ChatCompletionChunk(**head, usage=completion.usage))
    return chunks


# Only what a choice's text needs of a chunk (`chunk_text`): msgspec skips the rest unread.
class _TextDelta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _TextChoice(msgspec.Struct):
    index: int = 0
    delta: _TextDelta | None = None


class _TextChunk(msgspec.Struct):
    choices: list[_TextChoice] = []


_text_chunk_decoder = msgspec.json.Decoder(_TextChunk)


def chunk_text(payloads: Iterable[bytes], index: int, reasoning: bool) -> list[str]:
    """The pieces of choice `index`'s content (its reasoning with `reasoning`:
    `reasoning_content`, or `reasoning` when only that is set) in the JSON of these chunks,
    in order: what `ChunkAccumulator` folds of them. Payloads that are not chunks (`[DONE]`,
    an error event) add nothing. Reads a chunk several times faster than `decode_chunk`."""
    pieces: list[str] = []
    for payload in payloads:
        pieces += _chunk_pieces(payload, index, reasoning)
    return pieces


def _chunk_pieces(payload: bytes, index: int, reasoning: bool) -> list[str]:
    """The text pieces `chunk_text` takes from one payload."""
    if payload[:1] != b"{":
        return []
    try:
        chunk = _text_chunk_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        chunk = _lenient(payload, _TextChunk)  # lone surrogate halves (see `_lenient`)
        if chunk is None:
            return []
    pieces: list[str] = []
    for choice in chunk.choices:
        delta = choice.delta
        if choice.index != index or delta is None:
            continue
        if reasoning:
            text = delta.reasoning_content
            if text is None:
                text = delta.reasoning
        else:
            text = delta.content
        if text:
            pieces.append(text)
    return pieces


def template_text(
    head: bytes, tail: bytes, values: bytes, index: int, reasoning: bool
) -> str | None:
    """`chunk_text`, joined, of chunks `head + value + tail` whose string values follow
    one another in `values` (none of them ending in a backslash that escapes nothing),
    read from `values` as one JSON string: None when that cannot be done (a quote not
    escaped in them, or a template this cannot read), and then the chunks are to be
    decoded (the gateway's stream log keeps a block of text chunks so: stores/packed.py)."""
    return values_text(values, template_reads(head, tail, index, reasoning))


def template_reads(head: bytes, tail: bytes, index: int, reasoning: bool) -> bool | None:
    """What chunks `head + value + tail` bring of choice `index`'s content (its reasoning
    with `reasoning`), for `template_text`: True, their string value and nothing more;
    False, nothing (the value is another choice's or field's text); None, it cannot be
    said without decoding each (the template is cut around no string value, or text lies
    around the value). The same for every block of a log under one template: asked once."""
    probe = head + b"x" + tail
    try:
        _text_chunk_decoder.decode(probe)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # (a template is cut around a string value of a chunk)
    got = _chunk_pieces(probe, index, reasoning)
    if not got:
        return False
    return True if got == ["x"] else None


def values_text(values: bytes, reads: bool | None) -> str | None:
    """`template_text` of `values` under a template `template_reads` said `reads` of."""
    if b'"' in values and b'"' in values.replace(b"\\\\", b"").replace(b'\\"', b""):
        # A quote not escaped (the escapes read in order, as a JSON string's are): the
        # values are not all string contents. Escaped ones (`\"`, common in code) are read.
        return None
    if reads is None:
        return None
    if not reads:
        return ""  # the value is another choice's or field's text
    if b"\\" not in values:
        try:
            return values.decode()  # no escape: the value is the text as UTF-8
        except UnicodeDecodeError:
            return None
    data = b'"' + values + b'"'
    try:
        return _string_decoder.decode(data)
    except msgspec.DecodeError:  # lone surrogate halves (see `_lenient`)
        try:
            return json.loads(data)  # type: ignore[no-any-return]  # a JSON string
        except ValueError:
            return None


_string_decoder = msgspec.json.Decoder(str)
