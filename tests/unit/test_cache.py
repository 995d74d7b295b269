"""core/cache.py: request keys, what may be stored, marking and replay pacing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbroken.core.cache import (
    CachedAnswer,
    cache_key,
    decode_entry,
    encode_entry,
    frames_due,
    is_storable,
    mark_chunk,
    render_replay,
    replay_batches,
    replay_comment,
)
from unbroken.errors import ConfigError

BASE = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "When is the sale?"}]}


def test_key_ignores_fields_that_do_not_shape_the_answer() -> None:
    """stream, stream_options, user and our own options do not change the key."""
    other = {
        **BASE,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "shopper-17",
        "unbroken": {"resumable": True},
    }
    assert cache_key(other) == cache_key(BASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "deepseek-reasoner"),
        ("temperature", 0),
        ("top_p", 0.5),
        ("max_tokens", 10),
        ("seed", 7),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
        ("stop", ["\n"]),
    ],
)
def test_key_changes_with_each_field_that_shapes_the_answer(field: str, value: object) -> None:
    """Model, sampling, max_tokens, seed, tools, response_format and stop are in the key."""
    assert cache_key({**BASE, field: value}) != cache_key(BASE)


def test_key_treats_api_defaults_as_absent() -> None:
    """temperature=1, top_p=1, n=1 and zero penalties equal leaving them out."""
    explicit = {**BASE, "temperature": 1, "top_p": 1.0, "n": 1, "presence_penalty": 0}
    assert cache_key(explicit) == cache_key(BASE)
    assert cache_key({**BASE, "temperature": 0.99}) != cache_key(BASE)


def test_key_changes_with_any_message_text() -> None:
    """One character of the conversation makes another entry."""
    changed = {**BASE, "messages": [{"role": "user", "content": "When is the sale!"}]}
    assert cache_key(changed) != cache_key(BASE)


def test_key_normalizes_messages() -> None:
    """Text parts equal their concatenation; unknown message fields and nulls are dropped."""
    parts = {
        **BASE,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "When is "},
                    {"type": "text", "text": "the sale?"},
                ],
                "name": None,
                "x_client_id": "abc",
            }
        ],
    }
    assert cache_key(parts) == cache_key(BASE)


def test_key_keeps_image_parts_and_odd_messages() -> None:
    """A part that is not text, or a message that is not an object, is kept as is."""
    image = {
        **BASE,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    }
    odd = {**BASE, "messages": ["hello"]}
    assert len({cache_key(image), cache_key(odd), cache_key(BASE)}) == 3


@given(
    st.dictionaries(
        st.sampled_from(["temperature", "seed", "max_tokens", "user", "stream"]),
        st.integers(0, 3),
    )
)
def test_key_does_not_depend_on_field_order(extra: dict[str, int]) -> None:
    """Insertion order of the body's fields never changes the key."""
    forward = {**BASE, **extra}
    backward = dict(reversed(list(forward.items())))
    assert cache_key(forward) == cache_key(backward)
    assert cache_key(forward).startswith("v1:")


@pytest.mark.parametrize(
    ("reasons", "kwargs", "expected"),
    [
        (["stop"], {}, True),
        (["stop", "stop"], {}, True),
        (["length"], {}, False),
        (["stop", None], {}, False),
        ([], {}, False),
        (["tool_calls"], {}, False),
        (["tool_calls"], {"tool_calls_ok": True}, True),
        (["stop"], {"degraded": True}, False),
        (["content_filter"], {"tool_calls_ok": True}, False),
    ],
)
def test_is_storable(reasons: list[str | None], kwargs: dict[str, bool], expected: bool) -> None:
    """Only whole `stop` answers (tool calls by opt-in), never degraded ones, are stored."""
    assert is_storable(reasons, **kwargs) is expected


def test_entry_round_trips_and_garbage_is_a_miss() -> None:
    """An encoded entry decodes to itself; foreign bytes decode to None."""
    entry = CachedAnswer("deepseek-chat", 1000.0, [b'{"id":"a"}', b'{"id":"b"}'])
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(b"not msgpack at all \xff") is None


