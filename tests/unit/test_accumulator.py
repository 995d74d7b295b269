"""Unit tests of core.accumulator and core.wire: folding, replay, tolerance, decoding."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.core import accumulator
from unbroken.core.accumulator import ChunkAccumulator, join_text
from unbroken.core.events import ReasoningEvent, RoleEvent, TextEvent, ToolCallEvent
from unbroken.core.stream import fold
from unbroken.core.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    ErrorObject,
    Function,
    FunctionDelta,
    Message,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    completion_to_chunks,
    decode_chunk,
    decode_completion,
    decode_error_body,
    excerpt,
    parse_error_object,
)
from unbroken.errors import ProtocolError, UpstreamStreamError

_texts = st.one_of(st.none(), st.text(max_size=20))
_logprob = st.builds(
    TokenLogprob,
    token=st.text(max_size=4),
    logprob=st.floats(-20, 0),
    bytes=st.one_of(st.none(), st.lists(st.integers(0, 255), max_size=3)),
    top_logprobs=st.lists(
        st.builds(TopLogprob, token=st.text(max_size=3), logprob=st.floats(-20, 0))
    ),
)
_tool_call = st.builds(
    ToolCall,
    id=st.text(min_size=1, max_size=8),
    type=st.just("function"),
    function=st.builds(
        Function, name=st.text(min_size=1, max_size=8), arguments=st.text(max_size=20)
    ),
)
_usage = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 10**6),
    completion_tokens=st.integers(0, 10**6),
    total_tokens=st.integers(0, 10**6),
    prompt_cache_hit_tokens=st.one_of(st.none(), st.integers(0, 10**6)),
    prompt_cache_miss_tokens=st.one_of(st.none(), st.integers(0, 10**6)),
    completion_tokens_details=st.one_of(
        st.none(), st.builds(CompletionTokensDetails, reasoning_tokens=st.integers(0, 100))
    ),
)


@st.composite
def completions(draw: st.DrawFn) -> ChatCompletion:
    indexes = sorted(draw(st.sets(st.integers(0, 5), min_size=1, max_size=3)))
    choices = [
        Choice(
            index=i,
            message=Message(
                content=draw(_texts),
                reasoning_content=draw(_texts),
                tool_calls=draw(st.one_of(st.none(), st.lists(_tool_call, min_size=1, max_size=3))),
                refusal=draw(st.one_of(st.none(), st.text(max_size=5))),
            ),
            logprobs=draw(
                st.one_of(
                    st.none(),
                    st.builds(
                        ChoiceLogprobs,
                        content=st.one_of(st.none(), st.lists(_logprob, max_size=3)),
                        reasoning_content=st.one_of(st.none(), st.lists(_logprob, max_size=2)),
                    ),
                )
            ),
            finish_reason=draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
        )
        for i in indexes
    ]
    return ChatCompletion(
        id=draw(st.text(min_size=1, max_size=10)),
        created=draw(st.integers(1, 2**31)),
        model=draw(st.sampled_from(["deepseek-chat", "deepseek-reasoner"])),
        system_fingerprint=draw(st.one_of(st.none(), st.text(min_size=1, max_size=8))),
        choices=choices,
        usage=draw(st.one_of(st.none(), _usage)),
    )


@given(completions())
def test_folding_replayed_chunks_gives_the_completion_back(completion: ChatCompletion) -> None:
    """Folding the chunks of a completion gives the completion back, field for field."""
    assert fold(completion_to_chunks(completion)) == completion


@given(completions())
def test_fold_survives_the_json_round_trip(completion: ChatCompletion) -> None:
    """Encoding chunks to JSON and decoding them again folds to the same completion."""
    chunks = [decode_chunk(msgspec.json.encode(c)) for c in completion_to_chunks(completion)]
    assert fold(chunks) == completion
    assert decode_completion(msgspec.json.encode(completion)) == completion


@given(st.text(max_size=30), st.lists(st.integers(1, 6), max_size=10))
def test_text_split_into_any_deltas_folds_to_the_text(text: str, sizes: list[int]) -> None:
    """However the text is cut into deltas, events and fold both give it back whole."""
    acc = ChunkAccumulator()
    pieces, rest = [], text
    for size in sizes:
        pieces.append(rest[:size])
        rest = rest[size:]
    pieces.append(rest)
    seen = []
    for piece in pieces:
        chunk = ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(content=piece))])
        seen += [e.text for e in acc.feed_events(chunk) if isinstance(e, TextEvent)]
    assert "".join(seen) == text == acc.content()


@given(
    st.lists(
        st.sampled_from(["a", "", "\u00e9", "\ud83d", "\ude80", " "]), min_size=60, max_size=200
    )
)
def test_long_answers_fold_whole_through_the_piece_joining(pieces: list[str]) -> None:
    """Long answers kept as UTF-8: content and reasoning fold to join_text of every
    delta, surrogate halves cut at any join included, and the deltas are counted."""
    acc = ChunkAccumulator()
    for piece in pieces:
        delta = Delta(content=piece, reasoning_content=piece)
        acc.feed(ChatCompletionChunk(choices=[ChunkChoice(delta=delta)]))
    assert acc.content() == join_text(pieces)
    assert acc.reasoning() == join_text(pieces)
    assert acc.n_text_deltas() == 2 * sum(1 for piece in pieces if piece)


def test_tool_call_fragments_fold_by_index() -> None:
    """id, type and name come from the first fragment; arguments concatenate per index."""
    acc = ChunkAccumulator()
    fragments = [
        [ToolCallDelta(index=0, id="a", type="function", function=FunctionDelta("f", ""))],
        [ToolCallDelta(index=1, id="b", type="function", function=FunctionDelta("g", "{"))],
        [ToolCallDelta(index=0, id="ignored", function=FunctionDelta("h", '{"x":'))],
        [ToolCallDelta(index=0, function=FunctionDelta(arguments="1}"))],
        [ToolCallDelta(index=1, function=FunctionDelta(arguments="}")), ToolCallDelta()],
        [ToolCallDelta(index=1)],
    ]
    for tools in fragments:
        acc.feed(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(tool_calls=tools))]))
    calls = acc.completion().choices[0].message.tool_calls
    assert calls == [
        ToolCall(id="a", function=Function("f", '{"x":1}')),
        ToolCall(id="b", function=Function("g", "{}")),
    ]


def test_tool_call_without_index_uses_array_position() -> None:
    """Whole tool calls without `index` (some servers) are keyed by position."""
    acc = ChunkAccumulator()
    tools = [
        ToolCallDelta(id="x", function=FunctionDelta("f", "{}")),
        ToolCallDelta(id="y", function=FunctionDelta("g", "[]")),
    ]
    events = acc.feed_events(
        ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(tool_calls=tools))])
    )
    assert [e.tool_index for e in events if isinstance(e, ToolCallEvent)] == [0, 1]
    calls = acc.completion().choices[0].message.tool_calls or []
    assert [c.id for c in calls] == ["x", "y"]


def test_role_is_announced_once_and_ollama_reasoning_is_read() -> None:
    """A repeated role is one event; `reasoning` counts as reasoning_content."""
    acc = ChunkAccumulator()
    events = []
    for delta in [
        Delta(role="assistant", reasoning="think"),
        Delta(role="assistant", content="hi"),
    ]:
        events += acc.feed_events(ChatCompletionChunk(choices=[ChunkChoice(delta=delta)]))
    assert events == [RoleEvent(0, "assistant"), ReasoningEvent(0, "think"), TextEvent(0, "hi")]
    assert acc.reasoning() == "think"


def test_head_fields_first_non_empty_wins() -> None:
    """Azure's empty first chunk and annotation chunks change neither id nor model."""
    acc = ChunkAccumulator()
    acc.feed(ChatCompletionChunk(id="", model="", choices=[]))
    acc.feed(
        ChatCompletionChunk(id="c9", model="gpt", created=5, system_fingerprint="fp", choices=[])
    )
    acc.feed(ChatCompletionChunk(id="", model="", choices=[ChunkChoice(index=0)]))
    done = acc.completion()
    assert (done.id, done.model, done.created, done.system_fingerprint) == ("c9", "gpt", 5, "fp")
    assert done.choices == []


