"""Configuration of the mock DeepSeek: `MockConfig`, `Latency` and `FaultRule` (frozen).

Imports the standard library, `unbroken.errors` and `unbroken.mock.faults` (to validate
fault specs early); never the server or the ASGI app.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unbroken.errors import ConfigError
from unbroken.mock.faults import FaultSpecError, parse_faults

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_PORT",
    "FaultRule",
    "Latency",
    "MockConfig",
]

# The port `unbroken mock` listens on when none is given: unassigned by IANA, easy to type,
# and clear of the usual 8000/8080 development servers.
DEFAULT_PORT = 8787

# The V3.2 profile of protocol.md §1.2: a 128K context for both models.
DEFAULT_CONTEXT_TOKENS = 131_072


@dataclass(frozen=True, slots=True)
class Latency:
    """The latency model; every value is in milliseconds and may be 0 (the default: as fast
    as the machine allows).

    Timeline of one request: `queue_ms` waiting for "scheduling" (the stream's headers are
    already sent; keep-alives every `keepalive_ms`), then `ttft_ms` to the first token, then
    one token every `token_ms`. Per request, the headers `X-Mock-Queue-Ms`, `X-Mock-TTFT-Ms`,
    `X-Mock-Token-Ms` and `X-Mock-Keepalive-Ms` override these.

    Attributes:
        ttft_ms: time to first token, after the queue time.
        token_ms: interval between two tokens.
        queue_ms: time "queued" before inference starts.
        keepalive_ms: interval of keep-alives while queued or stalled (the first one is sent
            at once).
    """

    ttft_ms: float = 0.0
    token_ms: float = 0.0
    queue_ms: float = 0.0
    keepalive_ms: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "token_ms", "queue_ms"):
            value = getattr(self, name)
            if not 0 <= value <= 3_600_000:
                raise ConfigError(f"Latency.{name} must be within [0, 3600000] ms, got {value}")
        if not 1 <= self.keepalive_ms <= 3_600_000:
            raise ConfigError(
                f"Latency.keepalive_ms must be within [1, 3600000] ms, got {self.keepalive_ms}"
            )


@dataclass(frozen=True, slots=True)
class FaultRule:
    """A server-wide fault: `fault` (the `X-Mock-Fault` grammar, see docs/mock.md) applied to
    chat requests that carry no `X-Mock-Fault` header.

    Plain rules share one seeded draw per request: the rules' probabilities stack into
    buckets of [0, 1) in list order (their sum must be <= 1), so a run is reproducible for a
    given request order. A *scripted* rule (`first_requests` or `first_s` set) applies to
    every chat request while its window lasts and is checked before the draw: "fail the first
    3 requests, then heal" or "fail for 2 s after start (or reset), then heal".

    Attributes:
        fault: the fault, e.g. `"503"` or `"reset after=5"`.
        probability: the chance per request, in [0, 1] (ignored by scripted rules).
        first_requests: scripted: only the first N chat requests since start or reset.
        first_s: scripted: only during the first T seconds since start or reset.
    """

    fault: str
    probability: float = 1.0
    first_requests: int | None = None
    first_s: float | None = None

    def __post_init__(self) -> None:
        try:
            parse_faults(self.fault)
        except FaultSpecError as exc:
            raise ConfigError(f"FaultRule.fault {self.fault[:60]!r}: {exc}") from None
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"FaultRule.probability must be in [0, 1], got {self.probability}")
        if self.first_requests is not None and self.first_requests < 0:
            raise ConfigError(f"FaultRule.first_requests must be >= 0, got {self.first_requests}")
        if self.first_s is not None and self.first_s < 0:
            raise ConfigError(f"FaultRule.first_s must be >= 0, got {self.first_s}")

    @property
    def is_scripted(self) -> bool:
        """True for a rule bounded by a request count or a time window."""
        return self.first_requests is not None or self.first_s is not None


@dataclass(frozen=True, slots=True)
class MockConfig:
    """Everything the mock DeepSeek can be told at start; every field has a default.

    Attributes:
        seed: the seed of the deterministic answers (a request's `seed` field overrides it).
        latency: the default latency model.
        answer_tokens: inclusive range of an answer's length in tokens (the length of each
            answer is drawn from it deterministically).
        reasoning_tokens: inclusive range of a thinking-mode answer's reasoning length.
        faults: server-wide faults.
        fault_seed: the seed of the server-wide fault draws.
        api_keys: the accepted keys; None accepts any `Bearer` key.
        balance: the `total_balance` that `/user/balance` reports (a decimal string, CNY).
        context_tokens: the context window; prompt + max_tokens above it is a 400.
        max_body_bytes: the largest request body accepted (413 above).
        send_bytes: the most bytes coalesced into one write when several chunks are due.
        log_size: how many recent requests `/_mock/log` keeps.
        cache_entries: how many persisted prompt prefixes the context cache keeps.
        beta: serve DeepSeek's `/beta` paths; False answers them 404 `{"detail": "Not
            Found"}`, as vLLM and llama.cpp servers do (for proving continuation that adapts).
        usage_chunk: with `include_usage`, send the usage in one more chunk with
            `"choices": []`, as OpenAI and vLLM do (off: DeepSeek's documented shape,
            usage on the finish chunk, protocol.md §1.5).
        paced: send plain timed streams (no fault, a token interval) from one shared timer
            per event loop, straight to the connection (the same bytes at the same times);
            off, every stream wakes its own task per event and writes through the ASGI
            `send`. Needs `MockServer` / `serve` (under another server streams go the
            second way anyway).
    """

    seed: int = 0
    latency: Latency = field(default_factory=Latency)
    answer_tokens: tuple[int, int] = (24, 96)
    reasoning_tokens: tuple[int, int] = (32, 128)
    faults: tuple[FaultRule, ...] = ()
    fault_seed: int = 0
    api_keys: frozenset[str] | None = None
    balance: str = "110.00"
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    max_body_bytes: int = 8 * 1024 * 1024
    send_bytes: int = 64 * 1024
    log_size: int = 1000
    cache_entries: int = 100_000
    beta: bool = True
    usage_chunk: bool = False
    paced: bool = True

    def __post_init__(self) -> None:
        for name in ("answer_tokens", "reasoning_tokens"):
            low, high = getattr(self, name)
            if not 0 <= low <= high <= 1_000_000:
                raise ConfigError(
                    f"MockConfig.{name} must be (low, high) with 0 <= low <= high <= 1000000, "
                    f"got {(low, high)}"
                )
        total = sum(r.probability for r in self.faults if not r.is_scripted)
        if total > 1.0 + 1e-9:
            raise ConfigError(
                f"the probabilities of the non-scripted MockConfig.faults add up to {total:g}; "
                "they share one draw per request, so their sum must be <= 1"
            )
        try:
            float(self.balance)
        except ValueError:
            raise ConfigError(
                f"MockConfig.balance must be a decimal string, got {self.balance!r}"
            ) from None
        if self.context_tokens < 1024:
            raise ConfigError(
                f"MockConfig.context_tokens must be >= 1024, got {self.context_tokens}"
            )
        if self.max_body_bytes < 1024:
            raise ConfigError(
                f"MockConfig.max_body_bytes must be >= 1024, got {self.max_body_bytes}"
            )
        if not 512 <= self.send_bytes <= 16 * 1024 * 1024:
            raise ConfigError(
                f"MockConfig.send_bytes must be in [512, 16 MiB], got {self.send_bytes}"
            )
        if self.log_size < 0 or self.cache_entries < 0:
            raise ConfigError("MockConfig.log_size and cache_entries must be >= 0")
