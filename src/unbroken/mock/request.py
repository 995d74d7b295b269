"""Validation of a chat completion request against DeepSeek's rules (protocol.md §1.3, §1.10,
§1.11, §6): a JSON body in, a `ChatRequest` or an `ApiError` naming the problem out.

400 is for a body that cannot be read as a request (not JSON, wrong structure, rules about
messages and prefixes); 422 is for a parameter of the wrong type or out of range. Imports the
standard library, msgspec and mock siblings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from unbroken.mock.apierrors import ApiError, invalid, unprocessable
from unbroken.mock.text import message_text

__all__ = ["MODELS", "ChatRequest", "ModelInfo", "asks_to_continue", "parse_chat_request"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a model id means to the mock.

    Attributes:
        thinking: thinking mode by default (reasoning first).
        allows_prefill: accepts a trailing assistant prefix (`prefix` / vLLM continuation).
        family: the model whose answers it gives (a `-noprefill` variant answers as its base,
            so falling back between them changes nothing in the text).
    """

    thinking: bool
    allows_prefill: bool
    family: str


MODELS: dict[str, ModelInfo] = {
    "deepseek-chat": ModelInfo(False, True, "deepseek-chat"),
    "deepseek-reasoner": ModelInfo(True, True, "deepseek-reasoner"),
    # Variants that reject assistant prefill with a 400, as some providers do: for testing
    # capability-aware fallbacks.
    "deepseek-chat-noprefill": ModelInfo(False, False, "deepseek-chat"),
    "deepseek-reasoner-noprefill": ModelInfo(True, False, "deepseek-reasoner"),
}