def test_last_usage_wins_and_absent_usage_never_clears() -> None:
    """A later usage replaces an earlier one; a chunk without usage keeps it."""
    acc = ChunkAccumulator()
    acc.feed(ChatCompletionChunk(id="a", usage=Usage(1, 1, 2)))
    acc.feed(ChatCompletionChunk(id="a", usage=Usage(3, 1, 4)))
    acc.feed(ChatCompletionChunk(id="a"))
    assert acc.usage == Usage(3, 1, 4)


def test_split_surrogate_pair_is_rejoined() -> None:
    """`\\ud83d` then `\\ude80` in separate chunks become one emoji in events and fold."""
    acc = ChunkAccumulator()
    seen = []
    for raw in [rb'"a\ud83d"', rb'"\ude80b"', rb'"\ud83d"']:
        chunk = decode_chunk(b'{"choices":[{"delta":{"content":' + raw + b"}}]}")
        seen += [e.text for e in acc.feed_events(chunk) if isinstance(e, TextEvent)]
    assert seen == ["a", "\U0001f680b"]
    assert acc.content() == "a\U0001f680b\ufffd"


def test_join_text_fast_paths() -> None:
    """ASCII and valid non-ASCII text are returned unchanged."""
    assert join_text(["a", "b"]) == "ab"
    assert join_text(["世", "界"]) == "世界"


