"""Reading a chat request body: JSON, the types of the fields we rely on, the model and
per-request `fallbacks`. Everything else passes through to the upstream untouched.

Every problem is a 4xx `GatewayError` naming the field (`param`) and what was expected.
Imports msgspec, core.tokens and gateway siblings.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Any, Literal

import msgspec

from unbroken.core.tokens import estimate_prompt_tokens
from unbroken.gateway.problems import GatewayError

__all__ = ["MAX_FALLBACKS", "MAX_JSON_DEPTH", "ChatRequest", "decode_json", "parse_chat_request"]

# More fallbacks than this only multiply the time a failing request takes.
MAX_FALLBACKS = 8
# The deepest nesting of arrays and objects accepted in a body: far beyond any real chat
# request or tool schema, far below where a decoder or encoder recurses out of stack.
MAX_JSON_DEPTH = 128
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
# (field, accepted types, description, low, high) for the body fields the gateway or the
# SDK rely on; a wrong type here would otherwise surface as an upstream 4xx or a crash.
_FIELDS: tuple[tuple[str, tuple[type, ...], str, float | None, float | None], ...] = (
    ("stream", (bool,), "a boolean", None, None),
    ("max_tokens", (int,), "an integer >= 1", 1, None),
    ("max_completion_tokens", (int,), "an integer >= 1", 1, None),
    ("n", (int,), "an integer in [1, 16]", 1, 16),
    ("temperature", (int, float), "a number in [0, 2]", 0, 2),
    ("top_p", (int, float), "a number in [0, 1]", 0, 1),
    ("presence_penalty", (int, float), "a number in [-2, 2]", -2, 2),
    ("frequency_penalty", (int, float), "a number in [-2, 2]", -2, 2),
    ("seed", (int,), "an integer", None, None),
    ("logprobs", (bool,), "a boolean", None, None),
    ("top_logprobs", (int,), "an integer in [0, 20]", 0, 20),
    ("stream_options", (dict,), "an object", None, None),
    ("response_format", (dict,), "an object", None, None),
    ("tools", (list,), "an array of tools", None, None),
    ("tool_choice", (str, dict), "a string or an object", None, None),
    ("user", (str,), "a string", None, None),
    ("stop", (str, list), "a string or an array of strings", None, None),
)
_FIELD_SPECS = {spec[0]: spec for spec in _FIELDS}


# The checks below as msgspec types, run in one `msgspec.convert` (C): a body they pass is one
# the Python checks pass unchanged (each type here is at least as strict as its check; a
# duplicate key is checked at each occurrence), so those are skipped; any other body goes
# through the Python checks, which name the problem. ~300 bytecodes less a request.
_Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
_Double = Annotated[float, msgspec.Meta(ge=0, le=2)]
_Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]


class _Message(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[Any] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Checked(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    fallbacks: list[str] | None = None
    stream: bool | None = None
    max_tokens: _Positive | None = None
    max_completion_tokens: _Positive | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = None
    temperature: _Double | None = None
    top_p: _Unit | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    stream_options: _StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None
    stop: str | list[str] | None = None


class ChatRequest:
    """A checked chat request.

    Attributes:
        model: the model asked for.
        messages: the conversation (as sent).
        stream: stream the answer (SSE) or answer with one JSON body.
        fallbacks: route names or model names to try after the configured routes.
        extra: every other field, passed to the upstream as is.
        estimated_tokens: prompt estimate plus `max_tokens` (for token limits); when not
            given, worked out from `messages` the first time it is read.
        max_tokens: the completion budget the request set, if any.
    """

    __slots__ = ("_estimate", "extra", "fallbacks", "max_tokens", "messages", "model", "stream")

    def __init__(
        self,
        model: str,
        messages: list[dict[str, Any]],
        stream: bool,
        fallbacks: list[str],
        extra: dict[str, Any],
        estimated_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.messages = messages
        self.stream = stream
        self.fallbacks = fallbacks
        self.extra = extra
        self._estimate = estimated_tokens
        self.max_tokens = max_tokens

    @property
    def estimated_tokens(self) -> int:
        """Prompt estimate plus `max_tokens`. Worked out when first read: only token
        limits read it, and a non-ASCII prompt costs a Python step per character to
        estimate (an 8 KB Chinese prompt: ~1 ms on the way to the upstream request)."""
        estimate = self._estimate
        if estimate is None:
            estimate = self._estimate = estimate_prompt_tokens(_texts(self.messages)) + int(
                self.max_tokens or 0
            )
        return estimate

    def __repr__(self) -> str:
        return (
            f"ChatRequest(model={self.model!r}, messages={self.messages!r}, "
            f"stream={self.stream!r}, fallbacks={self.fallbacks!r}, extra={self.extra!r}, "
            f"estimated_tokens={self.estimated_tokens!r}, max_tokens={self.max_tokens!r})"
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not ChatRequest:
            return NotImplemented
        return (
            self.model,
            self.messages,
            self.stream,
            self.fallbacks,
            self.extra,
            self.estimated_tokens,
            self.max_tokens,
        ) == (
            other.model,
            other.messages,
            other.stream,
            other.fallbacks,
            other.extra,
            other.estimated_tokens,
            other.max_tokens,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it was


def _bad(message: str, param: str | None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def _check_field(body: dict[str, Any], spec: tuple[Any, ...]) -> None:
    name, types, what, low, high = spec
    if name not in body or body[name] is None:
        return
    value = body[name]
    if type(value) is float and float not in types and int in types and value.is_integer():
        # JSON does not tell 1 from 1.0 (JSON Schema's "integer" takes both); the upstream
        # may, so an integral number is sent on as an integer.
        body[name] = value = int(value)
    if isinstance(value, bool) and bool not in types:
        raise _bad(f"{name} must be {what}, got a boolean", name, "invalid_type")
    if not isinstance(value, types):
        raise _bad(f"{name} must be {what}, got {type(value).__name__}", name, "invalid_type")
    in_range = low is None or (value >= low and (high is None or value <= high))
    if isinstance(value, int | float) and not in_range:
        raise _bad(f"{name} must be {what}, got {value!r}", name)


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return texts


def decode_json(raw: bytes) -> Any:
    """Decode a JSON request body, refusing nesting deeper than `MAX_JSON_DEPTH`.

    Raises:
        GatewayError: 400 `invalid_json` for malformed or too deeply nested JSON.
    """
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        # msgspec recurses once per level; it gives up near the interpreter's limit.
        raise _too_deep() from None
    # A cheap bound first (C speed): a body with few brackets cannot be deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        _check_depth(body)
    return body


def _too_deep() -> GatewayError:
    return _bad(
        f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels",
        None,
        "invalid_json",
    )


def _check_depth(body: Any) -> None:
    # Level by level, so the check itself cannot run out of stack.
    level = [body]
    depth = 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below
        depth += 1


def parse_chat_request(raw: bytes, models: Collection[str], routes: Collection[str]) -> ChatRequest:
    """Parse and check a chat body.

    Args:
        raw: the request body.
        models: the model names this gateway serves.
        routes: the configured route names (allowed in `fallbacks`).

    Raises:
        GatewayError: 400 for malformed JSON, wrong types or bad values; 404 for a model
            the gateway does not serve.
    """
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON chat request", None, "invalid_json")
    body = decode_json(raw)
    if type(body) is dict:
        try:
            checked = msgspec.convert(body, _Checked)
        except msgspec.ValidationError:
            pass  # the checks below say what is wrong
        else:
            model = checked.model
            if model in models and not checked.fallbacks:
                # The common body, checked: what the checks below do to it, without them.
                del body["model"]
                messages = body.pop("messages")
                body.pop("fallbacks", None)
                if checked.n is None:
                    body.pop("n", None)
                max_tokens = checked.max_tokens or checked.max_completion_tokens or None
                return ChatRequest(
                    model,
                    messages,
                    bool(body.pop("stream", False)),
                    [],
                    body,
                    None,  # estimated when read (token limits)
                    max_tokens,
                )
    return _checked_request(body, models, routes)


def _checked_request(body: Any, models: Collection[str], routes: Collection[str]) -> ChatRequest:
    """`parse_chat_request` of a body that `_Checked` does not take, or that names a model
    not served or fallbacks: each check in turn, the first to fail raising."""
    if not isinstance(body, dict):
        raise _bad(
            f"the request body must be a JSON object, got {type(body).__name__}",
            None,
            "invalid_json",
        )
    model = body.pop("model", None)
    if not isinstance(model, str) or not model:
        raise _bad("model is required and must be a non-empty string", "model", "invalid_type")
    if model not in models:
        raise GatewayError(
            404,
            f"the model {model[:100]!r} is not served here; available: "
            f"{', '.join(sorted(models))} (GET /v1/models)",
            code="model_not_found",
            param="model",
            type="invalid_request_error",
        )
    messages = body.pop("messages", None)
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty array of messages", "messages", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, got {role!r:.40}",
                f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(
                f"messages[{i}].content must be a string, an array of parts or null",
                f"messages[{i}].content",
                "invalid_type",
            )
    # Most requests set few of these fields: the body's own (what is left of it) are looked
    # up, not every field's name in the body (17 lookups a request).
    for name in body:
        spec = _FIELD_SPECS.get(name)
        if spec is not None:
            _check_field(body, spec)

    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise _bad("stop must be a string or an array of strings", "stop", "invalid_type")
    options = body.get("stream_options")
    if isinstance(options, dict) and not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options.include_usage must be a boolean", "stream_options")
    fallbacks = body.pop("fallbacks", None)
    if fallbacks is None:
        fallbacks = []
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        raise _bad(
            "fallbacks must be an array of model or route names", "fallbacks", "invalid_type"
        )
    if len(fallbacks) > MAX_FALLBACKS:
        raise _bad(f"fallbacks may name at most {MAX_FALLBACKS} entries", "fallbacks")
    for name in fallbacks:
        if name not in models and name not in routes:
            # Only names the operator configured: a client never picks an upstream URL.
            raise _bad(
                f"fallbacks: {name[:100]!r} is neither a served model nor a configured route",
                "fallbacks",
            )
    if "n" in body and body["n"] is None:
        # null is OpenAI's "not set"; the SDK counts choices by `n`, so it is left out.
        del body["n"]
    stream = bool(body.pop("stream", False))
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or None
    return ChatRequest(model, messages, stream, fallbacks, body, None, max_tokens)
