"""Unit tests of core.stream: body sniffing, [DONE], error frames, limits and end states."""

from __future__ import annotations

import pytest

from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.stream import (
    ChatStreamDecoder,
    EndState,
    classify_end,
    several_events,
    split_events,
)
from unbroken.core.wire import ChatCompletionChunk, Delta
from unbroken.errors import ProtocolError, UpstreamStreamError

HEAD = b'"id":"c1","object":"chat.completion.chunk","created":1,"model":"deepseek-chat"'


def chunk(delta: bytes, finish: bytes = b"null") -> bytes:
    return (
        b"data: {"
        + HEAD
        + b',"choices":[{"index":0,"delta":'
        + delta
        + b',"finish_reason":'
        + finish
        + b"}]}\n\n"
    )


def run(
    *reads: bytes, timed_out: bool = False
) -> tuple[ChatStreamDecoder, ChunkAccumulator, EndState]:
    decoder = ChatStreamDecoder()
    acc = ChunkAccumulator()
    for read in reads:
        for c in decoder.feed(read):
            acc.feed(c)
    for c in decoder.flush():
        acc.feed(c)
    return decoder, acc, classify_end(acc, decoder, timed_out=timed_out).state


def test_complete_stream() -> None:
    """finish_reason and [DONE] make a complete stream."""
    decoder, acc, state = run(
        chunk(b'{"content":"Hi"}'), chunk(b"{}", b'"stop"'), b"data: [DONE]\n\n"
    )
    assert state is EndState.COMPLETE
    assert decoder.done
    assert acc.content() == "Hi"


def test_input_after_done_is_ignored() -> None:
    """Anything after [DONE] is not read."""
    decoder, acc, _ = run(b"data: [DONE]\n\n" + chunk(b'{"content":"late"}'))
    assert acc.content() == ""
    assert decoder.feed(chunk(b'{"content":"x"}')) == []
    assert decoder.flush() == []


def test_keepalive_comments_counted_and_whitespace_data_ignored() -> None:
    """Comments are counted, whitespace-only data and other event types ignored."""
    decoder, acc, state = run(
        b": keep-alive\n\n: keep-alive\n\ndata:  \n\nevent: ping\ndata: {}\n\n"
        + chunk(b'{"content":"a"}')
    )
    assert decoder.n_comments == 2
    assert decoder.n_ignored == 1
    assert state is EndState.TRUNCATED
    assert acc.content() == "a"


def test_error_event_type() -> None:
    """`event: error` with JSON or plain text becomes an upstream error."""
    decoder, _, state = run(
        b'event: error\ndata: {"error":{"message":"overloaded","type":"overloaded_error"}}\n\n'
    )
    assert state is EndState.ERROR
    assert isinstance(decoder.error, UpstreamStreamError)
    assert decoder.error.error_type == "overloaded_error"
    decoder, _, _ = run(b"event: error\ndata: it broke\n\n")
    assert decoder.error is not None
    assert "it broke" in decoder.error.message


def test_legacy_error_field_line() -> None:
    """llama.cpp's `error:` field line is an error; other ignored fields are counted."""
    decoder, _, state = run(
        b'foo: 1\nerror: {"code":400,"message":"too big","type":"invalid_request_error"}\n\ndata: [DONE]\n\n'
    )
    assert state is EndState.ERROR
    assert decoder.n_ignored == 1
    assert isinstance(decoder.error, UpstreamStreamError)
    assert decoder.error.error_code == 400
    decoder, _, _ = run(b"error: not json\n\n")
    assert decoder.error is None


def test_malformed_chunk_keeps_earlier_chunks() -> None:
    """A malformed chunk ends the stream with an error; chunks before it are kept."""
    decoder, acc, state = run(
        chunk(b'{"content":"Hel"}') + b"data: {not json\n\n" + chunk(b'{"content":"x"}')
    )
    assert acc.content() == "Hel"
    assert isinstance(decoder.error, ProtocolError)
    assert state is EndState.ERROR


def test_oversize_event_is_a_protocol_error() -> None:
    """An event past the limit ends the stream with ProtocolError, also at flush."""
    decoder = ChatStreamDecoder(max_event_bytes=1024)
    assert decoder.feed(b"data: " + b"x" * 2000) == []
    assert isinstance(decoder.error, ProtocolError)
    decoder = ChatStreamDecoder(max_event_bytes=1024)
    decoder.feed(chunk(b'{"content":"ok"}') + b"data: " + b"y" * 2000 + b"\n")
    assert decoder.error is None
    assert decoder.flush() == []
    assert isinstance(decoder.error, ProtocolError)