def test_queries_on_unknown_choice() -> None:
    """Queries about a choice that never started return neutral values."""
    acc = ChunkAccumulator()
    assert (acc.content(3), acc.reasoning(3), acc.finish_reason(3)) == ("", "", None)
    assert not acc.has_output
    acc.feed(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(content=""))]))
    after_empty_text = acc.has_output
    acc.feed(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(tool_calls=[ToolCallDelta()]))]))
    after_tool_call = acc.has_output
    assert (after_empty_text, after_tool_call) == (False, True)
    assert acc.indexes == [0]


def test_finish_reason_later_value_replaces() -> None:
    """A later non-null finish_reason replaces an earlier one; null never clears it."""
    acc = ChunkAccumulator()
    for reason in ["length", None, "stop"]:
        acc.feed(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(), finish_reason=reason)]))
    assert acc.finish_reason() == "stop"


# -- wire decoding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message", "code"),
    [
        (
            b'{"error":{"message":"boom","type":"server_error","code":"internal"}}',
            "boom",
            "internal",
        ),
        (
            b'{"object":"error","message":"too long","type":"BadRequestError","code":400}',
            "too long",
            400,
        ),
        (b'{"error":"plain text error"}', "plain text error", None),
        (b'{"error":{"message":"m","param":["odd"],"code":{"n":1}}}', "m", '{"n": 1}'),
        (b'{"error":{"message":"m","code":true}}', "m", "true"),
    ],
)
def test_every_error_shape_becomes_a_typed_error(data: bytes, message: str, code: object) -> None:
    """Error frames of every shape raise UpstreamStreamError with the provider's fields."""
    with pytest.raises(UpstreamStreamError) as info:
        decode_chunk(data)
    assert message in info.value.message
    assert info.value.error_code == code
    assert info.value.status_code == 200
    with pytest.raises(UpstreamStreamError):
        decode_chunk(data.decode())


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            ErrorObject("This model's maximum context length is 65536 tokens"),
            "context_length_exceeded",
        ),
        (ErrorObject("slow down", type="rate_limit_error"), "rate_limited"),
        (ErrorObject("overloaded", type="overloaded_error"), "overloaded"),
        (ErrorObject("bad", code=400), "bad_request"),
        (ErrorObject("bad", type="invalid_request_error"), "bad_request"),
        (ErrorObject("Internal server error", type="server_error"), "server_error"),
    ],
)
def test_error_kinds(error: ErrorObject, kind: str) -> None:
    """Error objects are classified for the retry policy."""
    from unbroken.core.wire import upstream_error_from_object

    assert upstream_error_from_object(error).kind == kind
    assert upstream_error_from_object(ErrorObject(), status_code=500).kind == "unknown"


def test_finish_reason_error_is_not_an_error_frame() -> None:
    """`"finish_reason":"error"` (OpenRouter) is a chunk, not an error frame."""
    chunk = decode_chunk(b'{"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"error"}]}')
    assert chunk.choices[0].finish_reason == "error"
    assert parse_error_object(b"not json") is None
    assert parse_error_object(b'{"error":null}') is None


