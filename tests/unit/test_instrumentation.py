"""PrometheusHook: what each record adds to the registry, also for label sets seen before
(the hook keeps each label set's series after the first record)."""

from __future__ import annotations

import sys
import threading

import pytest
from prometheus_client import CollectorRegistry

from tests.support import answer_record
from unbroken.instrumentation import AnswerRecord, AttemptRecord, Hooks, PrometheusHook


def _attempt(kind: str, outcome: str) -> AttemptRecord:
    return AttemptRecord(
        route="r",
        model="m",
        kind=kind,
        status_code=200,
        outcome=outcome,
        duration_s=1.0,
        n_chunks=3,
    )


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_answers_add_up_per_label_set() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    for _ in range(3):
        hook.on_stream_start()
    hook.on_answer(answer_record())
    hook.on_answer(answer_record())
    hook.on_answer(answer_record(outcome="timeout_idle", model="n"))
    assert (
        _value(registry, "unbroken_requests_total", route="r", model="m", outcome="complete") == 2
    )
    assert (
        _value(registry, "unbroken_requests_total", route="r", model="n", outcome="timeout_idle")
        == 1
    )
    assert _value(registry, "unbroken_tokens_total", route="r", model="m", type="prompt") == 20
    assert _value(registry, "unbroken_tokens_total", route="r", model="m", type="completion") == 8
    assert _value(registry, "unbroken_cost_usd_total", route="r", model="m") == 0.5
    assert _value(registry, "unbroken_answer_duration_seconds_count", route="r") == 3
    assert _value(registry, "unbroken_answer_duration_seconds_sum", route="r") == 4.5
    assert _value(registry, "unbroken_time_to_first_token_seconds_count", route="r") == 3
    assert _value(registry, "unbroken_active_streams") == 0


def test_no_ttft_series_before_a_first_token() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    hook.on_stream_start()
    hook.on_answer(answer_record(outcome="connect_error", ttft_s=None))
    assert _value(registry, "unbroken_time_to_first_token_seconds_count", route="r") is None
    hook.on_stream_start()
    hook.on_answer(answer_record(outcome="connect_error", ttft_s=0.5))
    assert _value(registry, "unbroken_time_to_first_token_seconds_count", route="r") == 1


def test_attempts_count_by_kind_and_outcome() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    for kind, outcome in [
        ("first", "complete"),
        ("first", "complete"),
        ("retry", "server_error"),
        ("retry", "server_error"),
        ("resume", "complete"),
        ("fallback", "timeout_headers"),
    ]:
        hook.on_attempt(_attempt(kind, outcome))
    assert (
        _value(registry, "unbroken_attempts_total", route="r", kind="first", outcome="complete")
        == 2
    )
    assert _value(registry, "unbroken_retries_total", route="r") == 2
    assert _value(registry, "unbroken_resumes_total", route="r") == 1
    assert _value(registry, "unbroken_fallbacks_total", route="r") == 1
    assert _value(registry, "unbroken_errors_total", route="r", kind="server_error") == 2
    assert _value(registry, "unbroken_errors_total", route="r", kind="timeout_headers") == 1
    assert _value(registry, "unbroken_errors_total", route="r", kind="complete") is None


def _timed(duration_s: float, ttft_s: float | None) -> AnswerRecord:
    return AnswerRecord(
        route="r",
        model="m",
        outcome="complete",
        attempts=1,
        resumes=0,
        fallbacks=0,
        ttft_s=ttft_s,
        duration_s=duration_s,
        prompt_tokens=1,
        completion_tokens=1,
        cost_usd=0.0,
    )


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for metric in registry.collect()
        if metric.name == name
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def test_histograms_fill_their_buckets_as_observe_does() -> None:
    # Values on bucket bounds, between them, below the first and above the last: the
    # hook's summed records show the buckets a histogram observing each value shows.
    values = [0.0, 0.05, 0.1, 0.3, 0.5, 1.0, 7.0, 600.0, 601.0, float("nan")]
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    direct = CollectorRegistry()
    peer = PrometheusHook(direct)
    for value in values:
        hook.on_stream_start()
        hook.on_answer(_timed(value, value))
        # The collectors' own observe, the reference.
        peer.duration.labels("r").observe(value)
        peer.ttft.labels("r").observe(value)
    for name in ("unbroken_answer_duration_seconds", "unbroken_time_to_first_token_seconds"):
        got, want = _samples(registry, name), _samples(direct, name)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert str(got[key]) == str(value), key  # (the sums are NaN)
    assert _value(registry, "unbroken_answer_duration_seconds_bucket", route="r", le="0.1") == 3
    assert _value(registry, "unbroken_answer_duration_seconds_bucket", route="r", le="+Inf") == 9


