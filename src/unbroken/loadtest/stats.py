"""What one benchmark request measured, and the figures of a whole run. Pure: records in,
percentiles, throughput, error counts and answer integrity out (no clock, no I/O).

Definitions (the ones guidellm, AIPerf and vLLM's bench use):
  * TTFT: request start to the first byte of answer text (content or reasoning);
  * ITL: the gaps between consecutive answer-text chunks of one stream;
  * TPOT: (end-to-end - TTFT) / (completion tokens - 1), per request;
  * end-to-end: request start to the last byte;
  * cut-to-next-byte: from a cut (the upstream's or the client's connection) to the next
    byte of answer text the client receives.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Integrity",
    "Percentiles",
    "RequestRecord",
    "Summary",
    "compare_answer",
    "percentile",
    "summarize",
    "throughput_series",
]

IntegrityKind = Literal["whole", "duplicated", "missing", "mangled"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's
    default), or None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50 / p90 / p99 (and the count and mean) of one measure, in seconds."""

    n: int
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        """The percentiles of `values`."""
        mean = sum(values) / len(values) if values else None
        return cls(
            len(values),
            percentile(values, 50),
            percentile(values, 90),
            percentile(values, 99),
            mean,
        )

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready, in seconds."""
        return {"n": self.n, "p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean}


@dataclass(frozen=True, slots=True)
class Integrity:
    """How an answer compares with the fault-free reference, in UTF-8 bytes.

    Attributes:
        kind: `whole` (identical), `duplicated` (only extra bytes), `missing` (only bytes
            lacking) or `mangled` (both).
        extra_bytes: bytes that are not in the reference (a repeat after a cut).
        missing_bytes: reference bytes that never arrived (a gap after a cut).
    """

    kind: IntegrityKind
    extra_bytes: int = 0
    missing_bytes: int = 0


def compare_answer(got: str, reference: str) -> Integrity:
    """Compare an answer with the fault-free one.

    A cut and its recovery change one stretch of the answer: a resume that repeats text
    inserts bytes, one that skips text deletes bytes. So the common prefix and the common
    suffix are matched (without overlapping), and what is left between them on each side is
    the extra and the missing part. Linear time, unlike a full diff.
    """
    a, b = got.encode(), reference.encode()
    if a == b:
        return Integrity("whole")
    limit = min(len(a), len(b))
    prefix = 0
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    extra = len(a) - prefix - suffix
    missing = len(b) - prefix - suffix
    kind: IntegrityKind = "mangled" if extra and missing else "duplicated" if extra else "missing"
    return Integrity(kind, extra, missing)


@dataclass(slots=True)
class RequestRecord:
    """One request of a run, as the runner measured it (seconds, from the run's start).

    Attributes:
        n: the request's number (0-based, in start order).
        mode: `stream`, `blocking` or `longpoll`.
        start_s: when it started, from the run's start.
        status: the HTTP status (0 when none arrived).
        error: None on success, else a short kind (`http_429`, `reset`, `timeout`,
            `truncated`, `stream_error`, `cancelled`, `unsupported`, ...).
        ttft_s: start to the first answer text; None when none arrived.
        e2e_s: start to the end of the answer (or the failure).
        gaps_s: the inter-token gaps of the stream.
        prompt_tokens, completion_tokens: from the answer's usage, when it had one.
        n_chunks: answer-text chunks received.
        n_bytes: response body bytes received (SSE framing included).
        attempts: upstream attempts, from the gateway's trailer comment (None without it).
        resumes: resumes the gateway reported (None without the trailer).
        fault: the fault asked of the endpoint (`X-Mock-Fault`) or of the proxy, if any.
        cut_gap_s: cut-to-next-byte latency, when a cut was seen and the answer went on.
        integrity: the comparison with the fault-free answer, when one was made.
        text: the answer text (kept for the comparison; never written to reports).
    """

    n: int
    mode: str
    start_s: float
    status: int = 0
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    n_chunks: int = 0
    n_bytes: int = 0
    attempts: int | None = None
    resumes: int | None = None
    fault: str | None = None
    cut_gap_s: float | None = None
    integrity: Integrity | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        """Whether the request ended with a whole answer (no error)."""
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, or None with fewer than two tokens."""
        if self.ttft_s is None or self.e2e_s is None or not self.completion_tokens:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def end_s(self) -> float | None:
        """When it ended, from the run's start."""
        return None if self.e2e_s is None else self.start_s + self.e2e_s


@dataclass(frozen=True, slots=True)
class Summary:
    """The figures of a run (or of one mode in a side-by-side run)."""

    n_requests: int
    n_ok: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    tokens_per_s: float
    prompt_tokens: int
    completion_tokens: int
    tokens_received: int
    bytes_received: int
    upstream_attempts: int
    ttft: Percentiles
    tpot: Percentiles
    itl: Percentiles
    e2e: Percentiles
    cut_gap: Percentiles
    integrity: dict[str, int]
    extra_bytes: int
    missing_bytes: int

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (seconds, counts)."""
        return {
            "requests": self.n_requests,
            "ok": self.n_ok,
            "errors": dict(sorted(self.errors.items())),
            "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s,
            "tokens_per_s": self.tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_received": self.tokens_received,
            "bytes_received": self.bytes_received,
            "upstream_attempts": self.upstream_attempts,
            "ttft_s": self.ttft.as_dict(),
            "tpot_s": self.tpot.as_dict(),
            "itl_s": self.itl.as_dict(),
            "e2e_s": self.e2e.as_dict(),
            "recovery": {
                "cut_to_next_byte_s": self.cut_gap.as_dict(),
                "answers": dict(sorted(self.integrity.items())),
                "extra_bytes": self.extra_bytes,
                "missing_bytes": self.missing_bytes,
            },
        }


def summarize(records: Iterable[RequestRecord], duration_s: float) -> Summary:
    """The figures of `records` over a run that lasted `duration_s` seconds.

    Requests per second count successful requests; tokens per second count every completion
    token received (a failed stream's tokens were still generated and sent).
    """
    rows = list(records)
    ok = [r for r in rows if r.ok]
    errors = Counter(r.error for r in rows if r.error is not None)
    completion = sum(r.completion_tokens or 0 for r in rows)
    # Behind a gateway the trailer tells the upstream attempts; elsewhere (or when no trailer
    # arrived) a request that got an answer status was one attempt.
    attempts = [r.attempts if r.attempts is not None else int(r.status != 0) for r in rows]
    integrity = Counter(str(r.integrity.kind) for r in rows if r.integrity is not None)
    span = duration_s if duration_s > 0 else math.inf
    return Summary(
        n_requests=len(rows),
        n_ok=len(ok),
        errors={str(k): v for k, v in errors.items()},
        duration_s=duration_s,
        requests_per_s=len(ok) / span,
        tokens_per_s=completion / span,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in rows),
        completion_tokens=completion,
        tokens_received=sum(r.n_chunks for r in rows),
        bytes_received=sum(r.n_bytes for r in rows),
        upstream_attempts=sum(attempts),
        ttft=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=Percentiles.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl=Percentiles.of([g for r in ok for g in r.gaps_s]),
        e2e=Percentiles.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        cut_gap=Percentiles.of([r.cut_gap_s for r in rows if r.cut_gap_s is not None]),
        integrity=dict(integrity),
        extra_bytes=sum(r.integrity.extra_bytes for r in rows if r.integrity is not None),
        missing_bytes=sum(r.integrity.missing_bytes for r in rows if r.integrity is not None),
    )


def throughput_series(
    records: Iterable[RequestRecord], bucket_s: float, duration_s: float
) -> list[tuple[float, float, float, float]]:
    """(bucket start, started requests/s, completed requests/s, completion tokens/s) per
    bucket of `bucket_s` seconds: starts count where they started (the offered load),
    completions and tokens where the request ended."""
    if bucket_s <= 0:
        raise ValueError(f"bucket must be > 0 s, got {bucket_s}")
    n = max(1, math.ceil(duration_s / bucket_s))
    started = [0.0] * n
    done = [0.0] * n
    tokens = [0.0] * n
    for r in records:
        started[min(n - 1, max(0, int(r.start_s // bucket_s)))] += 1
        end = r.end_s
        if end is None:
            continue
        i = min(n - 1, max(0, int(end // bucket_s)))
        if r.ok:
            done[i] += 1
        tokens[i] += r.completion_tokens or 0
    return [
        (i * bucket_s, started[i] / bucket_s, done[i] / bucket_s, tokens[i] / bucket_s)
        for i in range(n)
    ]
