"""The gateway reads the header fields of a plain request head in one pass
(gateway/guard.py `_whole_message`): whatever head it reads, it reads as the parser's
field-by-field callbacks do, and it ends the request where the parser does."""

from __future__ import annotations

from typing import Any

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.gateway.guard import _whole_message

_NAMES = st.sampled_from(
    [
        *(b"Host", b"content-type", b"Content-Length", b"X-Api-Key", b"Authorization", b"a"),
        *(b"X Y", b"Expect", b"Transfer-Encoding", b"b@d", b" Host", b"Accept"),
    ]
)
_SEPARATORS = st.sampled_from([b":", b": ", b":\t", b" :", b":  \t "])
_VALUES = st.sampled_from(
    [
        *(b"", b"v", b"a b", b"x:y", b"bearer K", b"v  ", b"v\t", b"12", b"chunked"),
        *(b"100-continue", b"3", b"0", b"-1", b"1x", b"v\x00", b"\xff"),
    ]
)
_ENDS = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\n ", b"\r\n\t"])
_LINES = st.sampled_from(
    [b"POST /v1/chat/completions HTTP/1.1", b"GET / HTTP/1.0", b"GET /x HTTP/1.1", b"BAD"]
)


class _Collect:
    """The parser's callbacks as the protocol's field-by-field parser calls them."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.completed = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value.rstrip(b" \t")))

    def on_message_complete(self) -> None:
        self.completed += 1


def _parse(data: bytes) -> _Collect | None:
    collect = _Collect()
    parser: Any = httptools.HttpRequestParser(collect)
    parser.set_dangerous_leniencies(lenient_data_after_close=True)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return collect


@settings(max_examples=600)
@given(
    line=_LINES,
    fields=st.lists(st.tuples(_NAMES, _SEPARATORS, _VALUES, _ENDS), max_size=6),
    lead=st.sampled_from([b"", b"", b"", b"\r\n"]),
    body=st.sampled_from([b"", b"{}", b"0123456789"]),
    extra=st.sampled_from([b"", b"", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"]),
)
def test_a_plain_head_is_read_as_the_parser_reports_it(
    line: bytes,
    fields: list[tuple[bytes, bytes, bytes, bytes]],
    lead: bytes,
    body: bytes,
    extra: bytes,
) -> None:
    head = lead + line + b"\r\n" + b"".join(n + s + v + e for n, s, v, e in fields) + b"\r\n"
    data = head + body + extra
    whole = _whole_message(data, 100, 8192)
    if whole is None:
        return  # the parser reads it field by field
    read, end = whole
    # Only a plain head is read here, and only when all of it is in.
    assert not lead
    assert end >= data.index(b"\r\n\r\n") + 4
    # (A body not all in: what follows would be its rest.)
    whole_request = data[:end] + b"x" * (end - len(data))
    parsed = _parse(whole_request)
    if parsed is None:
        # The parser refuses the head (or the body): so does the gateway, whatever it read.
        return
    assert read == parsed.fields
    # The request ends where the parser ends it: whole at `end`, not before.
    assert parsed.completed == 1
    before = _parse(whole_request[:-1])
    assert before is None or before.completed == 0


def test_the_common_head_is_read() -> None:
    """The head the SDK and the benches send: read here, as the parser reports it."""
    body = b'{"model": "m"}'
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer k  \r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    whole = _whole_message(data, 100, 8192)
    assert whole is not None
    parsed = _parse(data)
    assert parsed is not None
    assert whole == (parsed.fields, len(data))


def test_limits_and_unusual_heads_go_field_by_field() -> None:
    """Heads near the limits, or with a field whose handling the callbacks decide, are
    left to the parser's callbacks (which count, check and refuse)."""
    data = b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\n\r\n"
    assert _whole_message(data, 2, 8192) is not None
    assert _whole_message(data, 1, 8192) is None
    assert _whole_message(data, 2, len(data)) is not None
    assert _whole_message(data, 2, len(data) - 1) is None
    assert _whole_message(b"GET / HTTP/1.1\r\n\r\n", 100, 8192) is None  # no field
    for field in (b"Expect: 100-continue", b"Transfer-Encoding: chunked", b"Host: again"):
        assert _whole_message(data.replace(b"A: 1", field), 100, 8192) is None
    assert _whole_message(data[:-1], 100, 8192) is None  # not all in