def test_records_between_collections_add_up() -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    hook.on_stream_start()
    hook.on_stream_start()
    assert _value(registry, "unbroken_active_streams") == 2
    hook.on_answer(answer_record())
    hook.on_attempt(_attempt("retry", "server_error"))
    assert _value(registry, "unbroken_active_streams") == 1
    assert _value(registry, "unbroken_retries_total", route="r") == 1
    hook.on_answer(answer_record(ttft_s=0.7))
    hook.on_attempt(_attempt("retry", "server_error"))
    assert _value(registry, "unbroken_active_streams") == 0
    assert _value(registry, "unbroken_retries_total", route="r") == 2
    assert _value(registry, "unbroken_errors_total", route="r", kind="server_error") == 2
    assert (
        _value(registry, "unbroken_requests_total", route="r", model="m", outcome="complete") == 2
    )
    assert _value(registry, "unbroken_time_to_first_token_seconds_sum", route="r") == pytest.approx(
        0.9
    )
    assert _value(registry, "unbroken_cost_usd_total", route="r", model="m") == 0.5


def test_a_restricted_registry_shows_the_records() -> None:
    # A scrape asking for some metrics only (`?name[]=`) collects only their collectors.
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    hook.on_stream_start()
    hook.on_answer(answer_record())
    only = registry.restricted_registry(["unbroken_tokens_total"])
    samples = {(s.name, s.labels.get("type")): s.value for m in only.collect() for s in m.samples}
    assert samples[("unbroken_tokens_total", "prompt")] == 10
    assert samples[("unbroken_tokens_total", "completion")] == 4


def test_records_from_several_threads_all_count() -> None:
    # A sync client's answers may end on several threads at once.
    registry = CollectorRegistry()
    hook = PrometheusHook(registry)
    per_thread = 3000

    def record() -> None:
        for _ in range(per_thread):
            hook.on_stream_start()
            hook.on_attempt(_attempt("first", "complete"))
            hook.on_answer(answer_record())

    threads = [threading.Thread(target=record) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: lost updates would show
    try:
        for thread in threads:
            thread.start()
        for _ in range(50):  # collections meanwhile, as scrapes would come
            registry.get_sample_value("unbroken_active_streams")
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    total = 4 * per_thread
    assert _value(registry, "unbroken_active_streams") == 0
    assert (
        _value(registry, "unbroken_requests_total", route="r", model="m", outcome="complete")
        == total
    )
    assert (
        _value(registry, "unbroken_attempts_total", route="r", kind="first", outcome="complete")
        == total
    )
    assert _value(registry, "unbroken_tokens_total", route="r", model="m", type="prompt") == (
        10 * total
    )


class _Partial:
    """A hook written before some events existed: it has `on_answer` only."""

    def __init__(self) -> None:
        self.answers = 0

    def on_answer(self, record: AnswerRecord) -> None:
        self.answers += 1


def test_a_hook_without_a_method_is_skipped_for_that_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    partial = _Partial()
    registry = CollectorRegistry()
    hooks = Hooks([partial, PrometheusHook(registry)])  # type: ignore[list-item]  # partial
    hooks.stream_start()
    hooks.answer(answer_record())
    assert partial.answers == 1
    assert _value(registry, "unbroken_active_streams") == 0
    assert "failed in on_stream_start" in caplog.text
