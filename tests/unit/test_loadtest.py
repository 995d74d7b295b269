"""The pure parts of `unbroken bench`: load schedules, token distributions, percentiles,
summaries and answer integrity."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_layering import CORE_FORBIDDEN, SRC, imports_of
from unbroken.core.events import Comment, SSEEvent
from unbroken.errors import ConfigError
from unbroken.loadtest.answer import AnswerRead
from unbroken.loadtest.faults import parse_cut, parse_fault_mix
from unbroken.loadtest.schedule import (
    LoadShape,
    arrival_times,
    generated_prompt,
    parse_tokens,
    sales_peak,
)
from unbroken.loadtest.stats import (
    RequestRecord,
    compare_answer,
    percentile,
    summarize,
    throughput_series,
)


@pytest.mark.parametrize("name", ["schedule.py", "stats.py", "answer.py", "faults.py"])
def test_pure_modules_do_no_io(name: str) -> None:
    """schedule and stats import no I/O, clock or logging module (the pure core of bench)."""
    for module, _ in imports_of(SRC / "loadtest" / name):
        assert module.split(".")[0] not in CORE_FORBIDDEN, f"{name} imports {module}"


def test_constant_rate_starts_evenly() -> None:
    """A constant rate of 4/s over 2 s starts 8 requests 0.25 s apart."""
    times = arrival_times(LoadShape("constant", 2.0, rate=4.0), random.Random(0))
    assert times == pytest.approx([i * 0.25 for i in range(8)])


def test_poisson_rate_averages_the_rate() -> None:
    """Poisson arrivals at 200/s over 50 s average ~200/s with exponential gaps (CV ~1)."""
    times = arrival_times(LoadShape("poisson", 50.0, rate=200.0), random.Random(1))
    assert len(times) == pytest.approx(10_000, rel=0.05)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    assert times == sorted(times)
    assert all(0 <= t < 50.0 for t in times)


def test_ramp_climbs_then_holds() -> None:
    """A ramp 0 -> 100/s over 10 s then a 10 s hold starts 500 + 1000 requests, and the rate
    in each second of the ramp follows the line."""
    shape = LoadShape("ramp", 20.0, rate=100.0, start_rate=0.0, ramp_s=10.0)
    times = arrival_times(shape, random.Random(0))
    assert len(times) == pytest.approx(1500, abs=2)
    per_second = [sum(1 for t in times if s <= t < s + 1) for s in range(20)]
    for s in range(10):
        assert per_second[s] == pytest.approx(10 * s + 5, abs=2)
    assert all(c == pytest.approx(100, abs=1) for c in per_second[10:])


def test_sales_peak_preset() -> None:
    """sales-peak: 10% of the target, a ramp over 40% of the run, then the target rate."""
    shape = sales_peak(50.0, 10.0)
    assert (shape.kind, shape.start_rate, shape.ramp_s, shape.rate) == ("ramp", 5.0, 4.0, 50.0)
    times = arrival_times(shape, random.Random(0))
    assert sum(1 for t in times if t < 1) == pytest.approx(5 + 45 / 8, abs=2)
    assert sum(1 for t in times if 9 <= t < 10) == pytest.approx(50, abs=1)


def test_max_requests_caps_a_schedule() -> None:
    """max_requests stops the schedule early."""
    shape = LoadShape("constant", 100.0, rate=10.0, max_requests=7)
    assert len(arrival_times(shape, random.Random(0))) == 7


def test_closed_loop_has_no_schedule() -> None:
    """Asking a closed-loop shape for arrivals is a typed error."""
    with pytest.raises(ConfigError, match="closed-loop"):
        arrival_times(LoadShape("closed"), random.Random(0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "burst"}, "unknown load shape"),
        ({"kind": "closed", "concurrency": 0}, "concurrency"),
        ({"kind": "constant", "rate": 0.0}, "rate"),
        ({"kind": "closed", "duration_s": 0.0}, "duration"),
        ({"kind": "ramp", "ramp_s": -1.0}, ">= 0"),
    ],
)
def test_bad_shapes_are_named(kwargs: dict[str, object], match: str) -> None:
    """A bad load shape is a ConfigError naming the value."""
    with pytest.raises(ConfigError, match=match):
        LoadShape(**kwargs)  # type: ignore[arg-type]


def test_token_distributions() -> None:
    """max_tokens specs parse and draw within their range."""
    rng = random.Random(0)
    assert parse_tokens("150").draw(rng) == 150
    assert parse_tokens("fixed:7").mean == 7
    uniform = parse_tokens("uniform:50-60")
    draws = [uniform.draw(rng) for _ in range(500)]
    assert min(draws) == 50
    assert max(draws) == 60
    assert uniform.mean == 55
    normal = parse_tokens("normal:150,30")
    many = [normal.draw(rng) for _ in range(2000)]
    assert statistics.mean(many) == pytest.approx(150, abs=4)
    assert min(parse_tokens("normal:1,50").draw(rng) for _ in range(200)) >= 1


@pytest.mark.parametrize("spec", ["", "0", "uniform:9-3", "normal:x,1", "poisson:3", "fixed:-1"])
def test_bad_token_specs_are_named(spec: str) -> None:
    """A malformed --max-tokens is a ConfigError quoting it."""
    with pytest.raises(ConfigError, match="bad --max-tokens"):
        parse_tokens(spec)


def test_generated_prompts_vary() -> None:
    """Generated prompts differ and are deterministic for a seed."""
    a = [generated_prompt(random.Random(3), n) for n in range(5)]
    b = [generated_prompt(random.Random(3), n) for n in range(5)]
    assert a == b
    assert len(set(a)) == 5


def test_percentiles_match_the_definition() -> None:
    """Linear interpolation between closest ranks, as numpy's default."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="0-100"):
        percentile(values, 101)


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1), st.floats(0, 100))
def test_percentile_matches_statistics_quantiles(values: list[float], q: float) -> None:
    """percentile lies within the data and is monotone in q."""
    p = percentile(values, q)
    assert p is not None
    assert min(values) <= p <= max(values)
    assert p <= (percentile(values, min(100.0, q + 1)) or 0) + 1e-6