def test_malformed_chunk_quotes_an_excerpt() -> None:
    """Invalid JSON raises ProtocolError whose message quotes a short excerpt."""
    with pytest.raises(ProtocolError) as info:
        decode_chunk(b'{"id":"x","choices":[{"delta":{"content":"Hel' + b"l" * 500)
    assert info.value.excerpt.startswith('{"id":"x"')
    assert len(info.value.excerpt) <= 120
    with pytest.raises(ProtocolError):
        decode_chunk(b'{"choices":"not a list"}')
    with pytest.raises(ProtocolError):
        decode_chunk('{"choices":[{"index":"\\ud83d"}]}')


def test_unknown_fields_are_ignored() -> None:
    """obfuscation, timings, content_filter_results, stop_reason... change nothing."""
    chunk = decode_chunk(
        b'{"id":"c","obfuscation":"x","timings":{"a":1},"service_tier":"default",'
        b'"choices":[{"index":0,"stop_reason":null,"content_filter_results":{},'
        b'"delta":{"content":"hi","annotations":[]}}]}'
    )
    assert chunk.choices[0].delta is not None
    assert chunk.choices[0].delta.content == "hi"


def test_decode_completion_edges() -> None:
    """Keep-alive newlines and a trailing [DONE] are tolerated; empty and errors raise."""
    body = b'\n\n\n{"id":"c","choices":[{"message":{"content":"OK"},"finish_reason":"stop"}]}'
    assert decode_completion(body + b"\n\ndata: [DONE]\n\n").choices[0].message.content == "OK"
    assert decode_completion(body.decode()).id == "c"
    with pytest.raises(ProtocolError, match="empty body"):
        decode_completion(b"\n\n\n\n")
    with pytest.raises(UpstreamStreamError):
        decode_completion(b'{"error":{"message":"Insufficient Balance"}}')
    with pytest.raises(ProtocolError, match="malformed completion"):
        decode_completion(b'{"choices": 3}')
    lone = decode_completion(b'{"choices":[{"message":{"content":"\\ud83d"}}]}')
    assert lone.choices[0].message.content == "\ud83d"


def test_decode_error_body_shapes() -> None:
    """JSON errors, HTML titles and plain text all give a message."""
    assert decode_error_body(b'{"error":{"message":"Rate limit reached"}}').message == (
        "Rate limit reached"
    )
    html = b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head></html>"
    assert decode_error_body(html).message == "503 Service Temporarily Unavailable"
    assert decode_error_body(b"upstream connect error\nmore").message == "upstream connect error"
    assert decode_error_body(b"").message == ""
    assert decode_error_body(b"<title>unclosed").message == "<title>unclosed"


def test_excerpt_is_short_and_printable() -> None:
    """Excerpts escape line breaks and cut long input."""
    assert excerpt(b"a\nb\rc") == "a\\nb\\rc"
    assert len(excerpt("x" * 500)) == 120


def test_replay_of_empty_completion() -> None:
    """A completion with usage and no choices replays as one usage chunk."""
    completion = ChatCompletion(id="u", usage=Usage(1, 2, 3))
    chunks = completion_to_chunks(completion)
    assert len(chunks) == 1
    assert fold(chunks) == completion
    assert completion_to_chunks(ChatCompletion(id="e")) == []


def test_usage_reasoning_tokens_property() -> None:
    """reasoning_tokens reads completion_tokens_details."""
    assert Usage().reasoning_tokens is None
    assert Usage(completion_tokens_details=CompletionTokensDetails(7)).reasoning_tokens == 7
    assert Delta(reasoning="r").reasoning_text == "r"


def test_refusal_and_logprobs_fold_across_chunks() -> None:
    """Refusal pieces join; content and reasoning logprobs each extend their own list."""

    def lp(token: str) -> TokenLogprob:
        return TokenLogprob(token=token, logprob=-0.5)

    acc = ChunkAccumulator()
    acc.feed(
        ChatCompletionChunk(
            choices=[
                ChunkChoice(
                    delta=Delta(refusal="I can"),
                    logprobs=ChoiceLogprobs(reasoning_content=[lp("a")]),
                )
            ]
        )
    )
    acc.feed(
        ChatCompletionChunk(
            choices=[
                ChunkChoice(
                    delta=Delta(refusal="not."),
                    logprobs=ChoiceLogprobs(content=[lp("x")], reasoning_content=[lp("b")]),
                )
            ]
        )
    )
    acc.feed(
        ChatCompletionChunk(
            choices=[ChunkChoice(delta=Delta(), logprobs=ChoiceLogprobs(content=[lp("y")]))]
        )
    )
    choice = acc.completion().choices[0]
    assert choice.message.refusal == "I cannot."
    assert choice.logprobs == ChoiceLogprobs(
        content=[lp("x"), lp("y")], reasoning_content=[lp("a"), lp("b")]
    )


