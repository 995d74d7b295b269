"""PrometheusHook: what each record adds to the registry, also for label sets seen before
(the hook keeps each label set's series after the first record)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from unbroken.instrumentation import AnswerRecord, AttemptRecord, PrometheusHook


def _answer(
    outcome: str = "complete", ttft_s: float | None = 0.2, model: str = "m"
) -> AnswerRecord:
    return AnswerRecord(
        route="r",
        model=model,
        outcome=outcome,
        attempts=1,
        resumes=0,
        fallbacks=0,
        ttft_s=ttft_s,
        duration_s=1.5,
        prompt_tokens=10,
        completion_tokens=4,
        cost_usd=0.25,
    )


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
    hook.on_answer(_answer())
    hook.on_answer(_answer())
    hook.on_answer(_answer(outcome="timeout_idle", model="n"))
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
    hook.on_answer(_answer(outcome="connect_error", ttft_s=None))
    assert _value(registry, "unbroken_time_to_first_token_seconds_count", route="r") is None
    hook.on_stream_start()
    hook.on_answer(_answer(outcome="connect_error", ttft_s=0.5))
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
