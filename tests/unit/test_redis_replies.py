"""stores/redis_streamlog.py `_reply_reader`: the log's connection parses Redis' replies
itself (no reader task): every reply is read whole, whatever the reads it arrives in, an
incomplete one waits for its bytes, and errors come as redis-py's exceptions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

from unbroken.stores.redis_streamlog import _MORE, _reply_reader

_values = st.recursive(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=40), st.none()),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=12,
)


def _resp(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(_resp(item) for item in value)


def _read_all(reader: Any) -> list[Any]:
    out = []
    while (value := reader.gets()) is not _MORE:
        out.append(value)
    return out


@given(st.lists(_values, min_size=1, max_size=6), st.data())
def test_replies_split_anywhere_are_read_whole_and_in_order(
    values: list[Any], data: st.DataObject
) -> None:
    wire = b"".join(_resp(v) for v in values)
    cut = data.draw(st.integers(0, len(wire)))
    reader = _reply_reader()
    reader.feed(wire[:cut])
    first = _read_all(reader)
    # What was read is a prefix of the replies; the rest waits for its bytes.
    assert first == values[: len(first)]
    reader.feed(wire[cut:])
    assert first + _read_all(reader) == values
    assert not reader.has_data()


def test_error_replies_are_redis_py_exceptions() -> None:
    reader = _reply_reader()
    reader.feed(b"-NOSCRIPT No matching script.\r\n:1\r\n-WRONGTYPE Operation against a key\r\n")
    noscript, one, wrong = _read_all(reader)
    assert isinstance(noscript, NoScriptError)
    assert one == 1
    assert isinstance(wrong, ResponseError)
    assert "Operation against a key" in str(wrong)


def test_statuses_and_resp3_nulls() -> None:
    reader = _reply_reader()
    reader.feed(b"+OK\r\n_\r\n*-1\r\n")
    assert _read_all(reader) == [b"OK", None, None]


def test_an_unknown_reply_type_is_a_protocol_error() -> None:
    reader = _reply_reader()
    reader.feed(b"?what\r\n")
    with pytest.raises(InvalidResponse, match="reply type"):
        reader.gets()