def test_json_body_despite_stream() -> None:
    """A whole JSON completion (after keep-alive newlines) is replayed as chunks."""
    body = b'{"id":"c2","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop"}]}'
    decoder, acc, state = run(b"\n", b"\n", body[:20], body[20:])
    assert decoder.is_json_body
    assert acc.content() == "Hi there"
    assert state is EndState.COMPLETE
    assert not classify_end(acc, decoder).no_done


def test_json_body_errors_and_limit() -> None:
    """A JSON error body is an upstream error; an empty body is retryable; size is bounded."""
    decoder, _, state = run(b'{"error":{"message":"Insufficient Balance"}}')
    assert isinstance(decoder.error, UpstreamStreamError)
    assert state is EndState.ERROR
    decoder, _, _ = run(b"\n\n\n\n")
    assert isinstance(decoder.error, ProtocolError)
    decoder, _, _ = run()
    assert isinstance(decoder.error, ProtocolError)
    decoder = ChatStreamDecoder(max_event_bytes=1024)
    decoder.feed(b"{" + b" " * 2000)
    assert isinstance(decoder.error, ProtocolError)
    assert decoder.feed(b"}") == []


def test_leading_blank_lines_before_sse() -> None:
    """Blank lines before an SSE stream are kept and harmless."""
    decoder, acc, _ = run(b"\n\n", b"\r\n" + chunk(b'{"content":"a"}'))
    assert not decoder.is_json_body
    assert acc.content() == "a"


def test_unterminated_done_is_salvaged() -> None:
    """`data: [DONE]` without its blank line still counts as done."""
    decoder, _, state = run(chunk(b'{"content":"Hi"}', b'"stop"') + b"data: [DONE]")
    assert decoder.done
    assert state is EndState.COMPLETE
    decoder, _, state = run(chunk(b'{"content":"Hi"}') + b"data: {partial")
    assert not decoder.done
    assert state is EndState.TRUNCATED


@pytest.mark.parametrize(
    ("reads", "timed_out", "expected", "flags"),
    [
        ((chunk(b'{"content":"a"}', b'"stop"'),), False, EndState.COMPLETE, (True, False)),
        (
            (chunk(b'{"content":"a"}'), b"data: [DONE]\n\n"),
            False,
            EndState.TRUNCATED,
            (False, False),
        ),
        (
            (chunk(b'{"content":"a"}', b'"insufficient_system_resource"'),),
            False,
            EndState.INTERRUPTED,
            (False, False),
        ),
        ((chunk(b'{"content":"a"}'),), True, EndState.STALLED, (False, False)),
        ((chunk(b'{"content":"a"}'),), False, EndState.TRUNCATED, (False, False)),
        ((b": keep-alive\n\n",), False, EndState.TRUNCATED, (False, False)),
    ],
)
def test_end_states(
    reads: tuple[bytes, ...], timed_out: bool, expected: EndState, flags: tuple[bool, bool]
) -> None:
    """Each combination of finish, [DONE], EOF and timeout maps to its end state."""
    decoder, acc, state = run(*reads, timed_out=timed_out)
    assert state is expected
    end = classify_end(acc, decoder, timed_out=timed_out)
    assert (end.no_done, end.missing_finish) == flags


def test_done_without_finish_is_truncated_unless_the_route_omits_it() -> None:
    """`[DONE]` while a choice has no finish_reason is an early end (truncated); with
    `omits_finish` it is the server's way of ending (complete)."""
    decoder, acc, _ = run(chunk(b'{"content":"a"}'), b"data: [DONE]\n\n")
    early = classify_end(acc, decoder)
    assert (early.state, early.ended_early) == (EndState.TRUNCATED, True)
    lax = classify_end(acc, decoder, omits_finish=True)
    assert (lax.state, lax.missing_finish, lax.ended_early) == (EndState.COMPLETE, True, False)


# -- the one-event read (the upstream's own bytes) -----------------------------------------


def raw(decoder: ChatStreamDecoder) -> bytes | None:
    return decoder.raw  # a call: mypy keeps no narrowing across `feed`