def test_compare_answers() -> None:
    """Whole, duplicated, missing and mangled answers, counted in UTF-8 bytes."""
    ref = "Hello, 世界! The answer is whole."
    assert compare_answer(ref, ref).kind == "whole"
    dup = compare_answer("Hello, 世界! 世界! The answer is whole.", ref)
    assert (dup.kind, dup.extra_bytes, dup.missing_bytes) == (
        "duplicated",
        len(" 世界!".encode()),
        0,
    )
    gap = compare_answer("Hello, The answer is whole.", ref)
    assert (gap.kind, gap.missing_bytes) == ("missing", len("世界! ".encode()))
    cut = compare_answer("Hello, 世界!", ref)
    assert (cut.kind, cut.missing_bytes) == ("missing", len(" The answer is whole."))
    both = compare_answer("Hello, XX The answer is whole.", ref)
    assert both.kind == "mangled"
    assert both.extra_bytes == len("XX")
    assert both.missing_bytes == len("世界!".encode())


@given(st.text(min_size=1), st.integers(0, 10_000), st.integers(1, 50))
def test_a_repeat_at_any_cut_is_duplicated(text: str, at: int, size: int) -> None:
    """Repeating any stretch right after itself is `duplicated` by exactly its bytes."""
    raw = text.encode()
    cut = at % (len(raw) + 1)
    start = max(0, cut - size)
    got_bytes = raw[:cut] + raw[start:cut] + raw[cut:]
    try:
        got = got_bytes.decode()
    except UnicodeDecodeError:
        return  # a repeat that splits a character is not a text answer
    result = compare_answer(got, text)
    assert result.extra_bytes == cut - start
    assert result.missing_bytes == 0


def _record(n: int, **kw: object) -> RequestRecord:
    record = RequestRecord(n, "stream", float(n))
    for key, value in kw.items():
        setattr(record, key, value)
    return record


def test_summary_figures() -> None:
    """Requests/s count successes, tokens/s every token, errors by kind, TPOT per request."""
    records = [
        _record(
            0,
            status=200,
            ttft_s=0.1,
            e2e_s=1.1,
            completion_tokens=11,
            n_chunks=11,
            gaps_s=[0.1] * 10,
            attempts=2,
            cut_gap_s=0.03,
        ),
        _record(
            1,
            status=200,
            ttft_s=0.2,
            e2e_s=2.2,
            completion_tokens=21,
            n_chunks=21,
            gaps_s=[0.1] * 20,
        ),
        _record(2, status=429, error="http_429", e2e_s=0.01),
        _record(3, status=0, error="connect", e2e_s=0.01),
    ]
    s = summarize(records, 4.0)
    assert (s.n_requests, s.n_ok) == (4, 2)
    assert s.errors == {"http_429": 1, "connect": 1}
    assert s.requests_per_s == pytest.approx(0.5)
    assert s.tokens_per_s == pytest.approx(32 / 4)
    assert s.tpot.p50 == pytest.approx(0.1)
    assert s.ttft.p50 == pytest.approx(0.15)
    assert s.itl.n == 30
    assert s.cut_gap.p50 == pytest.approx(0.03)
    assert s.upstream_attempts == 2 + 1 + 1  # the trailer's 2, then one per answered request
    assert s.as_dict()["errors"] == {"connect": 1, "http_429": 1}