def test_completion_with_a_null_error_key_is_a_completion() -> None:
    """A body that merely has an `"error": null` key is decoded as the completion it is."""
    completion = decode_completion(
        b'{"id":"x","object":"chat.completion","error":null,"choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}]}'
    )
    assert completion.id == "x"
    assert completion.choices[0].message.content == "fine"


def _pieces(draw: st.DrawFn, text: str) -> list[str]:
    """`text` cut at drawn points (at least one piece, so "" stays "")."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=6))))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return pieces or [text]


@st.composite
def fragmented(draw: st.DrawFn) -> tuple[ChatCompletion, list[ChatCompletionChunk]]:
    """A completion and a stream of it that cuts every text field into several deltas,
    sends each tool call as a head fragment plus argument fragments, and interleaves the
    choices' chunks (and the tool calls within a choice) in a drawn order."""
    completion = draw(completions())
    lanes: list[list[ChunkChoice]] = []
    for choice in completion.choices:
        msg, i = choice.message, choice.index
        deltas = [Delta(role=msg.role)]
        if msg.reasoning_content is not None:
            deltas += [Delta(reasoning_content=p) for p in _pieces(draw, msg.reasoning_content)]
        if msg.content is not None:
            deltas += [Delta(content=p) for p in _pieces(draw, msg.content)]
        if msg.refusal is not None:
            deltas += [Delta(refusal=p) for p in _pieces(draw, msg.refusal)]
        calls: list[list[ToolCallDelta]] = []
        for k, call in enumerate(msg.tool_calls or ()):
            first, *rest = _pieces(draw, call.function.arguments)
            fragments = [
                ToolCallDelta(
                    index=k,
                    id=call.id,
                    type=call.type,
                    function=FunctionDelta(call.function.name, first),
                )
            ]
            fragments += [ToolCallDelta(index=k, function=FunctionDelta(arguments=p)) for p in rest]
            calls.append(fragments)
        # Tool-call fragments of different indexes interleave; each index keeps its order.
        while any(calls):
            k = draw(st.sampled_from([n for n, c in enumerate(calls) if c]))
            deltas.append(Delta(tool_calls=[calls[k].pop(0)]))
        lane = [ChunkChoice(index=i, delta=d) for d in deltas]
        lane.append(ChunkChoice(index=i, delta=Delta(), finish_reason=choice.finish_reason))
        lanes.append(lane)
    chunks = []
    while any(lanes):
        n = draw(st.sampled_from([n for n, lane in enumerate(lanes) if lane]))
        chunks.append(
            ChatCompletionChunk(
                id=completion.id,
                created=completion.created,
                model=completion.model,
                choices=[lanes[n].pop(0)],
            )
        )
    return completion, chunks


@given(fragmented())
def test_split_and_interleaved_fragments_fold_to_the_completion(
    case: tuple[ChatCompletion, list[ChatCompletionChunk]],
) -> None:
    """Text fields cut anywhere, tool calls in fragments, choices and tool calls
    interleaved: the fold still gives each choice's message and finish back."""
    completion, chunks = case
    folded = fold(chunks)
    assert [(c.index, c.message, c.finish_reason) for c in folded.choices] == [
        (c.index, c.message, c.finish_reason) for c in completion.choices
    ]


