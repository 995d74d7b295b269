"""The wire types' openai-style dumps, FIM (`text_completion`) decoding and model pages."""

from __future__ import annotations

import json

import pytest

from unbroken.core.stream import ChatStreamDecoder
from unbroken.core.wire import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    Model,
    ModelsPage,
    Usage,
    decode_text_chunk,
    decode_text_completion,
)
from unbroken.errors import ProtocolError, UpstreamStreamError

CHUNK = ChatCompletionChunk(
    id="c1",
    created=7,
    model="m",
    choices=[ChunkChoice(index=0, delta=Delta(content="héllo"), finish_reason=None)],
)


def test_dumps_are_plain_data_and_json() -> None:
    """model_dump/to_dict give dicts, model_dump_json/to_json give the same as JSON."""
    expected = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": {"content": "héllo"}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    }
    assert CHUNK.model_dump() == expected
    assert CHUNK.to_dict() == expected
    assert json.loads(CHUNK.model_dump_json()) == expected
    assert json.loads(CHUNK.to_json()) == expected
    assert "héllo" in CHUNK.model_dump_json()  # raw UTF-8, as openai's pydantic dumps
    assert "\n  " in CHUNK.to_json()  # indented by default, as openai's to_json
    assert "\n" not in CHUNK.model_dump_json()


def test_exclude_none_drops_nulls_at_every_depth() -> None:
    """exclude_none=True leaves out None fields, also inside lists."""
    dumped = CHUNK.model_dump(exclude_none=True)
    assert "usage" not in dumped
    assert dumped["choices"] == [{"index": 0, "delta": {"content": "héllo"}}]
    assert json.loads(CHUNK.to_json(exclude_none=True))["choices"][0] == {
        "index": 0,
        "delta": {"content": "héllo"},
    }


FIM_CHUNK = (
    b'{"id":"f1","object":"text_completion","created":3,"model":"deepseek-chat",'
    b'"choices":[{"text":"x = 1","index":0,"logprobs":null,"finish_reason":null}]}'
)
FIM_END = (
    b'{"id":"f1","object":"text_completion","created":3,"model":"deepseek-chat",'
    b'"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}'
)


def test_text_chunks_read_as_chat_deltas() -> None:
    """A FIM chunk's text becomes delta.content; an empty text is no delta."""
    chunk = decode_text_chunk(FIM_CHUNK)
    assert chunk.choices[0].delta == Delta(content="x = 1")
    end = decode_text_chunk(FIM_END.decode())
    assert end.choices[0].delta is None
    assert end.choices[0].finish_reason == "stop"
    assert end.usage == Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7)


def test_text_stream_decodes_through_the_chat_decoder() -> None:
    """ChatStreamDecoder(text_completions=True) folds a FIM stream like a chat one."""
    decoder = ChatStreamDecoder(text_completions=True)
    body = b"data: " + FIM_CHUNK + b"\n\ndata: " + FIM_END + b"\n\ndata: [DONE]\n\n"
    chunks = decoder.feed(body)
    assert [c.choices[0].finish_reason for c in chunks] == [None, "stop"]
    assert decoder.done


def test_text_completion_body() -> None:
    """A whole FIM body (also as the JSON answer to a stream request) is a completion."""
    body = FIM_END.replace(b'"text":""', b'"text":"def f(): pass"')
    completion = decode_text_completion(b"\n" + body + b"\n")
    assert completion.choices[0].message.content == "def f(): pass"
    assert completion.usage is not None
    decoder = ChatStreamDecoder(text_completions=True)
    decoder.feed(body)
    (chunk,) = [c for c in decoder.flush() if c.choices and (c.choices[0].delta or Delta()).content]
    assert chunk.choices[0].delta is not None
    assert chunk.choices[0].delta.content == "def f(): pass"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", ProtocolError),
        (b"{not json", ProtocolError),
        (b'{"choices":"x"}', ProtocolError),
        (b'{"error":{"message":"boom","type":"server_error"}}', UpstreamStreamError),
    ],
)
def test_bad_text_completions_are_typed_errors(data: bytes, error: type[Exception]) -> None:
    """Malformed or error bodies raise the same typed errors as chat ones."""
    with pytest.raises(error):
        decode_text_completion(data)


def test_a_models_page_iterates_its_models() -> None:
    """A page is iterable and sized, as openai's SyncPage."""
    page = ModelsPage(data=[Model(id="a"), Model(id="b", owned_by="x")])
    assert [m.id for m in page] == ["a", "b"]
    assert len(page) == 2
    assert page.to_dict()["data"][1] == {
        "id": "b",
        "object": "model",
        "created": 0,
        "owned_by": "x",
    }
