"""The fault injector's grammar and bookkeeping; pure (time and chance come from the caller).

`parse_faults` reads the `X-Mock-Fault` grammar (documented in docs/mock.md) into `Fault`s,
`FaultPlan` merges the faults of one request into what the server must do, and `FaultBook`
decides which faults apply to a request: header faults by their `times` / `for_ms` budget
per fault key, server-wide rules by script window or by one seeded draw. Imports only the
standard library.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "KINDS",
    "Fault",
    "FaultBook",
    "FaultPlan",
    "FaultSpecError",
    "parse_faults",
]


class FaultSpecError(ValueError):
    """A fault spec does not follow the grammar; the message names the offending part."""


Category = Literal["refuse", "before", "event", "shape", "wire", "none"]

# kind -> (category, parameters it accepts besides the common `times` and `for_ms`).
KINDS: dict[str, tuple[Category, frozenset[str]]] = {
    "none": ("none", frozenset()),
    # Refusals: an HTTP error instead of an answer (protocol.md §1.9, TV29, TV30).
    "400": ("refuse", frozenset()),
    "401": ("refuse", frozenset()),
    "402": ("refuse", frozenset()),
    "422": ("refuse", frozenset()),
    "429": ("refuse", frozenset({"retry_after"})),
    "500": ("refuse", frozenset({"retry_after"})),
    "502": ("refuse", frozenset({"retry_after", "body"})),
    "503": ("refuse", frozenset({"retry_after", "body"})),
    "504": ("refuse", frozenset({"retry_after", "body"})),
    "context_length": ("refuse", frozenset()),
    "content_filter": ("refuse", frozenset()),
    # Before the headers.
    "reset_before_headers": ("before", frozenset()),
    "slow_headers": ("before", frozenset({"ms"})),
    "hang": ("before", frozenset()),
    # At a position in the stream: after the first N `data:` chunks (the role chunk is 1).
    "reset": ("event", frozenset({"after", "after_bytes"})),
    "close": ("event", frozenset({"after", "after_bytes"})),
    "stall": ("event", frozenset({"after", "ms", "keepalive"})),
    "malformed": ("event", frozenset({"after"})),
    "error": ("event", frozenset({"after"})),
    "insufficient": ("event", frozenset({"after"})),
    "done_early": ("event", frozenset({"after"})),
    # The shape of the whole answer.
    "no_done": ("shape", frozenset()),
    "json_body": ("shape", frozenset({"sse"})),
    "json_blank": ("shape", frozenset()),
    # How the bytes are written.
    "keepalive_storm": ("wire", frozenset({"n"})),
    "split_utf8": ("wire", frozenset({"gap_ms"})),
    "one_byte": ("wire", frozenset({"gap_ms"})),
    "crlf": ("wire", frozenset()),
    "cr": ("wire", frozenset()),
    "nospace": ("wire", frozenset()),
    "bom": ("wire", frozenset()),
}

_COMMON = frozenset({"times", "for_ms"})
_TERMINAL_EVENTS = frozenset({"reset", "close", "error", "insufficient", "done_early"})
# The position of an event fault when `after` is not given: the role chunk and one token.
DEFAULT_AFTER = 2
# Keep-alive comments per chunk of `keepalive_storm` when `n` is not given.
DEFAULT_STORM = 50
# `slow_headers` delay when `ms` is not given.
DEFAULT_SLOW_HEADERS_MS = 1000.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One parsed fault. Fields a kind does not use keep their defaults.

    Attributes:
        kind: the fault kind (a key of `KINDS`).
        after: event faults: after how many `data:` chunks (the role chunk is chunk 1).
        after_bytes: `reset` / `close`: cut after this many body bytes instead.
        ms: `stall` duration (None = forever) or `slow_headers` delay.
        keepalive: `stall`: send keep-alives while stalled.
        retry_after: refusals: the `Retry-After` header value, if any.
        body: 502/503/504: `html` (nginx page) or `json`.
        n: `keepalive_storm`: comments before each chunk.
        gap_ms: `split_utf8` / `one_byte`: pause between writes.
        sse: `json_body`: send it as `text/event-stream` with `data: [DONE]` appended.
        times: apply only to the first K requests with the same fault key.
        for_ms: apply only while the fault key was first seen less than T ms ago.
    """

    kind: str
    after: int = DEFAULT_AFTER
    after_bytes: int | None = None
    ms: float | None = None
    keepalive: bool = False
    retry_after: str | None = None
    body: str | None = None
    n: int = DEFAULT_STORM
    gap_ms: float = 0.0
    sse: bool = False
    times: int | None = None
    for_ms: float | None = None

    @property
    def category(self) -> Category:
        """What part of the exchange the fault changes."""
        return KINDS[self.kind][0]


