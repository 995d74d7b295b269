"""stores/redis_streamlog.py `_pack`: the log's hand-made command packing writes exactly the
bytes redis-py's own packer writes for the same command."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from unbroken.stores.redis_streamlog import _pack

_parts = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=50).map(bytearray),
    st.text(max_size=50),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(st.lists(_parts, min_size=1, max_size=25))
def test_a_command_packs_as_redis_py_packs_it(
    parts: list[bytes | bytearray | str | int | float],
) -> None:
    expected = b"".join(bytes(chunk) for chunk in Connection().pack_command(b"EVALSHA", *parts))
    assert _pack([b"EVALSHA", *parts]) == expected
