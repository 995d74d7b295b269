"""stores/redis_streamlog.py `_reply`: the log's connection parses Redis' replies itself (no
reader task): every reply is read whole, whatever the reads it arrives in, and an
incomplete one waits for its bytes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

from unbroken.stores.redis_streamlog import _reply

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


def _read_all(buf: bytearray) -> tuple[list[Any], int]:
    out, at = [], 0
    while at < len(buf):
        value, after = _reply(buf, at)
        if after < 0:
            break
        out.append(value)
        at = after
    return out, at


@given(st.lists(_values, min_size=1, max_size=6), st.data())
def test_replies_split_anywhere_are_read_whole_and_in_order(
    values: list[Any], data: st.DataObject
) -> None:
    wire = b"".join(_resp(v) for v in values)
    cut = data.draw(st.integers(0, len(wire)))
    buf = bytearray(wire[:cut])
    first, at = _read_all(buf)
    # What was read is a prefix of the replies; the rest waits for its bytes.
    assert first == values[: len(first)]
    del buf[:at]
    buf += wire[cut:]
    rest, at = _read_all(buf)
    assert first + rest == values
    assert at == len(buf)


def test_error_replies_are_redis_py_exceptions() -> None:
    noscript, after = _reply(bytearray(b"-NOSCRIPT No matching script.\r\n:1\r\n"), 0)
    assert isinstance(noscript, NoScriptError)
    assert _reply(bytearray(b"-NOSCRIPT No matching script.\r\n:1\r\n"), after) == (1, after + 4)
    wrong, _ = _reply(bytearray(b"-WRONGTYPE Operation against a key\r\n"), 0)
    assert isinstance(wrong, ResponseError)
    assert "Operation against a key" in str(wrong)


def test_statuses_and_resp3_nulls() -> None:
    assert _reply(bytearray(b"+OK\r\n"), 0) == (b"OK", 5)
    assert _reply(bytearray(b"_\r\n"), 0) == (None, 3)
    assert _reply(bytearray(b"*-1\r\n"), 0) == (None, 5)


def test_an_unknown_reply_type_is_a_protocol_error() -> None:
    with pytest.raises(InvalidResponse, match="unexpected reply"):
        _reply(bytearray(b"?what\r\n"), 0)
