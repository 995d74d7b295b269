"""Sending one answer: the stream (SSE) and non-stream (JSON) responders of the mock, with
the latency model and the in-answer faults. Imports the standard library and mock siblings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from unbroken.mock.config import Latency
from unbroken.mock.exchange import Exchange
from unbroken.mock.faults import Fault, FaultPlan
from unbroken.mock.fim import usage_chunk_events
from unbroken.mock.pacer import PacedStream, Pacer
from unbroken.mock.render import ChunkRenderer, Usage, completion_body
from unbroken.mock.stats import MockStats
from unbroken.mock.text import Answer, limit_answer

__all__ = ["Job", "send_json_answer", "send_stream"]

# Theory of operation (streams)
# -----------------------------
# The stream is a list of encoded events: the role chunk, one chunk per token, the final
# chunk (finish_reason + usage) and `data: [DONE]`. Event 0 and the first token are due at
# t_first = arrival + queue + ttft, token k at t_first + (k-1) * token_s, and the final chunk
# and [DONE] with the last token. Each wake-up writes every event that is due, coalesced into
# writes of up to `send_bytes`, then sleeps until the next one is due: with no delays the
# whole stream goes out in a few large writes, and under load a late wake-up catches up in
# one write instead of falling further behind. A positional fault acts when exactly `after`
# events were written; a stall shifts t_first by its length so the cadence resumes after it.
# A plain timed stream (no fault, no write shaping) is sent by the loop's `Pacer` instead:
# the same writes at the same times from one shared timer, without waking this task per
# event; it comes back here for a slow reader (the awaited writes wait for the drain).


@dataclass(slots=True)
class Job:
    """Everything needed to send one answer.

    Attributes:
        completion_id, created, model: the head of the answer.
        thinking: thinking-mode shapes.
        include_usage: `stream_options.include_usage`.
        answer: what to send (a continuation already has its prefix skipped).
        finish_reason: how the answer ends when nothing breaks it.
        prompt_tokens, cache_hit_tokens: the prompt side of the usage.
        latency: the latency model of this request.
        plan: the faults of this request.
        send_bytes: the coalescing limit of one write.
        n_chunks: `data:` chunks written so far (updated while sending).
        pacer: the loop's pacer for plain timed streams; None sends every stream here.
    """

    completion_id: str
    created: int
    model: str
    thinking: bool
    include_usage: bool
    answer: Answer
    finish_reason: str
    prompt_tokens: int
    cache_hit_tokens: int
    latency: Latency
    plan: FaultPlan
    send_bytes: int = 64 * 1024
    n_chunks: int = 0
    stalled_s: float = 0.0
    completed: bool = field(default=False)
    # FIM answers render as `text_completion` (mock.fim); chat answers as chat chunks.
    renderer: type[ChunkRenderer] = ChunkRenderer
    usage_chunk: bool = False
    body: Callable[..., bytes] = completion_body
    pacer: Pacer | None = None

    def usage(self, answer: Answer) -> Usage:
        """The usage of `answer` (what was actually generated)."""
        return Usage(
            self.prompt_tokens,
            answer.n_tokens,
            len(answer.reasoning),
            self.cache_hit_tokens,
            self.thinking,
        )


def _stream_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]


async def _keepalives(ex: Exchange, until_s: float, interval_s: float, beat: bytes) -> None:
    """Send `beat` at once and every `interval_s` until the loop time `until_s`.

    The beats keep to a fixed grid from the first one: a late wake-up (a busy loop) does not
    push the later beats back, so a wait gets as many beats as its length says."""
    loop = ex.loop
    started = loop.time()
    beats = 0
    while True:
        await ex.write(beat)
        beats += 1
        due = started + beats * interval_s
        if due >= until_s:
            break
        await ex.sleep(due - loop.time())
    await ex.sleep(until_s - loop.time())


async def _stall(ex: Exchange, fault: Fault, latency: Latency, beat: bytes) -> float:
    """Stall for the fault's time (forever when it has none); returns the seconds stalled."""
    loop = ex.loop
    started = loop.time()
    interval_s = latency.keepalive_ms / 1000.0
    if fault.ms is None:
        if not fault.keepalive:
            await ex.wait_closed()
            ex.raise_closed()
        while True:  # until the client leaves: `write` and `sleep` raise Closed
            await ex.write(beat)
            await ex.sleep(interval_s)
    until = started + fault.ms / 1000.0
    if fault.keepalive:
        await _keepalives(ex, until, interval_s, beat)
        await ex.sleep(until - loop.time())
    else:
        await ex.sleep(until - loop.time())
    return loop.time() - started


