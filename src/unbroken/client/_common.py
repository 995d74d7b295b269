"""What Client and AsyncClient share: configuration, request building, route resolution,
client-side rate limits, and AnswerRun - the bookkeeping around one answer's flow.

No I/O here either: the sync and async drivers do the HTTP and the sleeping.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import httpx
import msgspec

from unbroken.client._options import (
    apply_timeout,
    check_options,
    option_headers,
    policy_for,
    timeouts_for,
)
from unbroken.client._params import ChatParams
from unbroken.core.accumulator import ChunkAccumulator
from unbroken.core.attempt import Attempt, Timeouts
from unbroken.core.backoff import RetryBudget, RetryPolicy
from unbroken.core.breaker import BreakerState, CircuitBreaker
from unbroken.core.events import (
    ControlEvent,
    FellBackEvent,
    RestartedEvent,
    ResumedEvent,
    RetryingEvent,
)
from unbroken.core.flow import (
    AnswerFlow,
    AttemptOutcome,
    AttemptPlan,
    Connect,
    EndChoice,
    FlowOptions,
    Sleep,
)
from unbroken.core.pricing import Cost, PriceTable
from unbroken.core.ratelimit import BucketState, TokenBucket
from unbroken.core.routes import Route, RouteHealth
from unbroken.core.sse import DEFAULT_MAX_EVENT_BYTES
from unbroken.core.stream import EndState, StreamEnd
from unbroken.core.tokens import (
    add_usage,
    estimate_prompt_tokens,
    estimate_tokens,
    estimate_usage,
    max_tokens_of,
)
from unbroken.core.wire import (
    Answer,
    AnswerMeta,
    AttemptInfo,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    Usage,
)
from unbroken.errors import (
    ConfigError,
    InvalidRequestError,
    ProtocolError,
    RetriesExhausted,
    UnbrokenError,
    UpstreamError,
    UpstreamTimeout,
)
from unbroken.instrumentation import AnswerRecord, AttemptRecord, Hooks
from unbroken.settings import DEFAULT_BASE_URL, env_client

if TYPE_CHECKING:
    from unbroken.client.cache import AnswerCache

__all__ = ["AnswerRun", "ClientBase", "ClientConfig", "Endpoint", "RateLimit", "build_body"]

# What an answer asks for: a chat completion, or a FIM completion (DeepSeek /beta/completions).
Endpoint = Literal["chat", "fim"]

# Route lists whose flow maps a client keeps (`ClientConfig.route_maps`).
MAX_ROUTE_MAPS = 256
# Completion tokens reserved against a tokens-per-minute limit when the request sets no
# max_tokens; the real count replaces it when the usage arrives.
DEFAULT_COMPLETION_ESTIMATE = 1024


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Client-side limits, so a batch job stays under its quota instead of collecting 429s.

    Attributes:
        requests_per_minute: HTTP requests (attempts) per minute, or None.
        tokens_per_minute: prompt + completion tokens per minute (estimated before the
            request, corrected from the reported usage), or None.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


class _Limiter:
    """Bucket states behind a lock (the math is core.ratelimit)."""

    def __init__(self, limit: RateLimit | None) -> None:
        self._lock = threading.Lock()
        self._requests = None
        self._tokens = None
        self._rstate: BucketState | None = None
        self._tstate: BucketState | None = None
        if limit is not None and limit.requests_per_minute:
            self._requests = TokenBucket.per_minute(limit.requests_per_minute)
        if limit is not None and limit.tokens_per_minute:
            self._tokens = TokenBucket.per_minute(limit.tokens_per_minute)

    @property
    def active(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def take(self, now: float, tokens: int) -> float:
        """Take one request and `tokens` tokens; return how long to wait first (0: go).
        A wait is returned without taking anything; call again after it."""
        with self._lock:
            wait = 0.0
            r_new = t_new = None
            if self._requests is not None:
                state = self._rstate or self._requests.initial(now)
                r_new, w = self._requests.take(state, 1, now)
                wait = max(wait, w)
            if self._tokens is not None and tokens:
                state = self._tstate or self._tokens.initial(now)
                cost = min(tokens, self._tokens.capacity)  # a huge request still gets through
                t_new, w = self._tokens.take(state, cost, now)
                wait = max(wait, w)
            if wait == 0.0:
                self._rstate = r_new or self._rstate
                self._tstate = t_new or self._tstate
            return wait

    def correct(self, now: float, estimated: int, actual: int) -> None:
        """Replace an estimate with the reported token count."""
        if self._tokens is None or self._tstate is None or estimated == actual:
            return
        with self._lock:
            if actual < estimated:
                self._tstate = self._tokens.refund(self._tstate, estimated - actual, now)
            else:
                self._tstate = self._tokens.charge(self._tstate, actual - estimated, now)


@dataclass(slots=True)
class ClientConfig:
    """Everything a client needs besides its HTTP pool (built by the constructors)."""

    routes: list[Route]
    timeouts: Timeouts
    retry: RetryPolicy
    budget: RetryBudget
    prices: PriceTable
    hooks: Hooks
    limiter: _Limiter
    breaker_threshold: int
    breaker_cooldown_s: float
    hold_tool_calls: bool
    max_event_bytes: int
    rng: random.Random
    cache: AnswerCache | None = None
    health: dict[str, RouteHealth] = field(default_factory=dict)
    breaker_states: dict[str, BreakerState] = field(default_factory=dict)
    budgets: dict[tuple[str, str], RetryBudget] = field(default_factory=dict)

    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    urls: dict[tuple[str, str, str, bool], httpx.URL] = field(default_factory=dict)
    # Per route: the encoded header lines every request on it starts with (client/_driver.py
    # `Exchange.head`), by id(route).
    heads: dict[int, Any] = field(default_factory=dict)
    # Per list of routes and budget key: the flow's health and budget maps (`route_maps`).
    maps: dict[tuple[object, ...], Any] = field(default_factory=dict)
    # The routes `report_breakers` last looked at and `CircuitBreaker.changes` then.
    reported: tuple[object, int] | None = None

    @classmethod
    def build(
        cls,
        api_key: str | None,
        base_url: str | None,
        options: Mapping[str, Any],
        *,
        need_key: bool = True,
    ) -> ClientConfig:
        """The configuration for `options` (see `ClientOptions`).

        Args:
            api_key: the key, else `DEEPSEEK_API_KEY` (see `settings.env_client`).
            base_url: the upstream, else `DEEPSEEK_BASE_URL` / `OPENAI_BASE_URL`, else
                DeepSeek's.
            options: the other constructor options.
            need_key: fail at once when no key is found (not for the transports, which
                take the key from each request).

        Raises:
            ConfigError: an option is unknown, malformed or contradicts another, or no
                key was given or found in the environment.
        """
        check_options(options)
        routes = options.get("routes")
        if routes:
            if api_key is not None or base_url is not None:
                raise ConfigError("give either routes=[...] or api_key/base_url, not both")
            route_list = list(routes)
        else:
            env_key, env_base = (
                env_client() if api_key is None or base_url is None else (None, None)
            )
            key = api_key if api_key is not None else env_key
            if key is None and need_key:
                raise ConfigError(
                    "no API key: pass api_key=... or set DEEPSEEK_API_KEY "
                    "(OPENAI_API_KEY is used with an OPENAI_BASE_URL)"
                )
            route_list = [
                Route(
                    name="default",
                    base_url=base_url or env_base or DEFAULT_BASE_URL,
                    api_key=key,
                    dialect=options.get("dialect", "auto"),
                )
            ]
        names = [r.name for r in route_list]
        if len(set(names)) != len(names):
            raise ConfigError(f"route names must be unique, got {names}")
        from unbroken.client.cache import as_cache  # the cache imports stores, used rarely

        return cls(
            routes=route_list,
            timeouts=timeouts_for(options),
            retry=policy_for(options),
            budget=options.get("retry_budget") or RetryBudget(),
            prices=options.get("prices") or PriceTable(),
            hooks=Hooks(options.get("hooks", ())),
            limiter=_Limiter(options.get("rate_limit")),
            breaker_threshold=options.get("breaker_threshold", 5),
            breaker_cooldown_s=options.get("breaker_cooldown_s", 5.0),
            hold_tool_calls=options.get("hold_tool_calls", True),
            max_event_bytes=options.get("max_event_bytes", DEFAULT_MAX_EVENT_BYTES),
            rng=random.Random(options.get("seed")),  # noqa: S311 - backoff jitter, not crypto
            cache=as_cache(options.get("cache")),
            headers=option_headers(options),
            query=dict(options.get("default_query") or {}),
        )

    def url(self, route: Route, path: str, *, beta: bool) -> httpx.URL:
        """The URL of `path` on `route` with the default query (built once per route)."""
        # (Its parts, not their concatenation: a tuple of strings whose hashes are cached.)
        key = (route.base_url, route.beta_path, path, beta)
        url = self.urls.get(key)
        if url is None:
            url = httpx.URL(route.url(path, beta=beta))
            if self.query:
                url = url.copy_merge_params(self.query)
            self.urls[key] = url
        return url

    def route_health(self, route: Route) -> RouteHealth:
        """The (shared) health of a route, created on first use."""
        health = self.health.get(route.name)
        if health is None:
            health = RouteHealth(CircuitBreaker(self.breaker_threshold, self.breaker_cooldown_s))
            self.health[route.name] = health
        return health

    def route_budget(self, route: Route, key: str = "") -> RetryBudget:
        """The retry budget of `route` for the answers of `key` (a gateway caller; "" for
        everyone), created on first use with the settings of the configured budget."""
        budget = self.budgets.get((route.name, key))
        if budget is None:
            budget = self.budgets[(route.name, key)] = self.budget.clone()
        return budget

    def route_maps(
        self, routes: Sequence[Route], key: str = ""
    ) -> tuple[dict[str, RouteHealth], dict[str, RetryBudget]]:
        """The health and retry budget of each of `routes` by name (the budgets of `key`),
        as `answer_flow` reads them; the same two dicts for every answer on the same
        routes (the flow never changes the maps, only what they hold: two dicts less per
        live answer, ~2 us a request)."""
        ids = (key, *map(id, routes))
        known = self.maps.get(ids)
        if known is not None:  # the same routes: the entry keeps them, so no id is reused
            return known[1], known[2]
        health = {r.name: self.route_health(r) for r in routes}
        budgets = {r.name: self.route_budget(r, key) for r in routes}
        if len(self.maps) >= MAX_ROUTE_MAPS:  # per-request fallbacks may each be new
            self.maps.clear()
        self.maps[ids] = (tuple(routes), health, budgets)
        return health, budgets

    def resolve_routes(
        self, fallbacks: Sequence[str | Route] | None, routes: Sequence[Route] | None = None
    ) -> list[Route]:
        """The routes for one request: `routes` (default: the configured ones), then its
        own fallbacks.

        A fallback is a Route, the name of a configured route, or a model name (asked for
        on the first configured route).
        """
        given = self.routes if routes is None else routes
        if not fallbacks and type(given) is list:
            # Shared, not copied: a run only reads its routes (one list less per live answer).
            return given
        resolved = list(given)
        if not fallbacks:
            return resolved
        by_name = {r.name: r for r in self.routes}
        for item in fallbacks or ():
            if isinstance(item, Route):
                candidate = item
            elif item in by_name:
                candidate = by_name[item]
            elif item:
                candidate = self.routes[0].with_model(item)
            else:
                raise InvalidRequestError(f"fallbacks: {item!r} is neither a route nor a model")
            if all(r.name != candidate.name for r in resolved):
                resolved.append(candidate)
        return resolved

    def report_breakers(self, routes: Iterable[Route]) -> None:
        """Tell the hooks about breakers that changed state."""
        if not self.hooks.on:
            return
        # No breaker made nor changed since the same routes were looked at: nothing new
        # (most steps of most answers: no loop over the routes, ~35 bytecodes).
        changes = CircuitBreaker.changes
        reported = self.reported
        if reported is not None and reported[0] is routes and reported[1] == changes:
            return
        for route in routes:
            health = self.health.get(route.name)
            if health is None:
                continue
            state = health.breaker.state
            if self.breaker_states.get(route.name) is not state:
                self.breaker_states[route.name] = state
                self.hooks.breaker(route.name, state)
        self.reported = (routes, changes)


_RESERVED = frozenset({"fallbacks", "restart"})


def build_body(
    model: str,
    messages: Iterable[Any],
    *,
    stream: bool,
    params: Mapping[str, Any],
    extra_body: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON body of a chat request; None-valued parameters are left out.

    Raises:
        InvalidRequestError: the model or the messages are missing or malformed.
    """
    given: object = model  # checked at run time: callers are not always type-checked
    if not isinstance(given, str) or not given:
        raise InvalidRequestError("model must be a non-empty string, e.g. 'deepseek-chat'")
    msgs = []
    for i, message in enumerate(messages):
        item = message if isinstance(message, dict) else msgspec.to_builtins(message)
        if not isinstance(item, dict) or "role" not in item:
            raise InvalidRequestError(f"messages[{i}] must be an object with a 'role'")
        msgs.append(item)
    if not msgs:
        raise InvalidRequestError("messages must hold at least one message")
    body: dict[str, Any] = {"model": model, "messages": msgs}
    for key, value in params.items():
        if value is not None and key not in _RESERVED:
            body[key] = value
    return _streamed(body, extra_body)


