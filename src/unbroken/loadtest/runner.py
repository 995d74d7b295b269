"""The I/O shell of `unbroken bench`: sends the requests of a load shape to an
OpenAI-compatible endpoint and measures each one into a `RequestRecord`.

Theory of operation
-------------------
One asyncio task per request. Closed loop: `concurrency` workers, each starting its next
request when the last one ended. Open loop: a scheduler starts a request at each planned
time; with a concurrency cap a start waits for a free slot, and its clock still starts at
the planned time, so a slow endpoint shows in the latencies instead of hiding in a lower
offered rate (no coordinated omission).

Faults: a request drawn for a mock fault carries `X-Mock-Fault` and a unique
`X-Mock-Fault-Key` (so `times=1` heals on the gateway's retry). A request drawn for a proxy
cut goes through the `FaultProxy` on a fresh connection; when the endpoint named the answer
(`X-Unbroken-Stream-Id`) the runner reconnects to `GET {url}/streams/{id}` with
`Last-Event-ID` and reads the rest. Faulted answers are compared with a fault-free
reference fetched after the run (`X-Mock-Fault: none`, the same messages and seed).

`stop()` (Ctrl+C) ends the run early: no new request starts, the ones in flight are
cancelled and recorded as `cancelled` with what they had received.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import msgspec

from unbroken.core.events import Comment, SSEEvent
from unbroken.core.sse import SSEDecoder
from unbroken.errors import ConfigError
from unbroken.loadtest.answer import AnswerRead, apply_usage
from unbroken.loadtest.faults import FaultMix
from unbroken.loadtest.procstat import cpu_seconds
from unbroken.loadtest.proxy import FaultProxy
from unbroken.loadtest.schedule import (
    LoadShape,
    TokenDistribution,
    arrival_times,
    generated_prompt,
)
from unbroken.loadtest.stats import RequestRecord, compare_answer

__all__ = ["MODES", "BenchConfig", "BenchRun", "Mode"]

Mode = Literal["stream", "blocking", "longpoll"]
MODES: tuple[Mode, ...] = ("blocking", "stream", "longpoll")

# Long-poll: how long one poll may wait on the server (the endpoint's `wait` parameter).
LONGPOLL_WAIT_S = 5.0
STREAM_ID_HEADER = "x-unbroken-stream-id"
RESUMABLE_HEADER = "X-Unbroken-Resumable"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run.

    Attributes:
        url: the endpoint's base URL (`POST {url}/chat/completions`), e.g.
            `http://127.0.0.1:8788/v1` for the gateway or `http://127.0.0.1:8787` for the mock.
        model: the model asked for.
        api_key: sent as a Bearer token when set.
        shape: the load shape.
        max_tokens: the `max_tokens` distribution (None: not sent).
        prompts: user prompts to cycle through (None: generated ones).
        mode: `stream`, `blocking` or `longpoll`.
        faults: the fault mix (mock headers and proxy cuts); probabilities stack.
        seed: seeds prompts, token counts, fault draws and Poisson gaps; also sent as the
            request's `seed` so a fault-free reference gives the same answer.
        compare: fetch fault-free references for faulted answers and compare.
        timeout_s: per read (and per connect) timeout.
        headers: extra headers for every request.
        watch_pids: local server processes whose CPU time the load is charged
            (`server_cpu_s`), measured from the first start to the last end.
    """

    url: str
    model: str = "deepseek-chat"
    api_key: str | None = None
    shape: LoadShape = field(default_factory=LoadShape)
    max_tokens: TokenDistribution | None = None
    prompts: tuple[str, ...] | None = None
    mode: Mode = "stream"
    faults: tuple[FaultMix, ...] = ()
    seed: int = 0
    compare: bool = True
    timeout_s: float = 60.0
    headers: tuple[tuple[str, str], ...] = ()
    watch_pids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"the URL must be http(s)://host[:port][/path], got {self.url!r}")
        if sum(f.probability for f in self.faults) > 1.0 + 1e-9:
            raise ConfigError("the fault probabilities add up to more than 1")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}: blocking, stream or longpoll")
        if self.prompts is not None and not self.prompts:
            raise ConfigError("the prompt file holds no prompt")


