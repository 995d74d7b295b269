"""The mock DeepSeek as a raw ASGI app: routing, auth, the chat endpoint and `/_mock/*`.

Raw ASGI (no framework) so a chunk costs two byte concatenations and a write, nothing more.
Imports the standard library and mock siblings; never uvicorn (see `mock.server`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Mapping
from urllib.parse import unquote

from unbroken.mock.admin import config_view, query_int, reconfigure
from unbroken.mock.apierrors import (
    ApiError,
    auth_error,
    context_length_error,
    error_body,
    insufficient_balance_error,
    invalid,
    refusal,
)
from unbroken.mock.config import Latency, MockConfig
from unbroken.mock.exchange import Closed, Exchange, Receive, Scope, Send
from unbroken.mock.faults import FaultBook, FaultPlan, FaultSpecError, parse_faults
from unbroken.mock.fim import (
    FIM_PATHS,
    MODEL_ITEM_PREFIXES,
    TextChunkRenderer,
    fim_chat_body,
    model_object,
    text_completion_body,
)
from unbroken.mock.pacer import Pacer
from unbroken.mock.render import answer_message, encode_json
from unbroken.mock.request import ChatRequest, parse_chat_request
from unbroken.mock.respond import Job, send_json_answer, send_stream
from unbroken.mock.stats import LogEntry, MockStats
from unbroken.mock.text import (
    Answer,
    PrefixMismatch,
    apply_stop,
    canonical_messages,
    generate_answer,
    limit_answer,
    split_answer,
)
from unbroken.mock.tokens import PromptCache, message_tokens, tools_tokens

__all__ = ["MockApp", "create_app"]

logger = logging.getLogger(__name__)

_CHAT_PATHS = frozenset({"/chat/completions", "/v1/chat/completions", "/beta/chat/completions"})
_MODEL_PATHS = frozenset({"/models", "/v1/models", "/beta/models"})
_BALANCE_PATHS = frozenset({"/user/balance", "/v1/user/balance"})
_JSON = b"application/json"
_LATENCY_HEADERS = {
    b"x-mock-ttft-ms": "ttft_ms",
    b"x-mock-token-ms": "token_ms",
    b"x-mock-queue-ms": "queue_ms",
    b"x-mock-keepalive-ms": "keepalive_ms",
}
# Largest X-Mock-Tokens: enough for any benchmark, small enough to stay in memory.
MAX_ANSWER_TOKENS = 10_000_000


def _rules(config: MockConfig) -> list[tuple[str, float, int | None, float | None]]:
    return [(r.fault, r.probability, r.first_requests, r.first_s) for r in config.faults]


class MockApp:
    """The mock DeepSeek ASGI application (see docs/mock.md for the API it serves).

    Args:
        config: the configuration; `/_mock/config` may replace parts of it at run time.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self.stats = MockStats(self.config.log_size)
        self.cache = PromptCache(self.config.cache_entries)
        self.faults = FaultBook(_rules(self.config), self.config.fault_seed, time.monotonic())
        self._live: set[Exchange] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Sends the plain timed streams (mock.pacer); `is_idle` once none is left.
        self.pacer = Pacer()

    # -- lifecycle --------------------------------------------------------------------------

    def shutdown_threadsafe(self) -> None:
        """End every open exchange (hanging and stalled ones included); callable from any
        thread. Used before stopping the server so that shutdown never waits on a client."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._shutdown)
        except RuntimeError:  # the loop closed in between
            return

    def _shutdown(self) -> None:
        for ex in list(self._live):
            ex.shutdown()

    def reset(self) -> None:
        """Zero the counters and log, forget fault keys and the context cache."""
        self.stats.reset()
        self.cache.clear()
        self.faults.reset(time.monotonic())

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        ex = Exchange(scope, receive, send)
        method = scope["method"]
        path = scope["path"]
        # The /_mock/ endpoints are the test's own instruments: not counted, not logged.
        is_admin = path.startswith("/_mock/")
        entry = LogEntry(0, 0.0, method, path) if is_admin else self.stats.begin(method, path)
        started = ex.loop.time()
        self._live.add(ex)
        try:
            await self._route(ex, scope, receive, method, path, entry)
        except Closed as closed:
            entry.outcome = closed.outcome
        except ApiError as error:
            entry.outcome = error.kind
            if not ex.has_started:
                await ex.respond(error.status, error.body, error.content_type, error.headers)
        except Exception:  # a bug must not kill the process nor leave the client hanging
            logger.exception("mock: unexpected error on %s %s", method, path)
            entry.outcome = "bug"
            if not ex.has_started:
                body = error_body("Internal server error (mock bug)", "server_error", None)
                await ex.respond(500, body, _JSON)
        finally:
            self._live.discard(ex)
            if ex.is_closing:
                await ex.wait_lost(1.0)
            await ex.aclose()
            entry.status = ex.status
            if not is_admin:
                self.stats.bytes_sent += ex.n_bytes
                self.stats.finish(entry, started, ex.loop.time())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(
        self,
        ex: Exchange,
        scope: Scope,
        receive: Receive,
        method: str,
        path: str,
        entry: LogEntry,
    ) -> None:
        if path.startswith("/_mock/"):
            await self._admin(ex, receive, method, path, scope)
            return
        if path.startswith("/beta/") and not self.config.beta:
            # What a FastAPI server without the path answers (vLLM, llama-cpp-python).
            raise ApiError(404, b'{"detail":"Not Found"}', kind="not_found")
        fim = path in FIM_PATHS
        model_item = path.startswith(MODEL_ITEM_PREFIXES)
        allowed = (
            "POST"
            if path in _CHAT_PATHS or fim
            else "GET"
            if path in _MODEL_PATHS or path in _BALANCE_PATHS or model_item
            else None
        )
        if allowed is None:
            raise ApiError(
                404,
                error_body(f"Not Found: {method} {path[:200]}", "invalid_request_error"),
                kind="not_found",
            )
        if method != allowed:
            raise ApiError(
                405,
                error_body(
                    f"Method Not Allowed: {method} {path}; use {allowed}", "invalid_request_error"
                ),
                headers=((b"allow", allowed.encode()),),
                kind="method_not_allowed",
            )
        headers = _headers(scope)
        self._authenticate(headers.get(b"authorization"))
        if path in _MODEL_PATHS:
            body = encode_json(
                {
                    "object": "list",
                    "data": [
                        {"id": "deepseek-chat", "object": "model", "owned_by": "deepseek"},
                        {"id": "deepseek-reasoner", "object": "model", "owned_by": "deepseek"},
                    ],
                }
            )
            await ex.respond(200, body, _JSON)
        elif path in _BALANCE_PATHS:
            await ex.respond(200, self._balance(), _JSON)
        elif model_item:
            await ex.respond(200, model_object(unquote(path.split("/models/", 1)[1])), _JSON)
        else:
            await self._chat(ex, receive, path, headers, entry, fim=fim)

    def _authenticate(self, header: bytes | None) -> None:
        scheme, _, key = (header or b"").decode("latin-1").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise auth_error("Authentication Fails (auth header format should be Bearer sk-...)")
        keys = self.config.api_keys
        if keys is not None and key not in keys:
            raise auth_error(f"Authentication Fails, Your api key: ****{key[-4:]} is invalid")

    def _balance(self) -> bytes:
        total = self.config.balance
        return encode_json(
            {
                "is_available": float(total) > 0,
                "balance_infos": [
                    {
                        "currency": "CNY",
                        "total_balance": total,
                        "granted_balance": "0.00",
                        "topped_up_balance": total,
                    }
                ],
            }
        )

    async def _read_body(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        limit = self.config.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Closed("cancelled")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413,
                    error_body(f"the request body exceeds {limit} bytes", "invalid_request_error"),
                    headers=((b"connection", b"close"),),
                    kind="too_large",
                )
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    # -- chat -------------------------------------------------------------------------------

    async def _chat(
        self,
        ex: Exchange,
        receive: Receive,
        path: str,
        headers: Mapping[bytes, bytes],
        entry: LogEntry,
        *,
        fim: bool = False,
    ) -> None:
        arrived = ex.loop.time()
        raw = await self._read_body(receive)
        if fim:  # served as chat, rendered as text_completion (mock.fim)
            raw = fim_chat_body(raw, self.config)
        request = parse_chat_request(raw, is_beta=path.startswith("/beta/"))
        entry.model = request.model
        entry.stream = request.stream
        latency, n_tokens = self._latency(headers)

        per_message = [message_tokens(m) for m in request.messages]
        base = tools_tokens(request.tools)
        prompt_tokens = base + sum(per_message)
        if request.max_tokens is not None and (
            prompt_tokens + request.max_tokens > self.config.context_tokens
        ):
            raise context_length_error(
                self.config.context_tokens, prompt_tokens, request.max_tokens
            )
        if prompt_tokens > self.config.context_tokens:
            raise context_length_error(self.config.context_tokens, prompt_tokens, 0)

        canonical = canonical_messages(request.messages)
        conversation = canonical[: len(request.conversation)]
        plan, key = self._plan(request, conversation, headers)
        entry.faults = plan.kinds
        entry.fault_key = key
        if plan.reset_before_headers:
            await ex.reset()
            raise Closed("reset_before_headers")
        if plan.hang:
            await ex.wait_closed()
            raise Closed("hang")
        if plan.slow_headers_ms:
            await ex.sleep(plan.slow_headers_ms / 1000.0)
        if plan.refuse is not None:
            fault = plan.refuse
            raise refusal(fault.kind, retry_after=fault.retry_after, body=fault.body)
        if float(self.config.balance) <= 0:
            raise insufficient_balance_error()

        cache_scope = f"{request.info.family}/{request.thinking}"
        chain = self.cache.chain(cache_scope, request.tools, canonical)
        hit = self.cache.hit_tokens(chain, per_message, base)
        self.cache.persist(chain[-1])
        full, answer, finish_reason = self._answer(request, n_tokens, plan, conversation)
        entry.prompt_tokens = prompt_tokens
        entry.completion_tokens = answer.n_tokens
        job = Job(
            completion_id=str(uuid.uuid4()),
            created=int(time.time()),
            model=request.model,
            thinking=request.thinking,
            include_usage=request.include_usage,
            answer=answer,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            cache_hit_tokens=hit,
            latency=latency,
            plan=plan,
            send_bytes=self.config.send_bytes,
            usage_chunk=self.config.usage_chunk,
            pacer=self.pacer if self.config.paced else None,
        )
        if fim:
            job.renderer = TextChunkRenderer
            job.body = text_completion_body
        ex.bom = plan.bom
        ex.split = plan.split
        ex.gap_s = plan.gap_ms / 1000.0
        if plan.cut is not None:
            ex.cut_bytes = plan.cut.after_bytes
            ex.cut_action = "reset" if plan.cut.kind == "reset" else "close"
        is_stream = request.stream and not plan.json_body
        stats = self.stats
        if is_stream:
            stats.streams_started += 1
            stats.streams_active += 1
        try:
            if is_stream:
                entry.outcome = await send_stream(ex, job, arrived, stats)
            else:
                entry.outcome = await send_json_answer(ex, job, arrived)
        except Closed as closed:
            if is_stream:
                if closed.outcome == "cancelled":
                    stats.streams_cancelled += 1
                else:
                    stats.streams_completed += 1
            raise
        finally:
            entry.chunks = job.n_chunks
            if is_stream:
                stats.streams_active -= 1
        if is_stream:
            stats.streams_completed += 1
        if job.completed and finish_reason in ("stop", "tool_calls") and entry.outcome == "ok":
            n_conversation = len(request.conversation)
            if n_conversation:
                answer_key = self.cache.extend(chain[n_conversation - 1], answer_message(full))
                self.cache.persist(answer_key)

    def _latency(self, headers: Mapping[bytes, bytes]) -> tuple[Latency, int | None]:
        latency = self.config.latency
        changes: dict[str, float] = {}
        for name, field in _LATENCY_HEADERS.items():
            raw = headers.get(name)
            if raw is None:
                continue
            try:
                changes[field] = float(raw)
            except ValueError:
                changes[field] = -1.0
            low = 1.0 if field == "keepalive_ms" else 0.0
            if not low <= changes[field] <= 3_600_000:
                raise invalid(
                    f"invalid {name.decode()} header: expected milliseconds in "
                    f"[{low:g}, 3600000], got {raw[:40].decode('latin-1')!r}"
                )
        if changes:
            latency = dataclasses.replace(latency, **changes)
        n_tokens = None
        raw = headers.get(b"x-mock-tokens")
        if raw is not None:
            try:
                n_tokens = int(raw)
            except ValueError:
                n_tokens = -1
            if not 0 <= n_tokens <= MAX_ANSWER_TOKENS:
                raise invalid(
                    f"invalid x-mock-tokens header: expected an integer in "
                    f"[0, {MAX_ANSWER_TOKENS}], got {raw[:40].decode('latin-1')!r}"
                )
        return latency, n_tokens

    def _plan(
        self, request: ChatRequest, conversation: list[str], headers: Mapping[bytes, bytes]
    ) -> tuple[FaultPlan, str | None]:
        spec_raw = headers.get(b"x-mock-fault")
        if spec_raw is None and not self.config.faults:
            return FaultPlan(), None
        spec = spec_raw.decode("latin-1") if spec_raw is not None else ""
        explicit = headers.get(b"x-mock-fault-key")
        if explicit is not None:
            key = explicit.decode("latin-1")[:200]
        else:
            h = hashlib.blake2b(request.model.encode(), digest_size=12)
            for line in conversation:
                h.update(b"\x00" + line.encode("utf-8", "surrogatepass"))
            h.update(b"\x01" + spec.encode("utf-8", "surrogatepass"))
            key = h.hexdigest()
        now = time.monotonic()
        if spec_raw is not None:
            try:
                faults = parse_faults(spec)
            except FaultSpecError as exc:
                raise invalid(f"invalid X-Mock-Fault header: {exc}") from None
            return FaultPlan.build(self.faults.for_header(faults, key, now)), key
        return FaultPlan.build(self.faults.server_wide(now, key)), key

    def _answer(
        self,
        request: ChatRequest,
        n_tokens: int | None,
        plan: FaultPlan,
        canonical: list[str],
    ) -> tuple[Answer, Answer, str]:
        config = self.config
        full = generate_answer(
            request.thinking,
            request.conversation,
            config.seed if request.seed is None else request.seed,
            n_tokens=n_tokens,
            answer_tokens=config.answer_tokens,
            reasoning_tokens=config.reasoning_tokens,
            tools=request.tools,
            tool_choice=request.tool_choice,
            json_mode=request.json_mode,
            canonical=canonical,
        )
        full, _ = apply_stop(full, request.stop)
        rest = full
        if request.prefix is not None:
            try:
                rest = split_answer(full, *request.prefix)
            except PrefixMismatch as exc:
                # A real server would continue whatever it was given; the mock refuses, so a
                # client that resumes with the wrong text fails loudly and is counted.
                self.stats.prefix_mismatches += 1
                raise ApiError(
                    400, error_body(str(exc), "invalid_request_error"), kind="prefix_mismatch"
                ) from None
        cap = request.max_tokens
        if cap is None and n_tokens is None:
            cap = request.default_max_tokens
        answer, truncated = limit_answer(rest, cap)
        if plan.json_blank:
            answer = Answer(
                answer.reasoning, tuple(" " * len(p) for p in answer.content), answer.tool_calls
            )
        finish_reason = "length" if truncated else "tool_calls" if answer.tool_calls else "stop"
        return full, answer, finish_reason

    # -- /_mock -----------------------------------------------------------------------------

    async def _admin(
        self, ex: Exchange, receive: Receive, method: str, path: str, scope: Scope
    ) -> None:
        if path == "/_mock/stats" and method == "GET":
            await ex.respond(200, encode_json(self.stats.snapshot()), _JSON)
        elif path == "/_mock/log" and method == "GET":
            limit = query_int(scope.get("query_string", b""), "limit", 100)
            await ex.respond(200, encode_json({"entries": self.stats.recent(limit)}), _JSON)
        elif path == "/_mock/reset" and method == "POST":
            await self._read_body(receive)
            self.reset()
            await ex.respond(200, b'{"ok":true}', _JSON)
        elif path == "/_mock/config" and method == "GET":
            await ex.respond(200, encode_json(config_view(self.config)), _JSON)
        elif path == "/_mock/config" and method == "POST":
            config, changed = reconfigure(self.config, await self._read_body(receive))
            self.config = config
            if changed & {"faults", "fault_seed"}:
                self.faults = FaultBook(_rules(config), config.fault_seed, time.monotonic())
            await ex.respond(200, encode_json(config_view(config)), _JSON)
        else:
            raise ApiError(
                404,
                error_body(f"Not Found: {method} {path[:200]}", "invalid_request_error"),
                kind="not_found",
            )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    wanted: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        if name == b"authorization" or name.startswith(b"x-mock-"):
            wanted[name] = value
    return wanted


def create_app(config: MockConfig | None = None) -> MockApp:
    """Build the mock DeepSeek ASGI app.

    Args:
        config: the configuration (defaults: seed 0, no delays, no faults, any key).

    Returns:
        The ASGI application; run it with `MockServer` or any ASGI server.
    """
    return MockApp(config)