def _streamed(body: dict[str, Any], extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """`body` with `extra_body` on top, streamed with usage, its `n` checked."""
    if extra_body:
        body.update(extra_body)
    # The upstream is always streamed, also for stream=False: a stream can be resumed and
    # its keep-alives show the request is alive. Usage on the last chunk is how billing is
    # known (DeepSeek sends it anyway; OpenAI-style servers need include_usage).
    body["stream"] = True
    if "stream_options" not in body:
        body["stream_options"] = _INCLUDE_USAGE
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequestError(f"n must be a positive integer, got {n!r}")
    return body


def checked_body(
    model: str, messages: list[dict[str, Any]], extra_body: Mapping[str, Any] | None
) -> dict[str, Any]:
    """`build_body` of a request whose parts were checked already (a gateway's parsed
    request: a model name, a list of message objects with a role) and no other
    parameters: the same body, without checking each message again.

    Raises:
        InvalidRequestError: no messages, or `n` is not a positive integer.
    """
    if not messages:
        raise InvalidRequestError("messages must hold at least one message")
    return _streamed({"model": model, "messages": list(messages)}, extra_body)


# An answer's retry/resume/fallback/restart counts before any (read-only, shared).
_NO_COUNTS: Mapping[str, int] = MappingProxyType(
    {"retry": 0, "resume": 0, "fallback": 0, "restart": 0}
)
# The empty lists of every AnswerRun's events and made-up chunks: never appended to
# (`_event`, `_end_choice` start a list of their own); given out empty by drain/take.
_NO_EVENTS: list[ControlEvent] = []
_NO_CHUNKS: list[ChatCompletionChunk] = []
# Likewise the attempts' infos until the first attempt ends, and the cost before any.
_NO_INFOS: list[AttemptInfo] = []
_NO_COST = Cost()  # frozen
# `stream_options` as the SDK sets it: shared by the bodies (nothing changes a body's
# values in place; continuations copy), one dict less per live answer.
_INCLUDE_USAGE = {"include_usage": True}
# The extra headers of an answer without any: shared, never changed (read only, as every
# run's `extra_headers`).
_NO_HEADERS: dict[str, str] = {}


class _PackedHeaders(bytes):
    """A run's extra headers as their JSON object while an attempt streams
    (`AnswerRun.pack_request`)."""

    __slots__ = ()


# The options of most answers, shared (one object less per live answer).
_PLAIN_FLOW = FlowOptions()


def _flow_options(restart: bool, n_choices: int, caller_prefix: str) -> FlowOptions:
    if not restart and n_choices == 1 and not caller_prefix:
        return _PLAIN_FLOW
    return FlowOptions(restart=restart, n_choices=n_choices, caller_prefix=caller_prefix)


def _merged_headers(
    client: dict[str, str], given: Mapping[str, str] | None, own: Mapping[str, str]
) -> dict[str, str]:
    """A run's extra headers: the client's, then the call's, then the request's own
    (`extra_headers=`; a dict of the run's own, made by ChatParams.pop): that dict itself
    when the others add nothing (one dict less per live answer, ~180 bytes)."""
    if client or given:
        return {**client, **(given or {}), **own}
    if not own:
        return _NO_HEADERS
    return own if type(own) is dict else dict(own)


def _texts(body: Mapping[str, Any]) -> list[str]:
    texts = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return texts


class _Books:
    """An answer's accounting (billing, attempts, counts, the chunks and events the run
    made up), apart from the run: a live answer has nothing accounted until its first
    attempt ends, and until then shares `_NO_BOOKS` (~110 bytes less per live answer than
    these as slots of the run; bench/sdk_request.py --memory)."""

    __slots__ = (
        "billed",
        "cache_status",
        "chunks",
        "cost",
        "counts",
        "estimated",
        "events",
        "first_token_at",
        "infos",
        "own_completion",
        "own_estimated",
        "own_prompt",
        "prompt_estimate",
        "recorded",
        "token_reserve",
    )

    def __init__(self) -> None:
        self.billed: Usage | None = None
        self.cost = _NO_COST
        # Some attempt's tokens were estimated.
        self.estimated = False
        self.infos: list[AttemptInfo] = _NO_INFOS
        # Shared until an attempt counts (one dict less per answer).
        self.counts: Mapping[str, int] = _NO_COUNTS
        self.first_token_at: float | None = None
        # Shared empty lists until something is added (`chat.stream`'s events, the chunks
        # the run makes up itself).
        self.events: list[ControlEvent] = _NO_EVENTS
        self.chunks: list[ChatCompletionChunk] = _NO_CHUNKS
        self.token_reserve = 0
        self.recorded = False
        self.prompt_estimate: int | None = None
        # The answer's own usage (see `AnswerRun._count_own`).
        self.own_prompt: int | None = None
        self.own_completion = 0
        self.own_estimated = False
        # `hit` or `stale` once the answer is replayed from the answer cache.
        self.cache_status: str | None = None


# The books of every answer with nothing accounted yet: never written to (`AnswerRun._write`
# makes an answer its own first).
_NO_BOOKS = _Books()


class AnswerRun(AnswerFlow):
    """Bookkeeping around one answer: drives the flow, makes attempts, sums billing, builds
    the control events and the final completion, and feeds the hooks.

    The drivers call `next_action(outcome)` until it returns None; for each Connect they
    make `new_attempt(plan, now)` and report `end_attempt(...)`.

    The answer's flow is this object itself (an `AnswerFlow` it steps with `send`): one
    object per live answer instead of two, sharing the answer, body, routes and deadline
    (~80 bytes less per live stream in a gateway).
    """

    # A gateway keeps one per live answer: no instance dict (~1.5 KB with these attributes).
    __slots__ = (
        "_attempt_plan",
        "_books",
        "_headers",
        "chunk_sink",
        "config",
        "endpoint",
        "query",
        "response",
        "started_at",
        "timeouts",
        "usage_chunk",
    )

    def __init__(
        self,
        config: ClientConfig,
        body: dict[str, Any],
        routes: list[Route],
        *,
        now: float,
        restart: bool = False,
        deadline_s: float | None = None,
        timeouts: Timeouts | None = None,
        endpoint: Endpoint = "chat",
        query: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        budget_key: str = "",
        usage_chunk: bool = False,
    ) -> None:
        self.config = config
        self.query = dict(query) if query else None
        self.endpoint: Endpoint = endpoint
        # Ours when given: `_new_run` builds it for the run (one dict less per live answer).
        self._headers: dict[str, str] | _PackedHeaders = (
            extra_headers
            if type(extra_headers) is dict
            else dict(extra_headers)
            if extra_headers
            else _NO_HEADERS
        )
        self.started_at = now
        policy = config.retry
        deadline = deadline_s or policy.deadline_s or config.timeouts.deadline_s
        if deadline != policy.deadline_s:
            policy = dataclasses.replace(policy, deadline_s=deadline)
        self.timeouts = timeouts or config.timeouts
        if deadline != self.timeouts.deadline_s:  # so a deadline timeout names its limit
            self.timeouts = dataclasses.replace(self.timeouts, deadline_s=deadline)
        health, budgets = config.route_maps(routes, budget_key)
        caller_prefix = ""
        messages = body.get("messages")
        if messages:
            last = messages[-1]
            if (
                isinstance(last, dict)
                and last.get("role") == "assistant"
                and (last.get("prefix") or body.get("continue_final_message"))
            ):
                caller_prefix = str(last.get("content") or "")
        n = body.get("n", 1)
        # Its deadline is `deadline_at`: now + `deadline`, the policy's.
        super().__init__(
            body,
            routes,
            health,
            ChunkAccumulator(),
            policy=policy,
            budgets=budgets,
            rng=config.rng,
            now=now,
            options=_PLAIN_FLOW
            if n == 1 and not restart and not caller_prefix
            else _flow_options(restart, int(n), caller_prefix),
        )
        # Its accounting: shared (nothing accounted) until `_write` makes it its own.
        self._books = _NO_BOOKS
        # The last attempt's HTTP response (`stream.response`, `with_raw_response`).
        self.response: httpx.Response | None = None
        # The caller asked for OpenAI's usage chunk (`stream_options.include_usage`).
        self.usage_chunk = usage_chunk
        # Takes content chunks as they are decoded, those of one read together
        # (`AsyncStream.set_chunk_sink`).
        self.chunk_sink: Callable[[list[ChatCompletionChunk]], bool] | None = None
        self._attempt_plan: AttemptPlan | None = None
        config.hooks.stream_start()

    @property
    def extra_headers(self) -> dict[str, str]:
        """The request's own headers (`extra_headers=` and the client's; not modified)."""
        headers = self._headers
        if type(headers) is _PackedHeaders:
            headers = self._headers = msgspec.json.decode(headers)
        return headers  # type: ignore[return-value]  # a dict once unpacked

    def pack_request(self, plan: AttemptPlan) -> None:
        """`plan`'s request is sent and its answer streams: its messages and this run's
        headers are held as their JSON until another attempt (or a reader) needs them
        (`AnswerFlow.pack_messages`; ~0.3 KB less per live stream in a gateway,
        bench/stream_memory.py). The messages are packed already when `Exchange.content`
        encoded the request."""
        if type(self._body.get("messages")) is list:  # (else packed already: no call)
            self.pack_messages(plan)
        headers = self._headers
        if headers and type(headers) is dict:
            self._headers = _PackedHeaders(msgspec.json.encode(headers))

    def _write(self) -> _Books:
        """The answer's books, to write to (its own from now on)."""
        books = self._books
        if books is _NO_BOOKS:
            books = self._books = _Books()
        return books

    @property
    def billed(self) -> Usage | None:
        """The usage billed so far: every attempt's, summed (None before any)."""
        return self._books.billed

    @property
    def first_token_at(self) -> float | None:
        """When the first token was shown (monotonic), once an attempt that had one ended."""
        return self._books.first_token_at

    @property
    def body(self) -> dict[str, Any]:
        """The request's body (stream on; not modified but for its `messages`, held as their
        JSON while an attempt streams and read back here: `pack_request`)."""
        return self.unpacked_body()

    @property
    def deadline_at(self) -> float | None:
        """The answer's deadline (monotonic), if any."""
        return self.deadline

    @property
    def final_plan(self) -> AttemptPlan | None:
        """The plan of the attempt that completed the answer (None until it is complete)."""
        return self.result

    @property
    def prompt_estimate(self) -> int:
        """The prompt's estimated tokens, worked out when first needed: an answer that
        reports its usage never needs it, and a long non-ASCII prompt costs ~0.1 us per
        character to estimate."""
        estimate = self._books.prompt_estimate
        if estimate is None:
            estimate = self._write().prompt_estimate = estimate_prompt_tokens(_texts(self.body))
        return estimate

    # -- flow ------------------------------------------------------------------------------

    def next_action(self, outcome: AttemptOutcome | None, now: float) -> Connect | Sleep | None:
        """The next action, or None when the answer is complete.

        Raises:
            UnbrokenError: the answer failed; `partial` holds what was shown.
        """
        try:
            action = self.send(outcome)
            if action is None:
                self.config.report_breakers(self.routes)
                self._record_answer(now, None)
                return None
        except UnbrokenError as exc:
            self.config.report_breakers(self.routes)
            if exc.partial is None and self.answer.has_output:
                exc.partial = self.completion(now)
            self._record_answer(now, exc)
            raise
        self.config.report_breakers(self.routes)
        if type(action) is Connect:  # (most actions: no isinstance chain)
            self._announce(action.plan)
            return action
        if isinstance(action, EndChoice):
            self._end_choice(action)
            return self.next_action(None, now)
        if isinstance(action, Sleep):
            infos = self._books.infos
            route = infos[-1].route if infos else ""
            self._event(
                RetryingEvent(
                    attempt=len(infos),
                    delay_s=action.seconds,
                    error=action.reason.message,
                    route=route,
                    reason=action.why,
                )
            )
            if self.config.hooks.on:
                self.config.hooks.wait(route, action.why, action.seconds)
        return action

    def _end_choice(self, action: EndChoice) -> None:
        chunk = ChatCompletionChunk(
            id=self.answer.id,
            created=self.answer.created,
            model=self.answer.model,
            choices=[
                ChunkChoice(index=action.index, delta=Delta(), finish_reason=action.finish_reason)
            ],
        )
        self.answer.feed(chunk)
        books = self._write()
        if books.chunks is _NO_CHUNKS:
            books.chunks = []
        books.chunks.append(chunk)

    def final_usage_chunk(self) -> ChatCompletionChunk:
        """OpenAI's last chunk of an `include_usage` stream: no choices, the billed usage."""
        return ChatCompletionChunk(
            id=self.answer.id,
            created=self.answer.created,
            model=self.answer.model,
            choices=[],
            usage=self._books.billed,
        )

    def take_chunks(self) -> list[ChatCompletionChunk]:
        """Chunks the run made up itself (a `length` finish without a request), to show."""
        books = self._books
        chunks = books.chunks
        if chunks is not _NO_CHUNKS:  # (then the books are the answer's own)
            books.chunks = _NO_CHUNKS
        return chunks

    def _count(self, kind: str) -> None:
        books = self._write()
        counts = books.counts
        if not isinstance(counts, dict):
            counts = books.counts = dict(counts)
        counts[kind] += 1

    def _announce(self, plan: AttemptPlan) -> None:
        if plan.kind == "first" and plan.continuation is None:
            return  # (an answer's first request: nothing to count or tell)
        error = plan.reason.message if plan.reason is not None else ""
        index = plan.choice_index or 0
        if plan.kind == "fallback":
            self._count("fallback")
            self._event(FellBackEvent(plan.number, plan.from_route or "", plan.route.name, error))
        elif plan.kind == "retry":
            self._count("retry")
        if plan.kind == "restart":
            self._count("restart")
            self.answer.discard(index)
            self._event(RestartedEvent(plan.number, index, plan.route.name, error))
        elif plan.continuation is not None:
            self._count("resume")
            self._event(
                ResumedEvent(
                    plan.number, plan.route.name, index, len(self.answer.content(index)), error
                )
            )

    def drain_events(self) -> list[ControlEvent]:
        """Control events since the last call (for `chat.stream`)."""
        books = self._books
        events = books.events
        if events is not _NO_EVENTS:  # (then the books are the answer's own)
            books.events = _NO_EVENTS
        return events

    def _event(self, event: ControlEvent) -> None:
        books = self._write()
        if books.events is _NO_EVENTS:
            books.events = []
        books.events.append(event)

    # -- attempts --------------------------------------------------------------------------

    def reserve_tokens(self) -> int:
        """Tokens to take from a tokens-per-minute limit before the first attempt."""
        if self._books.token_reserve:
            return 0
        max_tokens = self.body.get("max_tokens") or self.body.get("max_completion_tokens")
        completion = max_tokens if isinstance(max_tokens, int) else DEFAULT_COMPLETION_ESTIMATE
        reserve = self.prompt_estimate + completion
        self._write().token_reserve = reserve
        return reserve

    def new_attempt(self, plan: AttemptPlan, now: float) -> Attempt:
        """The Attempt object for a Connect plan."""
        self._attempt_plan = plan
        return Attempt(
            plan,
            self.answer,
            now=now,
            timeouts=self.timeouts,
            deadline_at=self.deadline,
            prior_usage=self._books.billed,
            hold_tool_calls=self.config.hold_tool_calls,
            max_event_bytes=self.config.max_event_bytes,
            text_completions=self.endpoint == "fim",
        )

    def end_attempt(
        self,
        attempt: Attempt,
        now: float,
        *,
        status_code: int | None,
        error: UnbrokenError | None,
    ) -> AttemptOutcome:
        """Account for a finished attempt and build its outcome for the flow."""
        plan = attempt.plan
        verdict = attempt.verdict
        books = self._write()
        if books.first_token_at is None and attempt.first_token_at is not None:
            books.first_token_at = attempt.first_token_at
        fold = attempt.folded()  # (read here only: no copy of the answer's fold)
        usage = fold.usage
        estimated = False
        if usage is None and status_code == 200:
            # Broken before its usage chunk: the tokens it produced were still billed.
            usage = estimate_usage(
                self.prompt_estimate,
                fold.content(),
                fold.reasoning(),
                max_tokens=max_tokens_of(plan.body),
            )
            estimated = True
        model = str(plan.body.get("model", ""))
        if usage is not None:
            books.billed = add_usage(books.billed, usage)
            cost = self.config.prices.cost(model, usage)
            # (The first attempt's cost is the answer's: no sum with zero made.)
            books.cost = cost if books.cost is _NO_COST else books.cost + cost
            books.estimated = books.estimated or estimated
        self._count_own(books, fold, plan, verdict)
        outcome_name = (
            verdict.state._value_  # (a stream that ended by itself: no call)
            if error is None and verdict is not None
            else _outcome_name(verdict.state if verdict else None, error)
        )
        if books.infos is _NO_INFOS:
            books.infos = []
        books.infos.append(
            AttemptInfo(
                route=plan.route.name,
                model=model,
                kind=plan.kind,
                outcome=outcome_name,
                status_code=status_code,
                usage=usage,
                usage_estimated=estimated,
            )
        )
        if self.config.hooks.on:
            self.config.hooks.attempt(
                AttemptRecord(
                    route=plan.route.name,
                    model=model,
                    kind=plan.kind,
                    status_code=status_code,
                    outcome=outcome_name,
                    duration_s=now - attempt.started_at,
                    n_chunks=fold.n_chunks,
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    usage_estimated=estimated,
                )
            )
        return AttemptOutcome(end=verdict, error=error, now=now)

    # -- result ----------------------------------------------------------------------------

    def completion(self, now: float) -> Answer:
        """The answer so far (or whole), with billed usage and the `unbroken` meta."""
        folded = self.answer.completion()
        books = self._books
        last = books.infos[-1] if books.infos else None
        return Answer(
            id=folded.id,
            object=folded.object,
            created=folded.created,
            model=folded.model or (last.model if last is not None else ""),
            system_fingerprint=folded.system_fingerprint,
            choices=folded.choices,
            usage=books.billed,
            unbroken=self._meta(now, last),
        )

    @staticmethod
    def _count_own(
        books: _Books, fold: ChunkAccumulator, plan: AttemptPlan, verdict: StreamEnd | None
    ) -> None:
        # The answer's own tokens: the original prompt once, plus what each attempt added
        # to the text shown (reported for a complete attempt, estimated for a broken one).
        if plan.kind == "restart":
            books.own_completion = 0
        usage = fold.usage
        if plan.continuation is None and usage is not None and books.own_prompt is None:
            books.own_prompt = usage.prompt_tokens
        complete = verdict is not None and verdict.state is EndState.COMPLETE
        if complete and usage is not None:
            books.own_completion += usage.completion_tokens
        elif fold.has_output:
            estimate = estimate_tokens(fold.content()) + estimate_tokens(fold.reasoning())
            cap = max_tokens_of(plan.body)
            books.own_completion += estimate if cap is None else min(estimate, cap)
            books.own_estimated = True

    def _answer_usage(self) -> Usage:
        books = self._books
        prompt = books.own_prompt if books.own_prompt is not None else self.prompt_estimate
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=books.own_completion,
            total_tokens=prompt + books.own_completion,
        )

    def _meta(self, now: float, last: AttemptInfo | None) -> AnswerMeta:
        answer_usage = self._answer_usage()  # (first: it may write the prompt's estimate)
        books = self._books
        counts = books.counts
        return AnswerMeta(
            route=last.route if last else "",
            model=last.model if last else "",
            attempts=list(books.infos),
            retries=counts["retry"],
            resumes=counts["resume"],
            fallbacks=counts["fallback"],
            restarts=counts["restart"],
            cost_usd=books.cost.input_usd + books.cost.output_usd,  # (`total_usd`)
            cost_known=books.cost.known,
            usage_estimated=books.estimated,
            answer_usage=answer_usage,
            answer_usage_estimated=books.own_estimated or books.own_prompt is None,
            ttft_s=None if books.first_token_at is None else books.first_token_at - self.started_at,
            duration_s=now - self.started_at,
            cache=books.cache_status,
        )

    def from_cache(self, status: str, now: float) -> None:
        """The answer is replayed from the answer cache (`hit` or `stale`): nothing more is
        billed for it, and it is recorded once, as `cache_hit` or `cache_stale`."""
        books = self._write()
        books.cache_status = status
        if books.billed is None:
            books.billed = Usage()
        # No HTTP response carries a cached answer: this one stands for it, marked as the
        # gateway marks its replays (`stream.response`, `with_raw_response`).
        self.response = httpx.Response(200, headers={"x-unbroken-cache": status})
        self._record_answer(now, None, outcome=f"cache_{status}")

    def close(self, now: float) -> None:
        """The consumer stopped the answer (closed the stream, cancelled its task): record
        it as cancelled, once, so the active-streams gauge and the limits stay right."""
        if not self._books.recorded:
            self._record_answer(now, None, outcome="cancelled")

    def _record_answer(
        self, now: float, error: UnbrokenError | None, outcome: str | None = None
    ) -> None:
        if self._books.recorded:
            return
        books = self._write()
        books.recorded = True
        limiter = self.config.limiter
        if books.token_reserve and books.billed is not None:
            limiter.correct(now, books.token_reserve, books.billed.total_tokens)
        if not self.config.hooks.on:
            return
        infos = books.infos
        last = infos[-1] if infos else None
        plan = self._attempt_plan
        route = last.route if last else plan.route.name if plan else ""
        model = last.model if last else str(plan.body.get("model", "")) if plan else ""
        billed = books.billed or Usage()
        kind = outcome or "complete"
        if error is not None:
            kind = _error_outcome(error)
        self.config.hooks.answer(
            AnswerRecord(
                route=route,
                model=model,
                outcome=kind,
                attempts=len(infos),
                resumes=books.counts["resume"],
                fallbacks=books.counts["fallback"],
                ttft_s=None
                if books.first_token_at is None
                else books.first_token_at - self.started_at,
                duration_s=now - self.started_at,
                prompt_tokens=billed.prompt_tokens,
                completion_tokens=billed.completion_tokens,
                cost_usd=books.cost.input_usd + books.cost.output_usd,  # (`total_usd`)
            )
        )