# max_tokens default and maximum per mode, V3.2 profile (protocol.md §1.2).
_CHAT_MAX_TOKENS = (4096, 8192)
_THINKING_MAX_TOKENS = (32768, 65536)
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROLES = ("system", "user", "assistant", "tool")
_THINKING_DOC = "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat completion request.

    Attributes:
        model: the model id as sent (echoed in the answer).
        info: what the model id means.
        thinking: thinking mode for this request (the model's default or `thinking`).
        messages: the messages as sent.
        conversation: the messages without a trailing assistant prefix.
        prefix: (reasoning, content) of the trailing assistant prefix, or None.
        stream: stream the answer.
        include_usage: `stream_options.include_usage`.
        max_tokens: the explicit `max_tokens`, or None.
        default_max_tokens: the mode's default for `max_tokens`.
        stop: stop sequences.
        tools: tool definitions.
        tool_choice: `none`, `auto`, `required`, a named function, or None.
        json_mode: `response_format` json_object.
        seed: the request's `seed`, or None.
    """

    model: str
    info: ModelInfo
    thinking: bool
    messages: list[dict[str, Any]]
    conversation: list[dict[str, Any]]
    prefix: tuple[str | None, str] | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    default_max_tokens: int
    stop: tuple[str, ...]
    tools: list[dict[str, Any]]
    tool_choice: object
    json_mode: bool
    seed: int | None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _wrong_type(name: str, expected: str, value: object) -> ApiError:
    return unprocessable(f"invalid type for `{name}`: expected {expected}, got {_type_name(value)}")


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(name, "a number", value)
    if not low <= value <= high:
        raise unprocessable(f"`{name}` must be within [{low:g}, {high:g}], got {value!r}")


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)
    return value


def _check_message(index: int, message: object, n_messages: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{where} must be an object, got {_type_name(message)}")
    role = message.get("role")
    if role not in _ROLES:
        shown = role if isinstance(role, str) else _type_name(role)
        raise invalid(
            f"{where}: unknown variant `{str(shown)[:40]}` for `role`, "
            f"expected one of `system`, `user`, `assistant`, `tool`"
        )
    content = message.get("content")
    if isinstance(content, list):
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise invalid(
                    f"{where}.content[{k}]: unknown variant `{str(kind)[:40]}`, expected `text`"
                )
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content[{k}]: missing field `text`")
    elif content is None:
        if role != "assistant":
            raise invalid(f"{where}: missing field `content` for a `{role}` message")
    elif not isinstance(content, str):
        raise invalid(f"{where}.content must be a string or an array of text parts")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"{where}.name must be a string")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise invalid(f"{where}: missing field `tool_call_id` for a `tool` message")
    prefix = message.get("prefix")
    if prefix is not None and not isinstance(prefix, bool):
        raise invalid(f"{where}.prefix must be a boolean")
    if prefix:
        if role != "assistant":
            raise invalid(f"{where}: `prefix` is only allowed on an assistant message")
        if index != n_messages - 1:
            raise invalid(
                f"{where}: `prefix: true` is only allowed on the last message "
                "(chat prefix completion continues the final assistant message)"
            )
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise invalid(f"{where}.reasoning_content must be a string")
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise invalid(f"{where}.tool_calls must be an array on an assistant message")
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(call, dict)
                or not isinstance(call.get("id"), str)
                or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)
            ):
                raise invalid(
                    f"{where}.tool_calls[{k}] must be "
                    '{"id": str, "type": "function", "function": {"name": str, "arguments": str}}'
                )
    return message


def _check_tool_sequence(messages: list[dict[str, Any]]) -> None:
    # OpenAI's (and DeepSeek's) pairing rule: each assistant tool call is answered by a tool
    # message right after it, and a tool message answers one of those calls.
    pending: set[str] = set()
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message["tool_call_id"]
            if call_id not in pending:
                raise invalid(
                    f"messages[{index}]: messages with role 'tool' must be a response to a "
                    f"preceding message with 'tool_calls' (unknown tool_call_id {call_id[:60]!r})"
                )
            pending.discard(call_id)
            continue
        if pending:
            raise invalid(
                f"messages[{index}]: an assistant message with 'tool_calls' must be followed by "
                "tool messages responding to each 'tool_call_id' "
                f"(missing: {', '.join(sorted(pending))[:120]})"
            )
        if role == "assistant" and message.get("tool_calls"):
            pending = {call["id"] for call in message["tool_calls"]}
    if pending and not messages[-1].get("prefix"):
        raise invalid(
            "an assistant message with 'tool_calls' must be followed by tool messages "
            f"responding to each 'tool_call_id' (missing: {', '.join(sorted(pending))[:120]})"
        )


def _check_tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], object]:
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _wrong_type("tools", "an array", tools)
    if len(tools) > 128:
        raise unprocessable(f"`tools` holds {len(tools)} functions; at most 128 are allowed")
    names = []
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise unprocessable(f'tools[{k}] must be {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise unprocessable(
                f"tools[{k}].function.name must match [A-Za-z0-9_-]{{1,64}}, got {name!r:.80}"
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise unprocessable(f"tools[{k}].function.parameters must be a JSON schema object")
        names.append(name)
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto", "required"):
        pass
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise unprocessable(
                '`tool_choice` must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}'
            )
        if name not in names:
            raise unprocessable(f"`tool_choice` names {name[:64]!r}, which is not in `tools`")
    else:
        raise unprocessable(
            f'`tool_choice` must be "none", "auto", "required" or an object, got {choice!r:.60}'
        )
    if (choice == "required" or isinstance(choice, dict)) and not tools:
        raise unprocessable("`tool_choice` requires `tools`")
    return tools, choice


def parse_chat_request(raw: bytes, *, is_beta: bool) -> ChatRequest:
    """Validate a chat completion request body.

    Args:
        raw: the request body.
        is_beta: the request came to `/beta/...` (needed for `prefix: true`).

    Raises:
        ApiError: 400 or 422 with a DeepSeek-shaped body naming the problem.
    """
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid(f"Failed to parse the request body as JSON: {exc}") from None
    except RecursionError:
        raise invalid("Failed to parse the request body as JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is None:
        raise invalid("missing field `model`")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    info = MODELS.get(model)
    if info is None:
        raise ApiError(
            400,
            invalid("Model Not Exist").body,
            kind="model_not_exist",
        )
    messages = body.get("messages")
    if messages is None:
        raise invalid("missing field `messages`")
    if not isinstance(messages, list):
        raise invalid(f"`messages` must be an array, got {_type_name(messages)}")
    if not messages:
        raise invalid("`messages` must not be empty")
    checked = [_check_message(i, m, len(messages)) for i, m in enumerate(messages)]
    _check_tool_sequence(checked)

    thinking = info.thinking
    switch = body.get("thinking")
    if switch is not None:
        kind = switch.get("type") if isinstance(switch, dict) else None
        if kind not in ("enabled", "disabled"):
            raise unprocessable('`thinking` must be {"type": "enabled"} or {"type": "disabled"}')
        thinking = kind == "enabled"

    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        if not stream:
            raise invalid("`stream_options` is only allowed when `stream` is true")
        usage_flag = options.get("include_usage")
        if usage_flag is not None and not isinstance(usage_flag, bool):
            raise _wrong_type("stream_options.include_usage", "a boolean", usage_flag)
        include_usage = bool(usage_flag)

    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    logprobs = _bool(body, "logprobs")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int):
            raise _wrong_type("top_logprobs", "an integer", top_logprobs)
        if not 0 <= top_logprobs <= 20:
            raise unprocessable(f"`top_logprobs` must be within [0, 20], got {top_logprobs}")
        if not logprobs:
            raise unprocessable("`top_logprobs` requires `logprobs` to be true")

    default_max, high_max = _THINKING_MAX_TOKENS if thinking else _CHAT_MAX_TOKENS
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise _wrong_type("max_tokens", "an integer", max_tokens)
        if not 1 <= max_tokens <= high_max:
            raise unprocessable(
                f"Invalid max_tokens value, the valid range of max_tokens is [1, {high_max}]"
            )

    stop_value = body.get("stop")
    stop: tuple[str, ...] = ()
    if isinstance(stop_value, str):
        stop = (stop_value,)
    elif isinstance(stop_value, list):
        if len(stop_value) > 16 or not all(isinstance(s, str) for s in stop_value):
            raise unprocessable("`stop` must be a string or an array of at most 16 strings")
        stop = tuple(stop_value)
    elif stop_value is not None:
        raise _wrong_type("stop", "a string or an array of strings", stop_value)

    tools, tool_choice = _check_tools(body)

    format_value = body.get("response_format")
    json_mode = False
    if format_value is not None:
        kind = format_value.get("type") if isinstance(format_value, dict) else None
        if kind not in ("text", "json_object"):
            raise unprocessable(
                '`response_format` must be {"type": "text"} or {"type": "json_object"}'
            )
        json_mode = kind == "json_object"
        if json_mode and not any("json" in message_text(m.get("content")).lower() for m in checked):
            raise invalid(
                "Prompt must contain the word 'json' in some form to use 'response_format' of "
                "type 'json_object'"
            )

    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _wrong_type("seed", "an integer", seed)

    prefix = _trailing_prefix(body, checked, info, model, is_beta=is_beta)
    conversation = checked[:-1] if prefix is not None else checked
    if prefix is None and asks_to_continue(checked):
        # An obedient model told "your answer was cut off, continue" continues it: the same
        # answer as a prefix continuation, on any route (prefill or not).
        cut = checked[-2]
        prefix = (None, message_text(cut.get("content")))
        conversation = checked[:-2]
    if thinking:
        for index, message in enumerate(conversation):
            if (
                message["role"] == "assistant"
                and message.get("tool_calls")
                and not isinstance(message.get("reasoning_content"), str)
            ):
                raise invalid(
                    "Missing `reasoning_content` field in the assistant message at message "
                    f"index {index}. For more information, please refer to {_THINKING_DOC}"
                )
    return ChatRequest(
        model=model,
        info=info,
        thinking=thinking,
        messages=checked,
        conversation=conversation,
        prefix=prefix,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        default_max_tokens=default_max,
        stop=stop,
        tools=tools,
        tool_choice=tool_choice,
        json_mode=json_mode,
        seed=seed,
    )


def asks_to_continue(messages: list[dict[str, Any]]) -> bool:
    """A final user turn saying the assistant turn before it was cut off and asking to
    continue it (the `instruction` resume of routes without prefill)."""
    if len(messages) < 2 or messages[-1]["role"] != "user":
        return False
    before = messages[-2]
    if before["role"] != "assistant" or before.get("tool_calls"):
        return False
    text = message_text(messages[-1].get("content")).lower()
    return "cut off" in text and "continue" in text


def _trailing_prefix(
    body: Mapping[str, Any],
    messages: list[dict[str, Any]],
    info: ModelInfo,
    model: str,
    *,
    is_beta: bool,
) -> tuple[str | None, str] | None:
    last = messages[-1]
    continue_final = _bool(body, "continue_final_message")
    add_prompt = body.get("add_generation_prompt")
    if add_prompt is not None and not isinstance(add_prompt, bool):
        raise _wrong_type("add_generation_prompt", "a boolean", add_prompt)
    if continue_final:
        # vLLM's rules (protocol.md §2.2): add_generation_prompt defaults to true.
        if add_prompt is not False:
            raise invalid(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True "
                "(send add_generation_prompt: false)"
            )
        if last["role"] != "assistant":
            raise invalid(
                "`continue_final_message` requires the final message to be an assistant message"
            )
    is_prefix = bool(last.get("prefix")) and last["role"] == "assistant"
    if is_prefix and not is_beta and not continue_final:
        raise invalid(
            "`prefix: true` (chat prefix completion) is a beta feature: send the request to the "
            "beta base URL, POST /beta/chat/completions"
        )
    if not (is_prefix or continue_final):
        return None
    if not info.allows_prefill:
        raise ApiError(
            400,
            invalid(
                f"model {model} does not support assistant prefill "
                "(a final assistant message with `prefix: true` or `continue_final_message`)"
            ).body,
            kind="prefill_unsupported",
        )
    reasoning = last.get("reasoning_content")
    return (reasoning if isinstance(reasoning, str) else None, message_text(last.get("content")))