def test_throughput_series_buckets_by_end() -> None:
    """Starts count where they started, completions and tokens where they ended."""
    records = [
        _record(0, e2e_s=0.5, completion_tokens=10),  # ends at 0.5
        _record(1, e2e_s=0.5, completion_tokens=20),  # ends at 1.5
        _record(2, e2e_s=9.0, error="timeout"),  # ends past the run: last bucket
    ]
    series = throughput_series(records, 1.0, 3.0)
    assert series == [(0.0, 1.0, 1.0, 10.0), (1.0, 1.0, 1.0, 20.0), (2.0, 1.0, 0.0, 0.0)]
    with pytest.raises(ValueError, match="bucket"):
        throughput_series(records, 0.0, 1.0)


def _event(data: object, event_id: str = "") -> SSEEvent:
    return SSEEvent(data if isinstance(data, str) else json.dumps(data), id=event_id)


def _delta(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_reading_an_answer() -> None:
    """Text chunks are timed, the usage and the gateway's account are kept, [DONE] ends it,
    and the gap at a mock fault's chunk is the cut-to-next-byte latency."""
    read = AnswerRead(RequestRecord(0, "stream", 0.0), t0=10.0)
    read.feed([_event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, "1")], 10.01)
    read.feed([_event(_delta("Hel"), "2"), Comment(" keep-alive")], 10.02)
    read.feed([_event(_delta("lo"), "3")], 10.03)
    read.feed([_event(_delta(", 世界"), "4")], 10.33)  # the cut after mock chunk 3
    read.feed(
        [_event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})], 10.34
    )
    read.feed([_event({"choices": [], "unbroken": {"attempts": 2, "resumes": 1}}, "9")], 10.35)
    read.feed([_event("[DONE]")], 10.36)
    assert read.finished
    read.finish(99.0, cut_after=3)
    r = read.record
    assert (r.text, r.n_chunks, r.error) == ("Hello, 世界", 3, None)
    assert r.ttft_s == pytest.approx(0.02)
    assert r.e2e_s == pytest.approx(0.36)
    assert r.gaps_s == pytest.approx([0.01, 0.30])
    assert r.cut_gap_s == pytest.approx(0.30)
    assert (r.prompt_tokens, r.completion_tokens, r.attempts, r.resumes) == (5, 3, 2, 1)
    assert read.last_id == "9"


def test_reading_a_broken_answer() -> None:
    """An error event is `stream_error`; an answer without [DONE] is `truncated`; the
    trailer comment of an older gateway gives the attempts."""
    broken = AnswerRead(RequestRecord(0, "stream", 0.0), t0=0.0)
    broken.feed([_event(_delta("a")), _event({"error": {"message": "boom"}})], 0.1)
    broken.finish(0.2, cut_after=None)
    assert broken.record.error == "stream_error"
    cut = AnswerRead(RequestRecord(1, "stream", 0.0), t0=0.0)
    cut.feed([_event(_delta("a")), Comment(" unbroken route=a attempts=3 retries=2 resumes=0")], 1)
    cut.finish(2.0, cut_after=5)  # the stream ended before the fault's chunk
    assert (cut.record.error, cut.record.attempts, cut.record.cut_gap_s) == ("truncated", 3, None)
    empty = AnswerRead(RequestRecord(2, "stream", 0.0), t0=1.0)
    empty.finish(4.0, cut_after=None)
    assert (empty.record.e2e_s, empty.record.ttft_s) == (3.0, None)


def test_fault_mix_entries() -> None:
    """[P:]SPEC parses; a mid-stream fault names the chunk it breaks after."""
    mix = parse_fault_mix("0.25:reset after=12 times=1")
    assert (mix.spec, mix.probability, mix.cut_after) == ("reset after=12 times=1", 0.25, 12)
    assert parse_fault_mix("stall ms=100").cut_after == 2  # the mock's default `after`
    assert parse_fault_mix("429 times=1").cut_after is None
    assert parse_fault_mix("reset after=3; crlf").probability == 1.0
    with pytest.raises(ConfigError, match="bad fault"):
        parse_fault_mix("1.5:reset")
    assert str(parse_cut("cut")) == "cut after_bytes=2000"
    assert str(parse_cut(" cut after_ms=250 ")) == "cut after_ms=250"
    assert parse_cut("cut after_bytes=1500").after_bytes == 1500
    with pytest.raises(ConfigError, match="bad proxy fault"):
        parse_cut("drop after=3")