async def send_stream(ex: Exchange, job: Job, arrived: float, stats: MockStats) -> str:
    """Send the answer as an SSE stream; returns the outcome for the log.

    Raises:
        Closed: the client left, or a fault cut the connection.
    """
    plan = job.plan
    renderer = job.renderer(
        job.completion_id,
        job.created,
        job.model,
        thinking=job.thinking,
        include_usage=job.include_usage,
        eol=plan.eol,
        data_prefix=plan.data_prefix,
    )
    beat = renderer.keepalive()
    answer = job.answer
    events = renderer.events(answer)
    n_tokens = len(events) - 1
    if job.usage_chunk and job.include_usage:
        events.extend(usage_chunk_events(renderer, job.finish_reason, job.usage(answer)))
    else:
        events.append(renderer.final(job.finish_reason, job.usage(answer)))
    if not plan.no_done:
        events.append(renderer.done())
    if plan.storm:
        storm = beat * plan.storm
        events = [storm + event for event in events]
    n_events = len(events)

    latency = job.latency
    loop = ex.loop
    await ex.start(200, _stream_headers())
    queue_s = latency.queue_ms / 1000.0
    if queue_s > 0:
        await _keepalives(ex, arrived + queue_s, latency.keepalive_ms / 1000.0, beat)
    t_first = arrived + queue_s + latency.ttft_ms / 1000.0
    token_s = latency.token_ms / 1000.0
    faults = [f for f in plan.events if f.after <= n_events]
    sent = 0
    limit = job.send_bytes
    pacer = job.pacer
    if plan.kinds or token_s <= 0:
        pacer = None  # faults act here; with no delays a few large writes leave at once
    paced = False
    while True:
        if pacer is not None:
            transport = ex.chunked_transport
            if transport is not None and pacer.serves(loop):
                if not paced:
                    paced = True
                    stats.streams_paced += 1
                stream = PacedStream(
                    ex, transport, events, sent, t_first, token_s, n_tokens, limit, stats
                )
                try:
                    await pacer.send(stream)
                finally:
                    job.n_chunks += stream.sent - sent
                    sent = stream.sent
                if sent >= n_events:
                    break
        next_fault = faults[0].after if faults else n_events
        now = loop.time()
        if now >= t_first:
            if token_s <= 0:
                due = n_events
            else:
                # An event due within the next millisecond goes now: timers may fire early
                # and float division may land just below an integer.
                k = int((now - t_first + 0.001) / token_s) + 1
                due = n_events if k >= n_tokens else 1 + k
            stop = min(due, next_fault)
            while sent < stop:
                size = 0
                end = sent
                while end < stop and size < limit:
                    size += len(events[end])
                    end += 1
                await ex.write(b"".join(events[sent:end]))
                stats.chunks_sent += end - sent
                job.n_chunks += end - sent
                sent = end
        if faults and sent == faults[0].after:
            fault = faults.pop(0)
            outcome = await _event_fault(ex, fault, job, renderer, beat, sent)
            if outcome is not None:
                return outcome
            if fault.kind == "stall":
                t_first += job.stalled_s
            continue
        if sent >= n_events:
            break
        wake = t_first if sent == 0 else t_first + (min(sent, n_tokens) - 1) * token_s
        if wake <= t_first:
            wake = t_first
        await ex.sleep(max(wake - loop.time(), 0.0))
    await ex.end()
    job.completed = True
    return "ok"


