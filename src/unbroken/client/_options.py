"""The constructor options of Client, AsyncClient, HTTPTransport and AsyncHTTPTransport,
written once, and how openai's `timeout` / `max_retries` map onto our timers and policy.

Imports core, errors, settings and httpx; no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

from unbroken.core.attempt import Timeouts
from unbroken.core.backoff import RetryBudget, RetryPolicy
from unbroken.core.pricing import PriceTable
from unbroken.core.routes import DialectSetting, Route
from unbroken.errors import ConfigError

if TYPE_CHECKING:
    from unbroken.client._common import RateLimit
    from unbroken.client.cache import AnswerCache
    from unbroken.instrumentation import Hook
    from unbroken.stores.cache import AnswerStore

__all__ = ["ClientOptions", "apply_timeout", "check_options", "policy_for"]

# The pool size when the client builds its own (sync and async alike).
DEFAULT_MAX_CONNECTIONS = 1000


class ClientOptions(TypedDict, total=False):
    """Everything `Client`, `AsyncClient` and the transports take besides `api_key`,
    `base_url` and the HTTP pool. openai's names first, then unbroken's.

    Keys:
        organization: sent as `OpenAI-Organization`.
        project: sent as `OpenAI-Project`.
        timeout: openai's meaning: a float (or `httpx.Timeout`) limits each wait - for the
            connection, the response headers, the first token and every gap between data
            events - not the whole answer (that is `deadline`).
        max_retries: openai's knob: at most this many extra attempts per answer
            (continuations of a broken answer count too); None keeps `retry`.
        default_headers: headers sent with every request.
        default_query: query parameters added to every URL.
        deadline: seconds allowed for a whole answer across every attempt, or None.
        dialect: how the upstream continues a broken answer: `auto` (the default:
            DeepSeek's prefix completion, learning vLLM's or the instruction way per route
            when a server rejects it), `deepseek`, `vllm`, `instruction`, `none`.
        routes: several upstreams in order of preference (instead of api_key/base_url).
        timeouts: our timers one by one (connect, headers, first token, idle, deadline).
        retry: attempts, backoff and deadline.
        retry_budget: bounds retries to a share of requests; each route gets its own
            budget with these settings, shared by all calls. A spent budget paces retries
            (they wait), it does not fail them.
        rate_limit: optional client-side requests/tokens per minute.
        prices: price table for costs.
        hooks: instrumentation hooks (e.g. `PrometheusHook()`).
        breaker_threshold: consecutive failures that take a route out (default 5).
        breaker_cooldown_s: how long before a taken-out route is probed again (5 s).
        hold_tool_calls: hold tool-call fragments until the call is complete (default on:
            a broken tool call is then never shown).
        http2: use HTTP/2 (needs the `h2` package).
        max_connections: connection pool size (default 1000).
        max_event_bytes: the largest SSE event accepted.
        seed: seed of the backoff jitter (tests).
        cache: an answer cache (`unbroken.AnswerCache`, a backend of
            `unbroken.stores.cache`, or a spec: `memory`, `sqlite:///path/cache.db`,
            `redis://...`): stop answers are stored; hits are served (serve mode) or stand
            in when every attempt failed (degrade mode, the default). Client and
            AsyncClient only.
    """

    organization: str | None
    project: str | None
    timeout: float | httpx.Timeout | None
    max_retries: int | None
    default_headers: Mapping[str, str] | None
    default_query: Mapping[str, Any] | None
    deadline: float | None
    dialect: DialectSetting
    routes: Sequence[Route] | None
    timeouts: Timeouts | None
    retry: RetryPolicy | None
    retry_budget: RetryBudget | None
    rate_limit: RateLimit | None
    prices: PriceTable | None
    hooks: Sequence[Hook]
    breaker_threshold: int
    breaker_cooldown_s: float
    hold_tool_calls: bool
    http2: bool
    max_connections: int
    max_event_bytes: int
    seed: int | None
    cache: AnswerCache | AnswerStore | str | None


def check_options(options: Mapping[str, Any]) -> None:
    """Reject unknown option names at once (a typo must not be silently ignored).

    Raises:
        ConfigError: an option is unknown, or two options say the same thing.
    """
    unknown = sorted(set(options) - set(ClientOptions.__annotations__))
    if unknown:
        raise ConfigError(
            f"unknown client option {unknown[0]!r}; the options are "
            + ", ".join(sorted(ClientOptions.__annotations__))
        )
    if options.get("timeout") is not None and options.get("timeouts") is not None:
        raise ConfigError("give either timeout= (openai's meaning) or timeouts=, not both")
    if options.get("max_retries") is not None and options.get("retry") is not None:
        raise ConfigError("give either max_retries= or retry=RetryPolicy(...), not both")


def apply_timeout(
    base: Timeouts, timeout: float | httpx.Timeout | None, *, tighten_only: bool = False
) -> Timeouts:
    """Our timers under openai's `timeout`: its connect limit becomes `connect_s`, and its
    read limit (each wait for bytes) bounds the wait for headers, the first token and each
    gap between data events. The whole-answer deadline is untouched.

    Args:
        base: the timers to start from.
        timeout: seconds, an `httpx.Timeout`, or None (no change).
        tighten_only: only lower a timer (the transports get the SDK's default 600 s on
            every request and must not loosen our tighter defaults with it).

    Raises:
        ConfigError: the timeout is not a positive number or an httpx.Timeout.
    """
    if timeout is None:
        return base
    given: object = timeout  # checked at run time: callers are not always type-checked
    if isinstance(given, httpx.Timeout):
        connect, read = given.connect, given.read
    elif isinstance(given, int | float) and not isinstance(given, bool) and given > 0:
        connect = read = float(given)
    else:
        raise ConfigError(
            f"timeout must be a positive number of seconds or an httpx.Timeout, got {timeout!r}"
        )

    def pick(ours: float | None, theirs: float | None) -> float | None:
        if not tighten_only:
            return theirs
        if theirs is None:
            return ours
        return theirs if ours is None else min(ours, theirs)

    return dataclasses.replace(
        base,
        connect_s=pick(base.connect_s, connect),
        headers_s=pick(base.headers_s, read),
        first_token_s=pick(base.first_token_s, read),
        idle_s=pick(base.idle_s, read),
    )


def policy_for(options: Mapping[str, Any]) -> RetryPolicy:
    """The retry policy from `retry`, or from openai's `max_retries`, or the default."""
    retry: RetryPolicy | None = options.get("retry")
    if retry is not None:
        return retry
    max_retries = options.get("max_retries")
    if max_retries is None:
        return RetryPolicy()
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    return RetryPolicy(attempts=max_retries + 1, max_resumes=min(max_retries, 5))


def timeouts_for(options: Mapping[str, Any]) -> Timeouts:
    """The timers from `timeouts`, openai's `timeout` and `deadline`."""
    timeouts: Timeouts = options.get("timeouts") or Timeouts()
    timeouts = apply_timeout(timeouts, options.get("timeout"))
    deadline = options.get("deadline")
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0:
            raise ConfigError(f"deadline must be a positive number of seconds, got {deadline!r}")
        timeouts = dataclasses.replace(timeouts, deadline_s=float(deadline))
    return timeouts


def option_headers(options: Mapping[str, Any]) -> dict[str, str]:
    """The headers every request carries: default_headers, organization, project."""
    headers = dict(options.get("default_headers") or {})
    if options.get("organization"):
        headers["OpenAI-Organization"] = str(options["organization"])
    if options.get("project"):
        headers["OpenAI-Project"] = str(options["project"])
    return headers