@dataclass(slots=True)
class _Planned:
    n: int
    messages: list[dict[str, str]]
    max_tokens: int | None
    fault: FaultMix | None


class BenchRun:
    """One run of a `BenchConfig`; `await run()` returns the records in start order.

    While it runs, `records` (finished requests), `in_flight` and `elapsed_s` show progress.
    """

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self.n_references = 0
        self.reference_tokens = 0
        self.unsupported: str | None = None
        self.server_cpu_s: float | None = None
        self._rng = random.Random(config.seed)  # noqa: S311 - load shapes, not secrets
        self._fault_rng = random.Random(config.seed + 1)  # noqa: S311
        self._started = 0.0
        self._ended: float | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._plans: dict[int, _Planned] = {}
        self._n = 0
        base = config.url.rstrip("/")
        self._chat_url = f"{base}/chat/completions"
        self._streams_url = f"{base}/streams"
        headers = {"Content-Type": "application/json", **dict(config.headers)}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers
        self._proxy: FaultProxy | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started (frozen once it ended)."""
        if not self._started:
            return 0.0
        return (self._ended or time.perf_counter()) - self._started

    def stop(self) -> None:
        """Stop early: start nothing more and cancel what is in flight (safe from a signal
        handler on the run's loop)."""
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()

    def _unsupported(self, why: str) -> None:
        # One request is enough to know; the rest of the mode would only repeat it.
        if self.unsupported is None:
            self.unsupported = why
            self._stopping.set()

    async def run(self) -> list[RequestRecord]:
        """Run the load shape to its end (or `stop()`), then fetch references and compare."""
        cfg = self.config
        # The pool never queues a request of the load: no cap, no pool limit (open loop);
        # otherwise room for every request in flight plus the reconnects and references.
        pool = cfg.shape.concurrency * 2 + 16 if cfg.shape.concurrency else None
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        timeout = httpx.Timeout(cfg.timeout_s)
        cut = next((f.proxy for f in cfg.faults if f.proxy is not None), None)
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                httpx.AsyncClient(limits=limits, timeout=timeout, headers=self._headers)
            )
            cut_client: httpx.AsyncClient | None = None
            if cut is not None:
                target = urlsplit(cfg.url)
                port = target.port or (443 if target.scheme == "https" else 80)
                self._proxy = await stack.enter_async_context(
                    FaultProxy(target.hostname or "127.0.0.1", port, cut)
                )
                # A fresh connection per cut request: the proxy cuts every connection.
                cut_client = await stack.enter_async_context(
                    httpx.AsyncClient(
                        limits=httpx.Limits(max_keepalive_connections=0),
                        timeout=timeout,
                        headers=self._headers,
                    )
                )
            cpu_before = sum(cpu_seconds(pid) for pid in cfg.watch_pids)
            self._started = time.perf_counter()
            try:
                if cfg.shape.is_open:
                    await self._open_loop(client, cut_client)
                else:
                    await self._closed_loop(client, cut_client)
            finally:
                self._ended = time.perf_counter()
                if cfg.watch_pids:
                    cpu = sum(cpu_seconds(pid) for pid in cfg.watch_pids) - cpu_before
                    self.server_cpu_s = cpu
            self.records.sort(key=lambda r: r.n)
            if cfg.compare and not self._stopping.is_set():
                await self._compare(client)
        return self.records

    # -- load shapes -------------------------------------------------------------------

    async def _closed_loop(
        self, client: httpx.AsyncClient, cut_client: httpx.AsyncClient | None
    ) -> None:
        shape = self.config.shape
        deadline = self._started + shape.duration_s

        async def worker() -> None:
            while not self._stopping.is_set() and time.perf_counter() < deadline:
                if shape.max_requests and self._n >= shape.max_requests:
                    return
                await self._spawn(client, cut_client, time.perf_counter())

        workers = [asyncio.create_task(worker()) for _ in range(shape.concurrency)]
        await self._wait(workers)

    async def _open_loop(
        self, client: httpx.AsyncClient, cut_client: httpx.AsyncClient | None
    ) -> None:
        shape = self.config.shape
        cap = asyncio.Semaphore(shape.concurrency) if shape.concurrency else None
        starts: list[asyncio.Task[None]] = []
        rng = random.Random(self.config.seed + 2)  # noqa: S311 - arrival gaps, not secrets
        for offset in arrival_times(shape, rng):
            due = self._started + offset
            delay = due - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                break
            starts.append(asyncio.create_task(self._capped(cap, client, cut_client, due)))
        await self._wait(starts)

    async def _capped(
        self,
        cap: asyncio.Semaphore | None,
        client: httpx.AsyncClient,
        cut_client: httpx.AsyncClient | None,
        due: float,
    ) -> None:
        if cap is None:
            await self._spawn(client, cut_client, due)
            return
        async with cap:
            if not self._stopping.is_set():
                await self._spawn(client, cut_client, due)

    async def _wait(self, tasks: list[asyncio.Task[None]]) -> None:
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()

    def _plan(self) -> _Planned:
        cfg = self.config
        n = self._n
        self._n += 1
        if cfg.prompts is not None:
            prompt = cfg.prompts[n % len(cfg.prompts)]
        else:
            prompt = generated_prompt(self._rng, n)
        max_tokens = cfg.max_tokens.draw(self._rng) if cfg.max_tokens is not None else None
        fault: FaultMix | None = None
        draw = self._fault_rng.random()
        for mix in cfg.faults:
            if draw < mix.probability:
                fault = mix
                break
            draw -= mix.probability
        plan = _Planned(n, [{"role": "user", "content": prompt}], max_tokens, fault)
        self._plans[n] = plan
        return plan

    async def _spawn(
        self, client: httpx.AsyncClient, cut_client: httpx.AsyncClient | None, due: float
    ) -> None:
        plan = self._plan()
        record = RequestRecord(plan.n, self.config.mode, due - self._started)
        record.fault = str(plan.fault.proxy or plan.fault.spec) if plan.fault else None
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - always called from a task
        self._tasks.add(task)
        self.in_flight += 1
        try:
            use = cut_client if plan.fault and plan.fault.proxy and cut_client else client
            await self._one(use, client, plan, record, due)
        except asyncio.CancelledError:
            record.error = record.error or "cancelled"
            if record.e2e_s is None:
                record.e2e_s = time.perf_counter() - due
            if not self._stopping.is_set():
                raise
        finally:
            self.in_flight -= 1
            self._tasks.discard(task)
            self.records.append(record)

    # -- one request ---------------------------------------------------------------------

    def _body(self, plan: _Planned, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": plan.messages,
            "stream": stream,
            "seed": self.config.seed,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if plan.max_tokens is not None:
            body["max_tokens"] = plan.max_tokens
        return body

    def _fault_headers(self, plan: _Planned) -> dict[str, str]:
        if plan.fault is not None and plan.fault.proxy is not None:
            # The answer should outlive the cut connection, as a client that means to
            # reconnect asks an unbroken gateway (other endpoints ignore the header).
            return {RESUMABLE_HEADER: "1"}
        if plan.fault is None:
            return {RESUMABLE_HEADER: "1"} if self.config.mode == "longpoll" else {}
        headers = {"X-Mock-Fault": plan.fault.spec, "X-Mock-Fault-Key": uuid.uuid4().hex}
        if self.config.mode == "longpoll":
            headers[RESUMABLE_HEADER] = "1"
        return headers

    async def _one(
        self,
        client: httpx.AsyncClient,
        direct: httpx.AsyncClient,
        plan: _Planned,
        record: RequestRecord,
        t0: float,
    ) -> None:
        mode = self.config.mode
        url = self._chat_url
        if client is not direct and self._proxy is not None:
            parts = urlsplit(url)
            url = parts._replace(netloc=f"127.0.0.1:{self._proxy.port}").geturl()
        try:
            if mode == "blocking":
                await self._blocking(client, url, plan, record, t0)
            elif mode == "stream":
                await self._stream(client, direct, url, plan, record, t0)
            else:
                await self._longpoll(client, direct, url, plan, record, t0)
        except httpx.TimeoutException:
            record.error = record.error or "timeout"
        except httpx.ConnectError:
            record.error = record.error or "connect"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            record.error = record.error or "reset"
        except (msgspec.DecodeError, UnicodeDecodeError):
            record.error = record.error or "malformed"
        if record.e2e_s is None:
            record.e2e_s = time.perf_counter() - t0

    async def _blocking(
        self,
        client: httpx.AsyncClient,
        url: str,
        plan: _Planned,
        record: RequestRecord,
        t0: float,
    ) -> None:
        response = await client.post(
            url, json=self._body(plan, stream=False), headers=self._fault_headers(plan)
        )
        now = time.perf_counter()
        record.status = response.status_code
        if response.status_code != 200:
            record.error = f"http_{response.status_code}"
            return
        data = msgspec.json.decode(response.content.strip() or b"{}")
        if not isinstance(data, dict) or "choices" not in data:
            record.error = (
                "stream_error" if isinstance(data, dict) and "error" in data else "malformed"
            )
            return
        message = (data["choices"] or [{}])[0].get("message") or {}
        record.text = (message.get("reasoning_content") or "") + (message.get("content") or "")
        apply_usage(record, data.get("usage"))
        meta = data.get("unbroken")
        if isinstance(meta, dict) and isinstance(meta.get("attempts"), list):
            record.attempts = len(meta["attempts"])
            record.resumes = int(meta.get("resumes") or 0)
        record.ttft_s = record.e2e_s = now - t0
        record.n_chunks = 1
        record.n_bytes = len(response.content)

    async def _stream(
        self,
        client: httpx.AsyncClient,
        direct: httpx.AsyncClient,
        url: str,
        plan: _Planned,
        record: RequestRecord,
        t0: float,
    ) -> None:
        read = AnswerRead(record, t0)
        stream_id: str | None = None
        decoder = SSEDecoder()
        local_port: int | None = None
        try:
            async with client.stream(
                "POST", url, json=self._body(plan, stream=True), headers=self._fault_headers(plan)
            ) as response:
                record.status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    record.error = f"http_{response.status_code}"
                    return
                stream_id = response.headers.get(STREAM_ID_HEADER)
                local_port = _local_port(response)
                async for data in response.aiter_bytes():
                    record.n_bytes += len(data)
                    read.feed(decoder.feed(data), time.perf_counter())
                    if read.finished:
                        break
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            cut_at = self._cut_time(local_port)
            if cut_at is None or stream_id is None:
                read.finish(time.perf_counter(), plan.fault.cut_after if plan.fault else None)
                record.error = "reset" if isinstance(exc, httpx.ReadError) else "truncated"
                return
            await self._reconnect(direct, stream_id, read, cut_at)
        read.finish(time.perf_counter(), plan.fault.cut_after if plan.fault else None)

    def _cut_time(self, local_port: int | None) -> float | None:
        if self._proxy is None or local_port is None:
            return None
        return self._proxy.cuts.get(local_port)

    async def _reconnect(
        self, client: httpx.AsyncClient, stream_id: str, read: AnswerRead, cut_at: float
    ) -> None:
        """Read the rest of a cut answer from the endpoint's stream log (SSE resume)."""
        n_before = len(read.times)
        headers = {"Accept": "text/event-stream"}
        if read.last_id:
            headers["Last-Event-ID"] = read.last_id
        decoder = SSEDecoder()
        async with client.stream(
            "GET", f"{self._streams_url}/{stream_id}", headers=headers
        ) as response:
            if response.status_code != 200:
                await response.aread()
                read.error = f"reconnect_http_{response.status_code}"
                return
            async for data in response.aiter_bytes():
                read.record.n_bytes += len(data)
                read.feed(decoder.feed(data), time.perf_counter())
                if read.finished:
                    break
        if len(read.times) > n_before:
            read.record.cut_gap_s = read.times[n_before] - cut_at

    async def _longpoll(
        self,
        client: httpx.AsyncClient,
        direct: httpx.AsyncClient,
        url: str,
        plan: _Planned,
        record: RequestRecord,
        t0: float,
    ) -> None:
        read = AnswerRead(record, t0)
        async with client.stream(
            "POST", url, json=self._body(plan, stream=True), headers=self._fault_headers(plan)
        ) as response:
            record.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                record.error = f"http_{response.status_code}"
                return
            stream_id = response.headers.get(STREAM_ID_HEADER)
        if stream_id is None:
            record.error = "unsupported"
            self._unsupported("long-poll is unsupported by this endpoint (no X-Unbroken-Stream-Id)")
            return
        after = ""
        while not read.finished:
            params = {"wait": f"{LONGPOLL_WAIT_S:g}"}
            if after:
                params["after"] = after
            reply = await direct.get(
                f"{self._streams_url}/{stream_id}",
                params=params,
                headers={"Accept": "application/json"},
            )
            now = time.perf_counter()
            if reply.status_code != 200 or "json" not in reply.headers.get("content-type", ""):
                record.error = (
                    "unsupported"
                    if reply.status_code in (404, 405, 406)
                    else (f"poll_http_{reply.status_code}")
                )
                if record.error == "unsupported":
                    self._unsupported(
                        f"long-poll is unsupported by this endpoint (GET streams/{{id}} answered "
                        f"{reply.status_code})"
                    )
                return
            record.n_bytes += len(reply.content)
            page = msgspec.json.decode(reply.content)
            items: list[SSEEvent | Comment] = []
            for event in page.get("events") or []:
                if isinstance(event, dict):
                    data = event.get("data", event)
                    text = data if isinstance(data, str) else msgspec.json.encode(data).decode()
                    items.append(SSEEvent(text, id=str(event.get("id", ""))))
            read.feed(items, now)
            after = str(page.get("next") or after)
            if page.get("done"):
                # The log ended; its `[DONE]` is not among the events, the flag says it.
                read.done = read.finished = True
        read.finish(time.perf_counter(), plan.fault.cut_after if plan.fault else None)

    # -- references ------------------------------------------------------------------------

    async def _compare(self, client: httpx.AsyncClient) -> None:
        """Fetch a fault-free answer for each faulted request that got a 200 and compare."""
        todo = [r for r in self.records if r.fault is not None and r.status == 200]
        gate = asyncio.Semaphore(max(1, min(16, self.config.shape.concurrency or 16)))

        async def one(record: RequestRecord) -> None:
            plan = self._plans[record.n]
            async with gate:
                try:
                    reply = await client.post(
                        self._chat_url,
                        json=self._body(plan, stream=False),
                        headers={"X-Mock-Fault": "none"},
                    )
                except httpx.HTTPError:
                    return
            self.n_references += 1
            if reply.status_code != 200:
                return
            data = msgspec.json.decode(reply.content.strip() or b"{}")
            choices = data.get("choices") or [{}]
            message = choices[0].get("message") or {}
            self.reference_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
            reference = (message.get("reasoning_content") or "") + (message.get("content") or "")
            record.integrity = compare_answer(record.text, reference)

        await asyncio.gather(*(one(r) for r in todo))


def _local_port(response: httpx.Response) -> int | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    addr = stream.get_extra_info("client_addr")
    return int(addr[1]) if addr else None