def test_a_read_of_one_event_keeps_its_bytes() -> None:
    """A read holding exactly one chunk event decodes as any other and keeps the event's
    data bytes as `raw`; a read of two events, or a partial one, has no `raw`."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": keep-alive\n\n")
    one = chunk(b'{"content":"Hi"}')
    assert [c.choices[0].delta for c in decoder.feed(one)] == [Delta(content="Hi")]
    assert raw(decoder) == one[len(b"data: ") : -2]
    assert len(decoder.feed(one + one)) == 2
    assert raw(decoder) is None
    assert decoder.feed(one[:20]) == []
    assert raw(decoder) is None
    assert len(decoder.feed(one[20:])) == 1
    assert raw(decoder) is None  # the event did not come in one read


def test_a_one_event_read_decodes_non_ascii_and_replaces_invalid_utf8() -> None:
    """Non-ASCII text keeps its bytes; bytes that are not UTF-8 are decoded with
    replacement characters, as the text path does, and are not kept."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    text = chunk('{"content":"请稍"}'.encode())
    assert decoder.feed(text)[0].choices[0].delta == Delta(content="请稍")
    assert raw(decoder) == text[6:-2]
    (bad,) = decoder.feed(chunk(b'{"content":"a\xffb"}'))
    assert bad.choices[0].delta == Delta(content="a\ufffdb")
    assert raw(decoder) is None


def test_a_one_event_error_frame_ends_the_stream() -> None:
    """An error frame read alone is the stream's error, as in any read."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    assert decoder.feed(b'data: {"error":{"message":"overloaded","code":"busy"}}\n\n') == []
    assert isinstance(decoder.error, UpstreamStreamError)
    assert raw(decoder) is None


def test_fim_chunks_keep_no_bytes() -> None:
    """A FIM chunk is reshaped into a chat chunk, so its bytes are not the chunk's."""
    decoder = ChatStreamDecoder(text_completions=True)
    decoder.feed(b": hi\n\n")
    (fim,) = decoder.feed(b'data: {"id":"f","choices":[{"index":0,"text":"x"}]}\n\n')
    assert fim.choices[0].delta == Delta(content="x")
    assert raw(decoder) is None


# -- feed_one: the relay's one-event path and its text template ----------------------------


@pytest.mark.parametrize(
    ("read", "several"),
    [
        (b"data: a\n\n", False),  # one event
        (b"data: a\n\ndata: b\n\n", True),
        (b"data: a\n\n: c\n\ndata: b\n\n", True),  # a comment between
        (b"data: a\n\ndata: b", False),  # the second not whole yet
        (b"data: a\n\n\n", True),  # a blank line more
        (b"\n\n", False),
        (b"data: a", False),
        (b"", False),
    ],
)
def test_several_events_and_their_split(read: bytes, several: bool) -> None:
    """`several_events` says whether a read is more than one whole event; `split_events`
    cuts any read after each blank line, and the pieces decode as the read does."""
    assert several_events(read) is several
    pieces = split_events(read)
    assert b"".join(pieces) == read
    assert all(piece.count(b"\n\n") <= 1 for piece in pieces)
    assert not several or len(pieces) > 1
    whole, piecewise = ChatStreamDecoder(), ChatStreamDecoder()
    assert whole._sse.feed(read) == [e for piece in pieces for e in piecewise._sse.feed(piece)]


