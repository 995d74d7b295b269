"""FIM (fill in the middle, `POST /beta/completions`) and `GET /models/{id}` for the mock.

A FIM request is served by the chat machinery (faults, latency, usage, logs): it becomes a
chat request whose answer depends on the model, the seed and the `suffix`, and is rendered
as `text_completion` chunks (protocol.md §1.12). A client that resumes a broken FIM answer
sends the prompt with the partial text appended; the longest start of the answer that the
prompt ends with is taken as already written, so the rest follows, as a real model would
continue its own text. Imports mock siblings only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from unbroken.mock.apierrors import ApiError, error_body, invalid, unprocessable
from unbroken.mock.config import MockConfig
from unbroken.mock.render import FINGERPRINT, ChunkRenderer, Usage, encode_json
from unbroken.mock.request import MODELS
from unbroken.mock.text import Answer, generate_answer

__all__ = [
    "FIM_PATHS",
    "MODEL_ITEM_PREFIXES",
    "MODEL_LIST",
    "TextChunkRenderer",
    "fim_chat_body",
    "model_object",
    "text_completion_body",
    "usage_chunk_events",
]

FIM_PATHS = frozenset({"/beta/completions"})
MODEL_ITEM_PREFIXES = ("/models/", "/v1/models/", "/beta/models/")
# The models `GET /models` lists (protocol.md §1.1).
MODEL_LIST = ("deepseek-chat", "deepseek-reasoner")
# DeepSeek's FIM limit on max_tokens (protocol.md §1.12).
FIM_MAX_TOKENS = 4096
# Fields of a FIM body the chat machinery takes as they are.
_PASSED = (
    "model",
    "max_tokens",
    "stream",
    "stream_options",
    "stop",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)
_FIM_ONLY = ("prompt", "suffix", "echo", "logprobs")


def model_object(model_id: str) -> bytes:
    """The body of `GET /models/{id}`.

    Raises:
        ApiError: 404 for a model the mock does not serve.
    """
    if model_id not in MODEL_LIST:
        raise ApiError(
            404,
            error_body(f"The model `{model_id[:100]}` does not exist", "invalid_request_error"),
            kind="not_found",
        )
    return encode_json({"id": model_id, "object": "model", "owned_by": "deepseek"})


def _fim_user(suffix: str) -> dict[str, Any]:
    # The answer depends on the suffix only (and model and seed): the prompt grows with a
    # resume, the suffix does not.
    return {"role": "user", "content": "<fim_suffix>" + suffix}


def _answer_text(answer: Answer) -> str:
    return "".join(answer.content)


def fim_chat_body(raw: bytes, config: MockConfig) -> bytes:
    """The chat request that serves a FIM request.

    Raises:
        ApiError: 400/422 for a malformed FIM request (as DeepSeek answers them).
    """
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise invalid("Failed to deserialize the JSON body into the target type") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(set(body) - set(_PASSED) - set(_FIM_ONLY))
    if unknown:
        raise invalid(f"unknown field `{unknown[0][:60]}` for FIM completions")
    model = body.get("model")
    info = MODELS.get(model) if isinstance(model, str) else None
    if info is None:
        raise invalid(f"Model Not Exist: {str(model)[:60]}")
    if info.thinking:
        raise invalid("FIM completions are not supported by the thinking model")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise unprocessable("`prompt` must be a string")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise unprocessable("`suffix` must be a string")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > FIM_MAX_TOKENS:
        raise ApiError(
            422,
            error_body(
                f"max_tokens must be <= {FIM_MAX_TOKENS} for FIM, got {max_tokens}",
                "invalid_request_error",
            ),
        )
    user = _fim_user(suffix or "")
    seed = body.get("seed")
    full = _answer_text(
        generate_answer(
            False,
            [user],
            seed if isinstance(seed, int) else config.seed,
            answer_tokens=config.answer_tokens,
        )
    )
    messages: list[dict[str, Any]] = [user]
    written = _written(prompt, full)
    if written:
        messages.append({"role": "assistant", "content": written, "prefix": True})
    chat = {k: body[k] for k in _PASSED if k in body}
    chat["messages"] = messages
    return encode_json(chat)


def _written(prompt: str, full: str) -> str:
    """The longest start of `full` that `prompt` ends with (what a resume already has)."""
    for k in range(min(len(prompt), len(full)), 0, -1):
        if prompt.endswith(full[:k]):
            return full[:k]
    return ""


class TextChunkRenderer(ChunkRenderer):
    """Renders the chat machinery's events as `text_completion` chunks (FIM)."""

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        *,
        thinking: bool,
        include_usage: bool,
        eol: bytes = b"\n",
        data_prefix: bytes = b"data: ",
    ) -> None:
        super().__init__(
            completion_id,
            created,
            model,
            thinking=thinking,
            include_usage=include_usage,
            eol=eol,
            data_prefix=data_prefix,
        )
        self._head = (
            data_prefix
            + encode_json(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": FINGERPRINT,
                }
            )[:-1]
            + b',"choices":[{"index":0,"text":'
        )

    def role(self) -> bytes:
        """The first chunk: an empty text (keeps the chat positions of faults)."""
        return self._head + b'""' + self._open_tail

    def content(self, pieces: Sequence[str]) -> list[bytes]:
        """One chunk per piece of text."""
        return [self._head + encode_json(p) + self._open_tail for p in pieces]

    def final(self, finish_reason: str, usage: Usage) -> bytes:
        """The last chunk: no text, the finish_reason and the usage."""
        return (
            self._head
            + b'"","logprobs":null,"finish_reason":'
            + encode_json(finish_reason)
            + b'}],"usage":'
            + encode_json(usage.as_dict())
            + b"}"
            + self._end
        )

    def malformed(self) -> bytes:
        """A chunk whose JSON is cut short."""
        return self._head + b'"\xe4\xb8\x80 broken' + self._end


def text_completion_body(
    completion_id: str,
    created: int,
    model: str,
    answer: Answer,
    *,
    thinking: bool,
    finish_reason: str,
    usage: Usage,
) -> bytes:
    """A whole non-streamed `text_completion`."""
    del thinking  # FIM is non-thinking only
    return encode_json(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "text": _answer_text(answer),
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage.as_dict(),
        }
    )


def usage_chunk_events(renderer: ChunkRenderer, finish_reason: str, usage: Usage) -> list[bytes]:
    """OpenAI's end of an `include_usage` stream: the finish chunk with `"usage": null`,
    then a chunk with `"choices": []` and the usage (`MockConfig.usage_chunk`)."""
    final = renderer.final(finish_reason, usage)
    marker = b',"usage":'
    head, _, _ = final.rpartition(marker)
    end = renderer.end_of_event
    finish = head + b',"usage":null}' + end
    # The head of every chunk up to its choices, reused for the usage-only chunk.
    prefix = final[: final.index(b',"choices":[')]
    return [finish, prefix + b',"choices":[],"usage":' + encode_json(usage.as_dict()) + b"}" + end]