def test_mark_chunk_adds_the_status_and_keeps_every_field() -> None:
    """A marked chunk parses to the original fields plus `unbroken.cache`."""
    chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"reasoning_content": "思考"}}]}
    raw = json.dumps(chunk, ensure_ascii=False).encode()
    marked = json.loads(mark_chunk(raw, "stale"))
    assert marked.pop("unbroken") == {"cache": "stale"}
    assert marked == chunk


def test_replay_comment_and_rendered_events() -> None:
    """A replay opens with a comment naming status and age; the rendered body is one marked
    event per chunk then [DONE], and `ends` cut it into exactly those events."""
    entry = CachedAnswer("m", 100.0, [b'{"n":1}', b'{"n":2}'])
    assert replay_comment(entry, "hit", now=160.4) == b": unbroken cache=hit age=60s\n\n"
    assert replay_comment(entry, "stale", now=50.0) == b": unbroken cache=stale age=0s\n\n"
    rendered = render_replay(entry, "hit")
    starts = [0, *rendered.ends[:-1]]
    events = [rendered.body[a:b] for a, b in zip(starts, rendered.ends, strict=True)]
    assert events == [
        b'data: {"unbroken":{"cache":"hit"},"n":1}\n\n',
        b'data: {"unbroken":{"cache":"hit"},"n":2}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert rendered.ends[-1] == len(rendered.body)


def test_frames_due_at_once_and_at_the_start() -> None:
    """Pace 0 makes every event due at once; a paced replay's first event is due at 0
    (also for a clock read a hair before the start), and an empty one has none."""
    assert frames_due(0.0, 0.0, 5) == 5
    assert frames_due(0.0, 0.01, 5) == 1
    assert frames_due(-0.001, 0.01, 5) == 1
    assert frames_due(3.0, 0.01, 0) == 0


@given(st.integers(1, 500), st.floats(0.0005, 0.2), st.lists(st.floats(0, 200), max_size=30))
def test_frames_due_never_early_never_back_and_ends_whole(
    n: int, pace: float, times: list[float]
) -> None:
    """Read at increasing times, the count never goes back, never includes an event before
    its time (i * pace) nor leaves out one whose time has come, and ends at n."""
    last = 0
    for elapsed in sorted(times):
        due = frames_due(elapsed, pace, n)
        assert due >= last
        assert (due - 1) * pace <= elapsed + 1e-9
        assert due == n or due * pace > elapsed - 1e-9
        last = due
    assert frames_due(n * pace, pace, n) == n


def test_frames_due_refuses_a_negative_pace() -> None:
    """A negative pace is a ConfigError naming pace_s."""
    with pytest.raises(ConfigError, match="pace_s"):
        frames_due(1.0, -0.1, 3)


def test_replay_batches_at_once_and_empty() -> None:
    """Pace 0 writes everything at once; nothing to write gives no batch."""
    assert replay_batches(5, 0.0, 0.02) == [(0.0, 5)]
    assert replay_batches(0, 0.01, 0.02) == []


@given(st.integers(1, 500), st.floats(0.0005, 0.2), st.floats(0.001, 0.1))
def test_replay_batches_cover_every_frame_in_order(n: int, pace: float, tick: float) -> None:
    """Batches end at increasing indexes up to n; no batch is written before its first
    frame is due, nor later than one tick before its last."""
    batches = replay_batches(n, pace, tick)
    ends = [end for _, end in batches]
    assert ends == sorted(set(ends))
    assert ends[-1] == n
    start = 0
    for offset, end in batches:
        assert offset == pytest.approx(start * pace)
        assert (end - 1) * pace - offset <= max(tick, pace) + 1e-9
        start = end


@pytest.mark.parametrize(("pace", "tick"), [(-0.1, 0.02), (0.01, 0.0)])
def test_replay_batches_refuse_bad_pacing(pace: float, tick: float) -> None:
    """A negative pace or a non-positive tick is a ConfigError naming both."""
    with pytest.raises(ConfigError, match="pace_s"):
        replay_batches(3, pace, tick)
