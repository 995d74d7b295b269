"""Proof that a healing test healed something: the fault named in `X-Mock-Fault` fired as
often as its spec says (read from the mock's own log, not from the client), and no resume
sent a prefix that is not the start of the answer (the mock's `prefix_mismatches`)."""

from __future__ import annotations

import time
from typing import Any

from unbroken.mock import MockServer

__all__ = ["assert_fault_fired", "expected_requests", "logged", "spec_kinds"]


def _parts(spec: str) -> list[tuple[str, int | None]]:
    """(kind, times) of each fault of a spec; `none` names none."""
    parts = []
    for part in spec.split(";"):
        words = part.split()
        if not words or words[0] == "none":
            continue
        times = next((int(w[len("times=") :]) for w in words if w.startswith("times=")), None)
        parts.append((words[0], times))
    return parts


def spec_kinds(spec: str) -> list[str]:
    """The fault kinds a spec names (`none` names none)."""
    return [kind for kind, _ in _parts(spec)]


def expected_requests(spec: str) -> int:
    """Requests one answer takes under `spec`: each of the `times=K` faulted ones, then the
    one that succeeds; a fault without `times` applies to the one request that succeeds."""
    return 1 + max((t for _, t in _parts(spec) if t is not None), default=0)


def logged(mock: MockServer, key: str, n: int, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The mock's log entries under fault key `key`, once there are `n` of them (or the
    timeout passed). The mock logs a request when it ends on its side, which may be just
    after the client saw the end of it."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = [e for e in mock.log(1000) if e["fault_key"] == key]
        if len(entries) >= n or time.monotonic() > deadline:
            return entries
        time.sleep(0.02)


def assert_fault_fired(
    mock: MockServer, key: str, spec: str, mismatches_before: int, *, timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """Check in the mock's log that the requests made under fault key `key` number
    `expected_requests(spec)`, that each fault was applied to the first `times` of them (to
    all without `times`), that the last one succeeded, and that `prefix_mismatches` did not
    move.
    """
    want = expected_requests(spec)
    parts = _parts(spec)
    entries = logged(mock, key, want, timeout_s=timeout_s)
    assert len(entries) == want, (spec, [e["faults"] for e in entries])
    for i, entry in enumerate(entries):
        applied = sorted(kind for kind, times in parts if times is None or i < times)
        assert sorted(entry["faults"]) == applied, (spec, i, entry)
    assert entries[-1]["outcome"] == "ok", (spec, entries[-1])
    assert mock.stats()["prefix_mismatches"] == mismatches_before, spec
    return entries