def test_a_copy_folds_on_alone() -> None:
    """`copy()` holds what was folded (text, reasoning, refusal, tool calls, logprobs,
    usage); chunks fed to the copy afterwards leave the original as it was."""
    acc = ChunkAccumulator()
    call = ToolCallDelta(index=0, id="t1", type="function", function=FunctionDelta("f", "{"))
    logprobs = ChoiceLogprobs(content=[TokenLogprob(token="a", logprob=-0.1)])
    acc.feed(
        ChatCompletionChunk(
            id="c",
            model="m",
            choices=[
                ChunkChoice(
                    delta=Delta(
                        role="assistant",
                        content="Hi",
                        reasoning_content="hm",
                        refusal="no",
                        tool_calls=[call],
                    ),
                    logprobs=logprobs,
                )
            ],
            usage=Usage(prompt_tokens=1),
        )
    )
    twin = acc.copy()
    assert twin.completion() == acc.completion()
    assert twin.n_chunks == acc.n_chunks == 1
    more = ToolCallDelta(index=0, function=FunctionDelta(arguments="}"))
    twin.feed(
        ChatCompletionChunk(
            choices=[
                ChunkChoice(
                    delta=Delta(content="!", tool_calls=[more]),
                    logprobs=logprobs,
                    finish_reason="stop",
                )
            ]
        )
    )
    assert twin.content() == "Hi!"
    assert acc.content() == "Hi"
    assert acc.finish_reason() is None
    message = acc.completion().choices[0].message
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.arguments == "{"
    logged = acc.completion().choices[0].logprobs
    assert logged is not None
    assert logged.content is not None
    assert len(logged.content) == 1


def test_a_copy_keeps_the_event_split_state_apart() -> None:
    """A copy made after events were split goes on from the same state (a role shown once,
    a held surrogate) without sharing it with the original."""
    acc = ChunkAccumulator()
    acc.feed_events(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(role="assistant"))]))
    acc.feed_events(ChatCompletionChunk(choices=[ChunkChoice(delta=Delta(content="a\ud83d"))]))
    twin = acc.copy()
    again = ChatCompletionChunk(
        choices=[ChunkChoice(delta=Delta(role="assistant", content="\ude00"))]
    )
    assert twin.feed_events(again) == [TextEvent(0, "\U0001f600")]
    assert acc.feed_events(again) == [TextEvent(0, "\U0001f600")]
    assert acc.feed_events(again) == [TextEvent(0, "\ude00")]
    assert twin.feed_events(again) == [TextEvent(0, "\ude00")]


def test_feed_text_folds_as_a_text_chunk_does() -> None:
    """`feed_text(i, text)` folds what a chunk with only that content for choice i does,
    on a choice seen before or not, with or without content yet."""
    by_chunks, by_text = ChunkAccumulator(), ChunkAccumulator()
    head = ChatCompletionChunk(
        id="c", model="m", choices=[ChunkChoice(index=0, delta=Delta(role="assistant"))]
    )
    by_chunks.feed(head)
    by_text.feed(head)
    for index, text in [(0, "a"), (2, "b"), (0, ""), *((1, f"{i}") for i in range(20))]:
        by_chunks.feed(
            ChatCompletionChunk(
                id="c", model="m", choices=[ChunkChoice(index=index, delta=Delta(content=text))]
            )
        )
        by_text.feed_text(index, text)
    assert by_text.completion() == by_chunks.completion()
    assert by_text.n_chunks == by_chunks.n_chunks


def test_feed_text_folds_reasoning_as_a_reasoning_chunk_does() -> None:
    """`feed_text(i, text, True)` folds what a chunk with only that reasoning_content (and
    content null) does: reasoning before content, on choices seen before or not, empty
    texts not counted as tokens."""
    by_chunks, by_text = ChunkAccumulator(), ChunkAccumulator()
    head = ChatCompletionChunk(
        id="c", model="m", choices=[ChunkChoice(index=0, delta=Delta(role="assistant"))]
    )
    by_chunks.feed(head)
    by_text.feed(head)
    steps = [
        (0, "", True),
        *((0, f"r{i} ", True) for i in range(20)),
        (3, "x", True),
        (0, "", False),
        *((0, f"c{i}", False) for i in range(12)),
        (3, "y", False),
    ]
    for index, text, reasoning in steps:
        delta = Delta(reasoning_content=text) if reasoning else Delta(content=text)
        by_chunks.feed(ChatCompletionChunk(id="c", choices=[ChunkChoice(index=index, delta=delta)]))
        by_text.feed_text(index, text, reasoning)
    assert by_text.completion() == by_chunks.completion()
    assert by_text.reasoning(0) == "".join(f"r{i} " for i in range(20))
    assert by_text.n_text_deltas(0) == by_chunks.n_text_deltas(0) == 32
    assert by_text.n_chunks == by_chunks.n_chunks