def test_two_text_events_in_one_read_are_not_one_text() -> None:
    """A read of two text events like the last starts with the template's head and ends
    with its tail: not taken as one text (nothing consumed), and `feed` decodes both."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    assert isinstance(decoder.feed_one(chunk(b'{"content":"a"}')), ChatCompletionChunk)
    assert decoder.feed_one(chunk(b'{"content":"b"}')) == "b"
    read = chunk(b'{"content":"c"}') + chunk(b'{"content":"d"}')
    assert decoder.feed_one(read) is None
    assert [c.choices[0].delta.content for c in decoder.feed(read)] == ["c", "d"]  # type: ignore[union-attr]  # text deltas


def one(decoder: ChatStreamDecoder, read: bytes) -> ChatCompletionChunk | str | None:
    return decoder.feed_one(read)


def decoded_like_feed(read: bytes, *before: bytes) -> ChatCompletionChunk:
    """The chunk `feed` decodes from `read` after `before`."""
    decoder = ChatStreamDecoder()
    for earlier in before:
        decoder.feed(earlier)
    (decoded,) = decoder.feed(read)
    return decoded


def test_a_text_event_like_the_last_comes_as_its_text() -> None:
    """After a plain text chunk, an event that is byte for byte the same but its text
    comes as that text (the chunk `feed` would decode holds it), with `raw` its bytes."""
    decoder = ChatStreamDecoder()
    assert one(decoder, b": hi\n\n") is None  # not SSE yet: read it with `feed`
    decoder.feed(b": hi\n\n")
    role = chunk(b'{"role":"assistant","content":""}')
    assert isinstance(one(decoder, role), ChatCompletionChunk)  # no template from a role
    first = chunk(b'{"content":"Hel"}')
    assert isinstance(one(decoder, first), ChatCompletionChunk)
    for text in ("lo", " w\u00f6rld \U0001f600", "", "a'b/c"):
        read = chunk(b'{"content":"' + text.encode() + b'"}')
        assert one(decoder, read) == text
        assert raw(decoder) == read[6:-2]
        assert decoded_like_feed(read).choices[0].delta == Delta(content=text)
        assert decoder.text_chunk() == decoded_like_feed(read)
    assert decoder.text_index == 0
    assert decoder.last_event_id == ""


@pytest.mark.parametrize(
    "end",
    [
        b"data: [DONE]\n\n",  # the stream's end
        b'data: {"error":{"message":"overloaded","code":"busy"}}\n\n',  # an error frame
        b"data: {not json}\n\n",  # a chunk that does not decode
    ],
)
def test_no_text_event_is_taken_once_the_stream_ended(end: bytes) -> None:
    """Once `[DONE]` or an error ended the stream, `feed_one` takes no event, not even one
    that fits the text template byte for byte (the template is checked first)."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    assert isinstance(one(decoder, chunk(b'{"content":"Hel"}')), ChatCompletionChunk)
    later = chunk(b'{"content":"lo"}')
    assert one(decoder, later) == "lo"  # the template fits
    if decoder.feed_one(end) is None:
        decoder.feed(end)
    assert decoder.finished
    assert one(decoder, later) is None
    assert decoder.feed(later) == []


@pytest.mark.parametrize(
    ("json_text", "as_text"),
    [
        (b'a\\"b\\"', True),  # quotes
        (b"\\n\\n", True),  # newlines
        (b"\\\\", True),  # a backslash
        (b"\\t|\\u00e9|\\u4e2d\\/", True),
        (b"\\ud83d\\ude00", True),  # a surrogate pair
        (b"\\ud83d", False),  # half of one: the chunk decoder's lenient path
        ("\U0001f469\u200d\U0001f4bb \u00a0\u2028".encode(), True),  # not printable
    ],
)
def test_a_text_event_with_escapes_comes_as_its_text(json_text: bytes, as_text: bool) -> None:
    """Text the template's bytes hold as a JSON string with escapes (or characters
    `isprintable` refuses) comes as the string's value, as `feed` would decode it; what
    the string decoder refuses is decoded as a chunk."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    assert isinstance(one(decoder, chunk(b'{"content":"Hel"}')), ChatCompletionChunk)
    read = chunk(b'{"content":"' + json_text + b'"}')
    decoded = decoded_like_feed(read)
    got = one(decoder, read)
    assert raw(decoder) == read[6:-2]
    if as_text:
        assert got == decoded.choices[0].delta.content  # type: ignore[union-attr]
        assert decoder.text_chunk() == decoded
    else:
        assert got == decoded


def test_a_reasoning_event_like_the_last_comes_as_its_text() -> None:
    """A reasoner's chunks (`content` null, then `reasoning_content` null) are templates too:
    reasoning text comes as a str with `text_reasoning`, and the first answer chunk, unlike
    the reasoning template, is decoded and becomes the next template."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    role = chunk(b'{"role":"assistant","content":null,"reasoning_content":""}')
    assert isinstance(one(decoder, role), ChatCompletionChunk)
    first = chunk(b'{"content":null,"reasoning_content":"Let"}')
    assert isinstance(one(decoder, first), ChatCompletionChunk)
    for text in (" me", " th\u00efnk \U0001f914", ""):
        read = chunk(b'{"content":null,"reasoning_content":"' + text.encode() + b'"}')
        assert one(decoder, read) == text
        assert decoder.text_reasoning
        assert raw(decoder) == read[6:-2]
        assert decoder.text_chunk() == decoded_like_feed(read)
        assert decoder.text_chunk().choices[0].delta == Delta(reasoning_content=text)
    answer = chunk(b'{"content":"So","reasoning_content":null}')
    assert one(decoder, answer) == decoded_like_feed(answer)
    read = chunk(b'{"content":" yes","reasoning_content":null}')
    assert one(decoder, read) == " yes"
    assert not decoder.text_reasoning
    assert decoder.text_chunk() == decoded_like_feed(read)
    # Back to reasoning: not the template, decoded (and learnt again).
    again = chunk(b'{"content":null,"reasoning_content":"hm"}')
    assert one(decoder, again) == decoded_like_feed(again)
    assert one(decoder, again) == "hm"
    assert decoder.text_reasoning


