"""Unit tests of core.sse: the WHATWG rules, limits, and split/encode properties."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.events import Comment, IgnoredField, IncompleteEvent, SSEEvent, SSEItem
from unbroken.core.sse import SSEDecoder, encode_comment, encode_event
from unbroken.errors import EncodeError, ProtocolError


def decode_all(*reads: bytes, decoder: SSEDecoder | None = None) -> list[SSEItem]:
    decoder = decoder or SSEDecoder()
    items: list[SSEItem] = []
    for read in reads:
        items.extend(decoder.feed(read))
    items.extend(decoder.flush())
    return items


def test_line_ends_are_equivalent() -> None:
    """LF, CR and CRLF all end lines, and give the same events."""
    expected = [SSEEvent("a\nb"), SSEEvent("c")]
    for end in (b"\n", b"\r", b"\r\n"):
        blob = b"data: a" + end + b"data: b" + end + end + b"data: c" + end + end
        assert decode_all(blob) == expected


def test_cr_then_lf_across_reads_is_one_line_end() -> None:
    """A CR ending one read and an LF starting the next make a single line end."""
    assert decode_all(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent("a\nb")]


def test_cr_at_end_then_empty_read_keeps_skip() -> None:
    """An empty read between CR and LF does not turn the LF into a blank line."""
    assert decode_all(b"data: a\r", b"", b"\ndata: b\n\n") == [SSEEvent("a\nb")]


def test_unicode_line_separators_are_data() -> None:
    """U+2028, U+2029 and U+0085 are not line ends (the httpx-sse #34 bug)."""
    text = "x\u2028y\u2029z\u0085w"
    assert decode_all(f"data: {text}\n\n".encode()) == [SSEEvent(text)]


def test_utf8_split_inside_characters() -> None:
    """A multi-byte character cut across reads decodes whole."""
    blob = "data: 世界🚀\n\n".encode()
    for cut in range(1, len(blob)):
        assert decode_all(blob[:cut], blob[cut:]) == [SSEEvent("世界🚀")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    """Invalid bytes decode to U+FFFD instead of raising."""
    assert decode_all(b"data: a\xffb\n\n") == [SSEEvent("a\ufffdb")]


def test_bom_only_at_start() -> None:
    """One leading BOM is dropped, also when split; a BOM later is data."""
    assert decode_all(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [SSEEvent("x")]
    assert decode_all(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == [IgnoredField("\ufeffdata", "x")]


def test_short_stream_that_looks_like_bom_prefix() -> None:
    """A stream of just a BOM prefix yields nothing, and a non-BOM byte is kept."""
    assert decode_all(b"\xef\xbb") == []
    assert decode_all(b"\xef", b"x: 1\n\n") == [IgnoredField("\ufffdx", "1")]


def test_comments_are_reported_never_data() -> None:
    """Comment lines come out as Comment items and dispatch nothing."""
    assert decode_all(b": keep-alive\n\n:\n\n") == [Comment(" keep-alive"), Comment("")]


def test_field_without_colon_and_one_space_removed() -> None:
    """`data` alone is an empty data line; only one leading space is removed."""
    assert decode_all(b"data\n\ndata:  two\n\ndata:\tt\n\n") == [
        SSEEvent(""),
        SSEEvent(" two"),
        SSEEvent("\tt"),
    ]


def test_event_type_resets_after_dispatch() -> None:
    """An event type applies to one event only; a block without data dispatches nothing."""
    assert decode_all(b"event: ping\n\nevent: x\ndata: 1\n\ndata: 2\n\n") == [
        SSEEvent("1", event="x"),
        SSEEvent("2"),
    ]


def test_id_persists_null_is_ignored() -> None:
    """id persists across events, an id with NUL is ignored, a data-less id still counts."""
    decoder = SSEDecoder()
    items = decode_all(
        b"id: 7\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid: 42\n\n", decoder=decoder
    )
    assert items == [SSEEvent("a", id="7"), SSEEvent("b", id="7"), SSEEvent("c", id="7")]
    assert decoder.last_event_id == "42"


def test_retry_only_ascii_digits() -> None:
    """retry takes only ASCII digits; other values change nothing."""
    decoder = SSEDecoder()
    decode_all(
        b"retry: 2500\n\nretry: 2.5\nretry: -1\nretry:\nretry: \xd9\xa3\n\n", decoder=decoder
    )
    assert decoder.reconnection_time_ms == 2500


def test_unknown_fields_are_reported_as_ignored() -> None:
    """Unknown and case-mismatched field names are reported, not treated as data."""
    assert decode_all(b"Data: x\nfoo: bar\nerror\n\n") == [
        IgnoredField("Data", "x"),
        IgnoredField("foo", "bar"),
        IgnoredField("error", ""),
    ]


def test_flush_discards_unterminated_but_reports_it() -> None:
    """At EOF the open block is not dispatched; it is reported as IncompleteEvent."""
    assert decode_all(b"data: a\n\ndata: [DONE]") == [SSEEvent("a"), IncompleteEvent("[DONE]")]
    assert decode_all(b"data: x\ndata") == [IncompleteEvent("x\n")]
    assert decode_all(b"data: x\n") == [IncompleteEvent("x")]
    assert decode_all(b"event: y\n") == []
    assert decode_all(b"datum: x") == []


def test_decoder_is_reusable_after_flush() -> None:
    """flush() resets the stream state but keeps last_event_id."""
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\ndata: half")
    decoder.flush()
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [SSEEvent("b", id="1")]


def test_max_event_bytes_unterminated_line_raises_bounded() -> None:
    """A 64 MiB data line with no line end raises ProtocolError, memory bounded by the limit."""
    limit = 16 * 1024 * 1024
    decoder = SSEDecoder()
    piece = b"x" * 65536
    tracemalloc.start()
    fed = 0
    decoder.feed(b"data: ")
    error = None
    while fed < 64 * 1024 * 1024:
        try:
            decoder.feed(piece)
        except ProtocolError as exc:
            error = exc
            break
        fed += len(piece)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert error is not None
    assert "16777216-byte limit" in error.message
    assert fed <= limit
    assert peak < limit * 1.25
    assert error.excerpt.startswith("xxx")
    with pytest.raises(ProtocolError):  # the decoder stays failed
        decoder.feed(b"\n\n")


def test_max_event_bytes_across_many_data_lines() -> None:
    """Many short data lines of one event count against the limit too."""
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(ProtocolError):
        decoder.feed(b"data: 0123456789\n" * 20)
    decoder = SSEDecoder(max_event_bytes=10)
    with pytest.raises(ProtocolError):
        decoder.feed(b"data\n" * 20)


def test_oversize_after_complete_events_returns_them_first() -> None:
    """Events completed in the same read are returned; the error comes on the next call."""
    decoder = SSEDecoder(max_event_bytes=50)
    items = decoder.feed(b"data: ok\n\ndata: " + b"y" * 100 + b"\n")
    assert items == [SSEEvent("ok")]
    with pytest.raises(ProtocolError):
        decoder.flush()
    decoder = SSEDecoder(max_event_bytes=50)
    assert decoder.feed(b"data: ok\n\ndata: " + b"z" * 100) == [SSEEvent("ok")]
    with pytest.raises(ProtocolError):
        decoder.feed(b"more")


def test_invalid_limit_is_rejected() -> None:
    """A limit below one byte is a programming error."""
    with pytest.raises(ValueError, match="max_event_bytes"):
        SSEDecoder(max_event_bytes=0)


def test_encode_event_all_fields() -> None:
    """encode_event writes event, id, retry and one data line per text line."""
    assert encode_event("a\nb", event="x", id="9", retry_ms=5) == (
        b"event: x\nid: 9\nretry: 5\ndata: a\ndata: b\n\n"
    )
    assert encode_event("a\r\nb\rc") == b"data: a\ndata: b\ndata: c\n\n"
    assert encode_comment("keep-alive") == b": keep-alive\n\n"


@pytest.mark.parametrize(
    "kwargs",
    [{"event": "a\nb"}, {"id": "a\rb"}, {"id": "a\x00"}, {"retry_ms": -1}],
)
def test_encode_event_rejects_unrepresentable(kwargs: dict[str, object]) -> None:
    """Values SSE cannot carry raise EncodeError naming them."""
    with pytest.raises(EncodeError):
        encode_event("x", **kwargs)  # type: ignore[arg-type]  # bad values on purpose


def test_encode_comment_rejects_line_break() -> None:
    """A comment with a line break would inject fields; it is refused."""
    with pytest.raises(EncodeError):
        encode_comment("a\nb")


# -- properties ------------------------------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r"), max_size=40
)
_token = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00"),
    max_size=12,
)
_events = st.lists(
    st.tuples(_text, st.one_of(st.none(), _token.filter(bool)), st.one_of(st.none(), _token)),
    max_size=8,
)


def _pieces(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    bounds = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    lines = draw(
        st.lists(
            st.one_of(
                st.sampled_from([b"", b":", b": keep-alive", b"data", b"retry: 10", b"id: 3"]),
                st.builds(lambda v: b"data: " + v.encode(), _token),
                st.builds(lambda v: b"event:" + v.encode(), _token),
                st.builds(lambda v: b"x-" + v.encode(), _token),
            ),
            max_size=30,
        )
    )
    ends = draw(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=len(lines)))
    blob = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    blob += b"".join(line + end for line, end in zip(lines, ends, strict=False))
    return blob, _pieces(draw, blob)


@given(stream_and_cuts())
def test_any_split_gives_the_events_of_feeding_whole(case: tuple[bytes, list[bytes]]) -> None:
    """Any split of a byte stream into reads yields exactly the events of feeding it whole."""
    blob, pieces = case
    whole = SSEDecoder()
    split = SSEDecoder()
    assert decode_all(*pieces, decoder=split) == decode_all(blob, decoder=whole)
    assert split.last_event_id == whole.last_event_id
    assert split.reconnection_time_ms == whole.reconnection_time_ms


@given(stream_and_cuts())
def test_byte_by_byte_equals_whole(case: tuple[bytes, list[bytes]]) -> None:
    """Feeding one byte at a time gives the same items as one read."""
    blob, _ = case
    assert decode_all(*(blob[i : i + 1] for i in range(len(blob)))) == decode_all(blob)


@given(_events, st.data())
def test_encode_then_decode_is_identity(
    events: list[tuple[str, str | None, str | None]], data: st.DataObject
) -> None:
    """decode(encode(events)) gives back the same events, whatever the read boundaries."""
    blob = b"".join(encode_event(d, event=e, id=i) for d, e, i in events)
    expected = []
    last_id = ""
    for text, event, event_id in events:
        last_id = event_id if event_id is not None else last_id
        expected.append(SSEEvent(text, event or "message", last_id))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    bounds = [0, *cuts, len(blob)]
    reads = [blob[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode_all(*reads) == expected


def test_flush_ignores_a_field_that_only_starts_with_data() -> None:
    """At EOF an unterminated `database:` line is not data; only `data` is salvaged."""
    assert decode_all(b"database: x") == []
    assert decode_all(b"data:x") == [IncompleteEvent("x")]


# -- one_data_event: the one-event read ----------------------------------------------------


def test_one_data_event_returns_the_data_of_a_lone_event() -> None:
    """A read that is one `data: ` event gives its data bytes and dispatches it as `feed`
    would (last_event_id takes the id buffer); the decoder is left clean."""
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\n") == []
    assert decoder.last_event_id == ""
    assert decoder.one_data_event(b'data: {"a":1}\n\n') == b'{"a":1}'
    assert decoder.last_event_id == "7"
    assert decoder.feed(b"data: x\n\n") == [SSEEvent("x", "message", "7")]
    assert decoder.feed(b"data: y") == []
    assert decoder.one_data_event(b"data: z\n\n") is None  # holds part of a line


@pytest.mark.parametrize(
    "read",
    [
        b"data: a\n\ndata: b\n\n",  # two events
        b"data: a\ndata: b\n\n",  # two data lines
        b"data: a\n",  # no blank line yet
        b"data: a\r\n\r\n",  # CR line ends
        b"data:a\n\n",  # no space after the colon
        b"event: x\ndata: a\n\n",  # another field
        b"data: a\n\n\n",  # a blank line more
        b"",
    ],
)
def test_one_data_event_refuses_anything_else(read: bytes) -> None:
    """Any other read gives None and consumes nothing: `feed` then decodes it."""
    decoder = SSEDecoder()
    decoder.feed(b": start\n\n")
    assert decoder.one_data_event(read) is None
    whole = SSEDecoder()
    whole.feed(b": start\n\n")
    assert decoder.feed(read) == whole.feed(read)


def test_one_data_event_leaves_the_decoder_state_to_feed() -> None:
    """With part of a BOM held, after a CR, with an event type buffered, past the size
    limit or after an oversize error, the read is left to `feed`."""
    half_bom = SSEDecoder()
    assert half_bom.feed(b"\xef\xbb") == []
    assert half_bom.one_data_event(b"data: a\n\n") is None
    assert half_bom.feed(b"\xbfdata: a\n\n") == [SSEEvent("a", "message", "")]
    after_cr = SSEDecoder()
    after_cr.feed(b"data: a\r")
    assert after_cr.one_data_event(b"data: b\n\n") is None
    typed = SSEDecoder()
    typed.feed(b": x\n\nevent: ping\n")
    assert typed.one_data_event(b"data: b\n\n") is None
    small = SSEDecoder(max_event_bytes=4)
    small.feed(b": x\n\n")
    assert small.one_data_event(b"data: 1234\n\n") is None
    assert small.one_data_event(b"data: 123\n\n") == b"123"
    with pytest.raises(ProtocolError):
        small.feed(b"data: 12345\n\n")
    assert small.one_data_event(b"data: 1\n\n") is None


def test_one_data_event_takes_a_streams_first_read() -> None:
    """A stream's first read of one `data:` event (no BOM can lead it) is taken, dispatched
    as `feed` dispatches it; a BOM after it is data, as after `feed`'s check."""
    fresh = SSEDecoder()
    assert fresh.one_data_event(b"data: a\n\n") == b"a"
    whole = SSEDecoder()
    assert whole.feed(b"data: a\n\n") == [SSEEvent("a", "message", "")]
    assert fresh.feed(b"\xef\xbb\xbfdata: b\n\n") == whole.feed(b"\xef\xbb\xbfdata: b\n\n")