def test_model_fingerprint_and_role_are_kept_once_for_all_answers() -> None:
    """Answers of the same model share its str (and fingerprint's, role's); distinct models
    are shared up to a bound, long ones never; the folded answers are unchanged."""

    def answer(model: str, fingerprint: str = "fp_1") -> ChunkAccumulator:
        acc = ChunkAccumulator()
        delta = Delta(role="".join(["assis", "tant"]), content="x")
        acc.feed(
            ChatCompletionChunk(
                id="c",
                model="".join(model),  # a str of its own, as each decode makes
                system_fingerprint="".join(fingerprint),
                choices=[ChunkChoice(delta=delta)],
            )
        )
        return acc

    accumulator._SHARED.clear()  # what earlier tests' answers left there
    first, second = answer("shared-model"), answer("shared-model")
    assert first.model is second.model
    assert first.system_fingerprint is second.system_fingerprint
    assert first.role() is second.role()
    assert second.completion().model == "shared-model"
    long_name = "m" * (accumulator.SHARED_MAX_CHARS + 1)
    assert answer(long_name).model is not answer(long_name).model
    for i in range(accumulator.SHARED_MAX + 10):
        answer(f"model-{i}")
    assert len(accumulator._SHARED) == accumulator.SHARED_MAX
    last = f"model-{accumulator.SHARED_MAX + 5}"
    assert answer(last).model is not answer(last).model
    assert answer(last).completion().model == last


def _text_chunk(index: int, text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="c", choices=[ChunkChoice(index=index, delta=Delta(content=text))]
    )


def test_choices_started_out_of_order_are_kept_apart_and_by_index() -> None:
    acc = ChunkAccumulator()
    for index, text in [(2, "c"), (0, "a"), (1, "b"), (0, "A"), (2, "C")]:
        acc.feed(_text_chunk(index, text))
    acc.feed_text(1, "B")
    assert acc.indexes == [0, 1, 2]
    assert [acc.content(i) for i in (0, 1, 2)] == ["aA", "bB", "cC"]
    assert [c.message.content for c in acc.completion().choices] == ["aA", "bB", "cC"]
    twin = acc.copy()
    acc.discard(1)  # not the first started
    acc.discard(7)  # never started: nothing happens
    assert acc.indexes == [0, 2]
    assert twin.indexes == [0, 1, 2]
    acc.discard(2)  # the first started: a new choice takes its place
    acc.feed_text(3, "d")
    assert acc.indexes == [0, 3]
    assert (acc.content(3), acc.content(2), twin.content(2)) == ("d", "", "cC")


def test_discarding_the_only_choice_leaves_none() -> None:
    acc = ChunkAccumulator()
    acc.feed(_text_chunk(0, "a"))
    acc.discard(0)
    acc.discard(0)
    assert (acc.indexes, acc.has_output, acc.content()) == ([], False, "")


def test_feed_text_rejoins_surrogate_halves_across_deltas() -> None:
    """Text relayed as its JSON's escapes may cut a pair in two (`\\ud83d`, `\\ude80`): the
    halves are kept and rejoined; a lone half reads as U+FFFD."""
    acc = ChunkAccumulator()
    for text in ["go ", "\ud83d", "\ude80", "!"]:
        acc.feed_text(0, text)
    acc.feed_text(0, "\ud83d", reasoning=True)
    assert acc.content() == "go \U0001f680!"
    assert acc.reasoning() == "\ufffd"
    assert acc.n_text_deltas() == 5


def test_finish_reasons_of_the_choices_by_index() -> None:
    """`finish_reasons`: each started choice's finish_reason by index, as `finish_reason`
    answers for each of `indexes`; none before a choice."""
    acc = ChunkAccumulator()
    assert acc.finish_reasons == []
    acc.feed(ChatCompletionChunk(id="c", choices=[ChunkChoice(index=2, delta=Delta(content="a"))]))
    assert acc.finish_reasons == [None]
    acc.feed(
        ChatCompletionChunk(
            id="c",
            choices=[
                ChunkChoice(index=0, delta=Delta(content="b"), finish_reason="stop"),
                ChunkChoice(index=1, delta=Delta(content="c"), finish_reason="length"),
            ],
        )
    )
    assert acc.finish_reasons == ["stop", "length", None]
    assert acc.finish_reasons == [acc.finish_reason(i) for i in acc.indexes]