@pytest.mark.parametrize(
    "read",
    [
        chunk(b'{"content":"a","x":"b"}'),  # a quote ends the string: another shape
        chunk(b'{"content":"a\\"}'),  # the tail's quote is escaped: not JSON
        chunk(b'{"content":"a\\q"}'),  # a bad escape
        chunk(b'{"content":"caf\xc3"}'),  # not UTF-8
        chunk(b'{"content":"x"}', b'"stop"'),  # another tail
        chunk(b'{"content":"x"}')[:-2] + b"\r\n\r\n",
        chunk(b'{"content":"a\tb"}'),  # a control character
        b'data: {"id":"c2"' + chunk(b'{"content":"x"}')[len(b'data: {"id":"c1"') :],
    ],
)
def test_an_event_unlike_the_template_is_decoded(read: bytes) -> None:
    """Anything but the template's bytes around a JSON string's bytes (valid UTF-8, no
    control character) is decoded as `feed` decodes it, or left to `feed`."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    assert isinstance(one(decoder, chunk(b'{"content":"Hel"}')), ChatCompletionChunk)
    got = one(decoder, read)
    assert not isinstance(got, str)
    if got is None:
        assert decoder.error is not None or decoder.feed(read) == [
            decoded_like_feed(read, b": hi\n\n")
        ]
    else:
        assert got == decoded_like_feed(read, b": hi\n\n")


def test_a_text_event_after_a_partial_line_is_left_to_feed() -> None:
    """With part of an earlier line held, a read like the template is not an event of its
    own: `feed` joins it."""
    decoder = ChatStreamDecoder()
    decoder.feed(b": hi\n\n")
    one(decoder, chunk(b'{"content":"Hel"}'))
    assert decoder.feed(b": par") == []
    read = chunk(b'{"content":"lo"}')
    assert one(decoder, read) is None
    assert decoder.feed(read) == []  # `: par` + `data: ...`: one comment line
    assert decoder.n_comments == 2


def test_the_template_needs_a_plain_text_chunk_with_its_text_once() -> None:
    """No template from a chunk that is not text only, nor from one whose text is not in its
    JSON as it is, once; an event no longer than the template's head and tail, or over the
    size limit, is not taken as text either."""
    decoder = ChatStreamDecoder(max_event_bytes=200)
    decoder.feed(b": hi\n\n")
    not_templates = [
        chunk(b'{"content":"a"}', b'"stop"'),
        chunk(b'{"content":"a","reasoning_content":"b"}'),
        chunk(b'{"reasoning_content":"a","reasoning":"a"}'),
        chunk(b'{"reasoning_content":"a\\nb"}'),  # its reasoning is escaped in the JSON
        chunk(b'{"tool_calls":[]}'),
        chunk(b'{"content":"a\\u00e9"}'),  # its text is escaped in the JSON
        chunk(b'{"content":"a\\"b"}'),  # its text holds a quote
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n',
        b'data: {"id":"c","choices":[]}\n\n',
    ]
    for read in not_templates:
        assert isinstance(one(decoder, read), ChatCompletionChunk)
    # `"content":"a"` twice (a repeated key): no template.
    twice = b'data: {"choices":[{"index":0,"delta":{"content":"a","content":"a"}}]}\n\n'
    assert isinstance(one(decoder, twice), ChatCompletionChunk)
    assert isinstance(one(decoder, twice), ChatCompletionChunk)
    head, tail = b'data: {"choices":[{"index":3,"delta":{"content":"', b'"}}]}\n\n'
    assert isinstance(one(decoder, head + b"a" + tail), ChatCompletionChunk)
    assert one(decoder, head + b"b" + tail) == "b"
    assert decoder.text_index == 3
    # Head and tail overlap in a read shorter than both: not text.
    assert not isinstance(one(decoder, head + tail[1:]), str)
    big = head + b"x" * 300 + tail
    assert one(decoder, big) is None
    assert decoder.feed(big) == []
    assert isinstance(decoder.error, ProtocolError)


# -- the body's first read and its end on the one-event path --------------------------------


def test_a_first_read_of_one_event_is_taken_by_feed_one() -> None:
    """A body whose first read is one whole `data:` event is SSE: `feed_one` takes it (its
    chunk, `raw` its bytes), as `feed` would decode it; what follows reads as usual."""
    first = chunk(b'{"role":"assistant","content":""}')
    decoder = ChatStreamDecoder()
    got = decoder.feed_one(first)
    assert got == decoded_like_feed(first)
    assert decoder.raw == first[6:-2]
    assert not decoder.is_json_body
    assert isinstance(decoder.feed_one(chunk(b'{"content":"a"}')), ChatCompletionChunk)
    assert decoder.feed_one(chunk(b'{"content":"b"}')) == "b"


@pytest.mark.parametrize(
    "first",
    [
        b'{"id":"c1","choices":[]}',  # a JSON body: `feed` sniffs it
        b": keep-alive\n\n",  # a comment first
        b"data: {}\n\ndata: {}\n\n",  # two events
        b"\xef\xbb\xbfdata: {}\n\n",  # a BOM first
    ],
)
def test_a_first_read_that_is_not_one_event_is_left_to_feed(first: bytes) -> None:
    """Any other first read is left to `feed` (nothing consumed, the mode not decided)."""
    decoder = ChatStreamDecoder()
    assert decoder.feed_one(first) is None
    assert decoder.raw is None
    fresh = ChatStreamDecoder()
    assert decoder.feed(first) == fresh.feed(first)
    assert decoder.is_json_body is fresh.is_json_body


def test_a_first_read_after_keep_alive_newlines_is_left_to_feed() -> None:
    """Newlines before the first event (held while the mode is open) go with it to `feed`."""
    decoder = ChatStreamDecoder()
    assert decoder.feed(b"\n\n") == []
    read = chunk(b'{"content":"a"}')
    assert decoder.feed_one(read) is None
    assert decoder.feed(read) == [decoded_like_feed(read)]


def test_a_first_read_of_one_event_decodes_through_feed_as_before() -> None:
    """`feed` takes a first read of one event on its one-event path: the chunk, `raw` its
    bytes; invalid UTF-8 is decoded as the line splitting decodes it (replaced)."""
    read = chunk(b'{"content":"a"}')
    decoder = ChatStreamDecoder()
    assert decoder.feed(read) == [decoded_like_feed(b": x\n\n" + read)]
    assert decoder.raw == read[6:-2]
    bad = chunk(b'{"content":"\xff"}')
    decoder = ChatStreamDecoder()
    assert decoder.feed_one(bad) is None
    (decoded,) = decoder.feed(bad)
    assert decoded.choices[0].delta is not None
    assert decoded.choices[0].delta.content == "\ufffd"


def test_done_on_the_one_event_path_ends_the_stream() -> None:
    """`[DONE]` read by `feed_one` ends the stream there (`done`); `feed` then returns
    nothing, and the end is complete."""
    decoder = ChatStreamDecoder()
    acc = ChunkAccumulator()
    got = decoder.feed_one(chunk(b'{"content":"a"}', b'"stop"'))
    assert isinstance(got, ChatCompletionChunk)
    acc.feed(got)
    assert decoder.feed_one(b"data: [DONE]\n\n") is None
    assert decoder.done
    assert decoder.feed(b"data: [DONE]\n\n") == []
    assert classify_end(acc, decoder).state is EndState.COMPLETE


def test_the_first_read_after_a_reconnect_takes_the_one_event_path() -> None:
    """After a reconnect (the BOM check starts over) a read of one `data:` event, which no
    BOM leads, is taken as one event; `last_event_id` kept."""
    decoder = ChatStreamDecoder()
    decoder.feed(b"id: 7\n" + chunk(b'{"content":"a"}')[:-1] + b"\n")
    decoder.reconnected()
    read = chunk(b'{"content":"b"}')
    got = decoder.feed_one(read)
    assert got == decoded_like_feed(read)
    assert decoder.last_event_id == "7"