def _error_outcome(error: UnbrokenError) -> str:
    # A fixed set of label values (error kinds, timeout phases): never a class name, so a
    # dashboard or an alert can count on them.
    if isinstance(error, UpstreamTimeout):
        return f"timeout_{error.phase}"
    if isinstance(error, UpstreamError):
        return error.kind if error.status_code or error.kind != "unknown" else "connect_error"
    if isinstance(error, ProtocolError):
        return "protocol_error"
    cause = error.__cause__
    if isinstance(error, RetriesExhausted) and isinstance(cause, UnbrokenError):
        return _error_outcome(cause)
    return "error"


def _outcome_name(state: EndState | None, error: UnbrokenError | None) -> str:
    if isinstance(error, UpstreamTimeout):
        return f"timeout_{error.phase}"
    if isinstance(error, UpstreamError):
        if error.status_code or error.kind == "unreachable":  # unreachable: permanent
            return error.kind
        return "connect_error"
    if error is not None:
        return "protocol_error"
    # `_value_`: the member's value without the `value` property's call (~0.3 us).
    return state._value_ if state is not None else "unknown"


class ClientBase:
    """What Client, AsyncClient and the transports share besides their HTTP pool and
    driver: the options (given once, see `ClientOptions`), the configuration, and
    starting an answer's run."""

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None,
        options: Mapping[str, Any],
        *,
        need_key: bool = True,
    ) -> None:
        self._options = dict(options)
        self._config = ClientConfig.build(api_key, base_url, options, need_key=need_key)
        # What this client closes of its cache: all of one made from a spec, the wrapper
        # (not the backend) of a backend object, nothing of an AnswerCache passed in (nor
        # a copy's, which shares the object).
        given = options.get("cache")
        self._cache_close: Literal["all", "wrapper", "none"] = "none"
        if self._config.cache is not None and self._config.cache is not given:
            self._cache_close = "all" if isinstance(given, str) else "wrapper"
        if self._config.cache is not None:
            self._options["cache"] = self._config.cache
        self._given = (api_key, base_url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(routes={[r.name for r in self._config.routes]})"

    @property
    def routes(self) -> list[Route]:
        """The configured routes."""
        return list(self._config.routes)

    @property
    def api_key(self) -> str | None:
        """The key of the first route (as openai's `client.api_key`)."""
        return self._config.routes[0].api_key

    @property
    def base_url(self) -> httpx.URL:
        """The base URL of the first route, with a trailing slash (as openai's)."""
        base = self._config.routes[0].base_url
        return httpx.URL(base if base.endswith("/") else base + "/")

    @property
    def max_retries(self) -> int:
        """Retries allowed per answer (openai's name; `attempts - 1` of the policy)."""
        return self._config.retry.attempts - 1

    @property
    def timeout(self) -> Timeouts:
        """The stream timers (openai's attribute name; our `Timeouts`)."""
        return self._config.timeouts

    def _copy_options(
        self, changes: Mapping[str, Any]
    ) -> tuple[str | None, str | None, dict[str, Any]]:
        """The arguments of a copy with `changes` (for `with_options`)."""
        api_key, base_url = self._given
        options = dict(self._options)
        if "api_key" in changes or "base_url" in changes:
            api_key = changes.get("api_key", api_key)
            base_url = changes.get("base_url", base_url)
            options.pop("routes", None)
        if api_key is None and base_url is None and not options.get("routes"):
            route = self._config.routes[0]
            api_key, base_url = route.api_key, route.base_url
        if changes.get("timeout") is not None:
            options.pop("timeouts", None)
        if changes.get("max_retries") is not None:
            options.pop("retry", None)
        options.update({k: v for k, v in changes.items() if k not in ("api_key", "base_url")})
        if "base_url" in changes and changes["base_url"] is not None:
            base_url = str(changes["base_url"])
        return api_key, base_url, options

    def _checked_run(
        self,
        model: str,
        messages: list[dict[str, Any]],
        extra_body: Mapping[str, Any] | None,
        extra_headers: Mapping[str, str] | None,
        fallbacks: Sequence[str | Route] | None,
        routes: Sequence[Route] | None,
        budget_key: str,
    ) -> AnswerRun:
        """`_new_run` of a streamed request with these options only, checked by the caller
        (`AsyncClient.stream_checked`): the same run, without `ChatParams.pop`'s checks."""
        config = self._config
        return AnswerRun(
            config,
            checked_body(model, messages, extra_body),
            config.resolve_routes(fallbacks, routes),
            now=time.monotonic(),
            timeouts=config.timeouts,
            extra_headers=_merged_headers(
                config.headers, None, dict(extra_headers) if extra_headers else _NO_HEADERS
            ),
            budget_key=budget_key,
        )

    def _new_run(
        self,
        model: str,
        messages: Iterable[Any],
        params: dict[str, Any],
        *,
        stream: bool,
        routes: list[Route] | None = None,
        endpoint: Endpoint = "chat",
        extra_headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        tighten_only: bool = False,
    ) -> AnswerRun:
        options = ChatParams.pop(params)
        stream_options = params.get("stream_options")
        usage_chunk = (
            stream_options is not None
            and isinstance(stream_options, Mapping)
            and stream_options.get("include_usage") is True
        )
        body = build_body(
            model, messages, stream=stream, params=params, extra_body=options.extra_body
        )
        given = options.timeout if options.timeout is not None else timeout
        timeouts = (
            self._config.timeouts
            if given is None
            else apply_timeout(self._config.timeouts, given, tighten_only=tighten_only)
        )
        return AnswerRun(
            self._config,
            body,
            routes or self._config.resolve_routes(options.fallbacks, options.routes),
            now=time.monotonic(),
            restart=options.restart,
            deadline_s=options.deadline,
            timeouts=timeouts,
            endpoint=endpoint,
            query=options.extra_query,
            usage_chunk=usage_chunk and stream,
            extra_headers=_merged_headers(
                self._config.headers, extra_headers, options.extra_headers
            ),
            budget_key=options.budget_key,
        )