def _int(kind: str, name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise FaultSpecError(
            f"fault {kind!r}: {name} must be an integer in [{low}, {high}], got {value[:40]!r}"
        )
    return number


def _ms(kind: str, name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 3_600_000.0:
        raise FaultSpecError(
            f"fault {kind!r}: {name} must be a number of milliseconds in [0, 3600000], "
            f"got {value[:40]!r}"
        )
    return number


def _flag(kind: str, name: str, value: str) -> bool:
    if value not in ("0", "1", "true", "false"):
        raise FaultSpecError(f"fault {kind!r}: {name} must be 0 or 1, got {value[:40]!r}")
    return value in ("1", "true")


def _parse_one(part: str) -> Fault:
    words = part.split()
    kind = words[0].lower()
    if kind not in KINDS:
        raise FaultSpecError(
            f"unknown fault kind {kind[:40]!r}; known kinds: {', '.join(sorted(KINDS))}"
        )
    allowed = KINDS[kind][1] | _COMMON
    values: dict[str, object] = {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        name = name.lower()
        if not sep or not value:
            raise FaultSpecError(f"fault {kind!r}: expected name=value, got {word[:40]!r}")
        if name not in allowed:
            raise FaultSpecError(
                f"fault {kind!r}: unknown parameter {name[:40]!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        if name in values:
            raise FaultSpecError(f"fault {kind!r}: parameter {name!r} given twice")
        if name == "after":
            values[name] = _int(kind, name, value, 0, 10_000_000)
        elif name == "after_bytes":
            values[name] = _int(kind, name, value, 0, 1 << 40)
        elif name == "n":
            values[name] = _int(kind, name, value, 1, 10_000)
        elif name == "times":
            values[name] = _int(kind, name, value, 0, 1 << 31)
        elif name in ("ms", "gap_ms", "for_ms"):
            values[name] = _ms(kind, name, value)
        elif name in ("keepalive", "sse"):
            values[name] = _flag(kind, name, value)
        elif name == "retry_after":
            _ms(kind, name, value)  # a number of seconds; the same bounds are fine
            values[name] = value
        else:  # body
            if value not in ("html", "json"):
                raise FaultSpecError(f"fault {kind!r}: body must be html or json, got {value!r}")
            values[name] = value
    if kind == "slow_headers" and "ms" not in values:
        values["ms"] = DEFAULT_SLOW_HEADERS_MS
    return Fault(kind, **values)  # type: ignore[arg-type]  # checked per name above


def parse_faults(spec: str) -> list[Fault]:
    """Parse a fault spec: faults separated by `;`, each `kind name=value ...`.

    Args:
        spec: e.g. `"503 times=2"` or `"crlf; stall after=3 ms=200 keepalive=1"`.

    Returns:
        The faults in the order given (`none` yields an empty list).

    Raises:
        FaultSpecError: an unknown kind or parameter, a bad value, or two faults that
            cannot be combined; the message names it.
    """
    if len(spec) > 2000:
        raise FaultSpecError(f"the fault spec is too long ({len(spec)} characters, max 2000)")
    faults: list[Fault] = []
    for part in spec.split(";"):
        if part.strip():
            fault = _parse_one(part.strip())
            if fault.kind != "none":
                faults.append(fault)
    FaultPlan.build(faults)  # raises on combinations that make no sense
    return faults


@dataclass(slots=True)
class FaultPlan:
    """What the server must do for one request, merged from the faults that apply.

    Attributes:
        kinds: the kinds applied, in order (for counters and logs).
        refuse: the refusal to answer with instead of an answer.
        reset_before_headers: reset the connection before any response byte.
        slow_headers_ms: delay before the response headers.
        hang: accept the request and never answer.
        events: positional faults, ordered by position.
        cut: a `reset` or `close` at a byte offset (`after_bytes`).
        no_done, json_body, json_body_sse, json_blank: answer-shape faults.
        storm: keep-alive comments before each chunk.
        split: write pattern (`utf8`: cut inside every multi-byte character, `byte`: 1 byte).
        gap_ms: pause between the writes of `split`.
        eol: line ending of the stream; data_prefix: `data: ` or `data:`; bom: lead with a BOM.
    """

    kinds: list[str] = field(default_factory=list)
    refuse: Fault | None = None
    reset_before_headers: bool = False
    slow_headers_ms: float = 0.0
    hang: bool = False
    events: list[Fault] = field(default_factory=list)
    cut: Fault | None = None
    no_done: bool = False
    json_body: bool = False
    json_body_sse: bool = False
    json_blank: bool = False
    storm: int = 0
    split: Literal["utf8", "byte"] | None = None
    gap_ms: float = 0.0
    eol: bytes = b"\n"
    data_prefix: bytes = b"data: "
    bom: bool = False

    @classmethod
    def build(cls, faults: Sequence[Fault]) -> FaultPlan:
        """Merge faults into one plan.

        Raises:
            FaultSpecError: two faults conflict (two refusals, two terminal events, two
                line-ending styles, two write patterns, or one kind twice).
        """
        plan = cls()
        seen: set[str] = set()
        terminal: Fault | None = None
        for fault in faults:
            kind = fault.kind
            if kind in seen and kind != "stall" and kind != "malformed":
                raise FaultSpecError(f"fault {kind!r} is given twice")
            seen.add(kind)
            plan.kinds.append(kind)
            category = fault.category
            if category == "refuse":
                if plan.refuse is not None:
                    raise FaultSpecError(
                        f"faults {plan.refuse.kind!r} and {kind!r} conflict: one refusal only"
                    )
                plan.refuse = fault
            elif kind == "reset_before_headers":
                plan.reset_before_headers = True
            elif kind == "slow_headers":
                plan.slow_headers_ms = fault.ms or 0.0
            elif kind == "hang":
                plan.hang = True
            elif category == "event":
                if kind in _TERMINAL_EVENTS:
                    if terminal is not None:
                        raise FaultSpecError(
                            f"faults {terminal.kind!r} and {kind!r} conflict: "
                            "one fault may end the stream"
                        )
                    terminal = fault
                if fault.after_bytes is not None:
                    plan.cut = fault
                else:
                    plan.events.append(fault)
            elif kind == "no_done":
                plan.no_done = True
            elif kind == "json_body":
                plan.json_body = True
                plan.json_body_sse = fault.sse
            elif kind == "json_blank":
                plan.json_blank = True
            elif kind == "keepalive_storm":
                plan.storm = fault.n
            elif kind in ("split_utf8", "one_byte"):
                if plan.split is not None:
                    raise FaultSpecError("faults split_utf8 and one_byte conflict")
                plan.split = "utf8" if kind == "split_utf8" else "byte"
                plan.gap_ms = fault.gap_ms
            elif kind in ("crlf", "cr"):
                if plan.eol != b"\n":
                    raise FaultSpecError("faults crlf and cr conflict")
                plan.eol = b"\r\n" if kind == "crlf" else b"\r"
            elif kind == "nospace":
                plan.data_prefix = b"data:"
            else:  # bom
                plan.bom = True
        plan.events.sort(key=lambda f: f.after)
        return plan


class _KeyState:
    __slots__ = ("count", "first_seen")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.first_seen = now


class FaultBook:
    """Decides which faults apply to each request and remembers what it needs for that.

    Theory of operation: a header fault with `times=K` applies to the first K requests that
    share its fault key, and one with `for_ms=T` while less than T ms passed since the key
    was first seen; so a client that retries or resumes with the same headers eventually
    heals. Server-wide rules: scripted rules first (their windows count chat requests and
    seconds since start or `reset`), then one draw of the seeded generator picks at most one
    plain rule (probabilities stack into buckets of [0, 1)). The book holds at most
    `max_keys` fault keys (least recently used dropped first).

    Args:
        rules: the server-wide rules as (fault spec, probability, first_requests, first_s).
        seed: the seed of the draws.
        now: the current monotonic time, in seconds.
    """

    def __init__(
        self,
        rules: Sequence[tuple[str, float, int | None, float | None]],
        seed: int,
        now: float,
        *,
        max_keys: int = 100_000,
    ) -> None:
        self._rules = [
            (parse_faults(spec), probability, first_requests, first_s)
            for spec, probability, first_requests, first_s in rules
        ]
        self._seed = seed
        self._max_keys = max_keys
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self.reset(now)

    def reset(self, now: float) -> None:
        """Forget every key, restart the script windows and reseed the draws."""
        self._keys.clear()
        self._started = now
        self._n_requests = 0
        self._rng = random.Random(self._seed)  # noqa: S311 - reproducible faults, not secrets

    def for_header(self, faults: Sequence[Fault], key: str, now: float) -> list[Fault]:
        """The faults of a request's `X-Mock-Fault` header that apply to this attempt."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(now)
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        state.count += 1
        elapsed_ms = (now - state.first_seen) * 1000.0
        return [
            fault
            for fault in faults
            if (fault.times is None or state.count <= fault.times)
            and (fault.for_ms is None or elapsed_ms < fault.for_ms)
        ]

    def server_wide(self, now: float, key: str) -> list[Fault]:
        """The server-wide faults for the next chat request (scripted, then one draw);
        `key` identifies the logical request (the rule's index is added to it)."""
        if not self._rules:
            return []
        self._n_requests += 1
        for index, (faults, _, first_requests, first_s) in enumerate(self._rules):
            if first_requests is None and first_s is None:
                continue
            if first_requests is not None and self._n_requests > first_requests:
                continue
            if first_s is not None and now - self._started >= first_s:
                continue
            return self.for_header(faults, f"{key}|rule{index}", now)
        draw = self._rng.random()
        edge = 0.0
        for index, (faults, probability, first_requests, first_s) in enumerate(self._rules):
            if first_requests is not None or first_s is not None:
                continue
            edge += probability
            if draw < edge:
                return self.for_header(faults, f"{key}|rule{index}", now)
        return []