async def _event_fault(
    ex: Exchange,
    fault: Fault,
    job: Job,
    renderer: ChunkRenderer,
    beat: bytes,
    sent: int,
) -> str | None:
    """Act out a positional fault; returns the outcome when it ended the stream."""
    kind = fault.kind
    if kind == "stall":
        job.stalled_s = await _stall(ex, fault, job.latency, beat)
        return None
    if kind == "malformed":
        await ex.write(renderer.malformed())
        return None
    if kind == "reset":
        await ex.reset()
        return "reset"
    if kind == "close":
        await ex.end()
        return "close"
    if kind == "error":
        await ex.end(renderer.error() + renderer.done())
        return "error"
    if kind == "done_early":
        await ex.end(renderer.done())
        return "done_early"
    # insufficient: the tokens written so far are what was generated.
    partial, _ = limit_answer(job.answer, max(sent - 1, 0))
    tail = renderer.final("insufficient_system_resource", job.usage(partial))
    if not job.plan.no_done:
        tail += renderer.done()
    await ex.end(tail)
    return "insufficient"


async def send_json_answer(ex: Exchange, job: Job, arrived: float) -> str:
    """Send the answer as one `chat.completion` body (also the `json_body` fault's answer
    to a stream request); returns the outcome for the log.

    Queue time sends the headers at once and a blank line every keep-alive interval
    (protocol.md §1.8), so the body may start with newlines. Positional faults act on the
    body: `insufficient` cuts the answer, `error` sends an error object, `stall` delays it,
    `malformed`, `close` and `reset` cut it in the middle (or at `after_bytes`).

    Raises:
        Closed: the client left, or a fault cut the connection.
    """
    plan = job.plan
    latency = job.latency
    loop = ex.loop
    answer = job.answer
    finish_reason = job.finish_reason
    by_kind = {f.kind: f for f in plan.events}
    if plan.cut is not None:
        by_kind[plan.cut.kind] = plan.cut
    insufficient = by_kind.get("insufficient")
    if insufficient is not None:
        answer, _ = limit_answer(answer, max(insufficient.after - 1, 0))
        finish_reason = "insufficient_system_resource"
    body = job.body(
        job.completion_id,
        job.created,
        job.model,
        answer,
        thinking=job.thinking,
        finish_reason=finish_reason,
        usage=job.usage(answer),
    )
    if "error" in by_kind:
        body = (
            b'{"error":{"message":"Internal server error","type":"server_error",'
            b'"param":null,"code":"internal_error"}}'
        )
    sse = plan.json_body and plan.json_body_sse
    if sse:
        body += b"\n\ndata: [DONE]\n\n"
    content_type = b"text/event-stream; charset=utf-8" if sse else b"application/json"
    headers = [(b"content-type", content_type)]

    queue_s = latency.queue_ms / 1000.0
    interval_s = latency.keepalive_ms / 1000.0
    if queue_s > 0:
        await ex.start(200, headers)
        await _keepalives(ex, arrived + queue_s, interval_s, b"\n")
    n_tokens = max(answer.n_tokens, 1)
    ready = arrived + queue_s + (latency.ttft_ms + (n_tokens - 1) * latency.token_ms) / 1000.0
    stall = by_kind.get("stall")
    if stall is not None:
        if not ex.has_started:
            await ex.start(200, headers)
        if stall.ms is None:
            if not stall.keepalive:
                await ex.wait_closed()
                ex.raise_closed()
            await _keepalives(ex, loop.time() + 1e9, interval_s, b"\n")  # until the client leaves
        ready += (stall.ms or 0.0) / 1000.0
        if stall.keepalive:
            await _keepalives(ex, ready, interval_s, b"\n")
    await ex.sleep(ready - loop.time())
    if not ex.has_started:
        await ex.start(200, headers)
    if plan.storm:
        await ex.write(b"\n" * plan.storm)
    cut = by_kind.get("reset") or by_kind.get("close") or by_kind.get("malformed")
    if cut is not None:
        at = cut.after_bytes if cut.after_bytes is not None else len(body) // 2
        if cut.kind == "malformed":
            await ex.end(body[:at])
            return "malformed"
        ex.cut_bytes = ex.n_bytes + at
        ex.cut_action = "reset" if cut.kind == "reset" else "close"
    await ex.end(body)
    job.completed = True
    return "error" if "error" in by_kind else "insufficient" if insufficient else "ok"
