"""Attempt: one HTTP attempt's bytes -> the chunks the consumer sees, and its timers; pure.

Imports the standard library, `unbroken.errors` and core siblings only. The shell calls
`feed(bytes, now)` for every read and `end(now)` at the end; `expiry()` tells it when the
next stream timer fires.
"""

from __future__ import annotations

from dataclasses import dataclass

from unbroken.core.accumulator import ChunkAccumulator, _Elsewhere
from unbroken.core.flow import AttemptPlan
from unbroken.core.resume import OverlapTrimmer, is_json_mode
from unbroken.core.sse import DEFAULT_MAX_EVENT_BYTES
from unbroken.core.stream import (
    INTERRUPTED_REASONS,
    ChatStreamDecoder,
    EndState,
    StreamEnd,
    classify_end,
    several_events,
)
from unbroken.core.tokens import add_usage
from unbroken.core.wire import ChatCompletionChunk, Delta, Usage
from unbroken.errors import ConfigError, TimeoutPhase, UpstreamStreamError, UpstreamTimeout

__all__ = ["Attempt", "Timeouts"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Stream timers, each raising its own `UpstreamTimeout` phase. None disables one.

    Defaults (chosen for how LLM streams fail):

    ============== ======== ============================================================
    timer          default  runs
    ============== ======== ============================================================
    connect_s      10 s     opening the connection (TCP + TLS)
    headers_s      120 s    request sent -> response headers (14 s with a fallback)
    first_token_s  120 s    request sent -> first content, reasoning or tool-call data;
                            keep-alive comments and the role chunk do not count
                            (14 s with a fallback)
    idle_s         20 s     between two data events, only after the first token;
                            keep-alive comments do not count
    deadline_s     none     the whole answer, across attempts
    ============== ======== ============================================================

    DeepSeek queues requests at peak behind keep-alive comments, so a lone route waits
    long for its first token; with a fallback route after it, waiting is worse than moving
    on, so headers and first token are capped at `failover_s`.

    Attributes:
        connect_s: to open the connection (TCP + TLS).
        headers_s: from sending the request to the response headers.
        first_token_s: from sending the request to the first content, reasoning or
            tool-call data (keep-alive comments and the empty role chunk do not count;
            reasoning does, so a thinking model is not cut off).
        idle_s: longest gap between two data events once the first token arrived;
            comments (`: keep-alive`) do not reset it, since DeepSeek sends them for
            minutes while a request is queued or stuck.
        deadline_s: total time for the whole answer across attempts (the flow's deadline).
        failover_s: the cap on `headers_s` and `first_token_s` for an attempt that has a
            fallback route after it.
    """

    connect_s: float | None = 10.0
    headers_s: float | None = 120.0
    first_token_s: float | None = 120.0
    idle_s: float | None = 20.0
    deadline_s: float | None = None
    failover_s: float | None = 14.0

    def __post_init__(self) -> None:
        for name in (
            "connect_s",
            "headers_s",
            "first_token_s",
            "idle_s",
            "deadline_s",
            "failover_s",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"timeout {name} must be > 0 or None, got {value}")


# What an attempt holds back while it holds nothing: shared, never appended to (`_deliver`
# starts a list of its own), one list less per live answer.
_NOT_HELD: list[ChatCompletionChunk] = []


# Theory of operation
# -------------------
# Per read: the decoder yields this attempt's chunks; each is folded into the attempt's own
# accumulator (for its end state and usage) and then *spliced* into the answer:
#   * a continuation's chunks get the answer's id and created, lose a role the consumer has
#     already seen, and (n > 1) have choice 0 renamed to the choice being continued;
#   * an `instruction` continuation's text goes through the OverlapTrimmer;
#   * a continuation on a route that cannot take a reasoning prefix has its reasoning hidden;
#   * chunks with tool-call fragments are held until the choice finishes (or text follows),
#     because a half tool call cannot be continued: a break discards them unseen;
#   * the usage chunk carries the billed usage of the whole answer (earlier attempts + this).
# The spliced chunks are folded into the answer accumulator, which is what the consumer saw;
# a spliced chunk left empty (a stripped role, text the trimmer holds) is not shown at all.
# Timers: headers (request sent -> headers), first token (request sent -> first data with
# text, reasoning or tool call), idle (data event -> data event, armed only once the first
# token came), deadline (answer-wide). With a fallback route, headers and first token are
# capped at `failover_s`.


class Attempt:
    """One attempt of an answer.

    Args:
        plan: the plan from the flow.
        answer: the accumulator of what the consumer has seen (fed here).
        now: monotonic time when the request is sent.
        timeouts: the stream timers.
        deadline_at: the answer's absolute deadline (monotonic), if any.
        prior_usage: billed usage of the earlier attempts (added to this one's usage).
        hold_tool_calls: hold tool-call fragments until the choice finishes.
        max_event_bytes: SSE event size limit.
        text_completions: the body is a FIM answer (`text_completion` chunks).
    """

    __slots__ = (
        "_acc",
        "_answer",
        "_blank",
        "_deadline_at",
        "_held",
        "_hold",
        "_json",
        "_kept",
        "_plain",
        "_seam",
        "_timeouts",
        "decoder",
        "first_token_at",
        "headers_at",
        "last_data_at",
        "payloads",
        "plan",
        "started_at",
        "verdict",
    )

    def __init__(
        self,
        plan: AttemptPlan,
        answer: ChunkAccumulator,
        *,
        now: float,
        timeouts: Timeouts | None = None,
        deadline_at: float | None = None,
        prior_usage: Usage | None = None,
        hold_tool_calls: bool = True,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        text_completions: bool = False,
    ) -> None:
        # First, the fields `relay_one` reads for each relayed chunk: compiled, the fields
        # lie in the order first set, and these then share the object's first cache lines
        # (a busy gateway's chunk finds them cold).
        self.decoder = ChatStreamDecoder(
            max_event_bytes=max_event_bytes, text_completions=text_completions
        )
        self._answer = answer
        self._held = _NOT_HELD
        self._acc: ChunkAccumulator | None = None  # (set below)
        self.payloads: list[bytes] | None = None
        self.last_data_at = now
        self.first_token_at: float | None = None
        self.plan = plan
        self._timeouts = timeouts or Timeouts()
        self._deadline_at = deadline_at
        self._hold = hold_tool_calls
        self.started_at = now
        self.headers_at: float | None = None
        self._blank: ChatCompletionChunk | None = None
        self._json = is_json_mode(plan.body)
        self.verdict: StreamEnd | None = None
        # (`payloads`, set above: the upstream's own JSON of the chunks the last `feed`
        # returned, when it is theirs byte for byte: one chunk, its read's only event,
        # unchanged here; see `feed`.)
        continuation = plan.continuation
        # What a continuation rewrites at its seam; None when nothing (the first attempt of
        # an answer: no object held for it, ~50 bytes per live answer).
        self._seam: _Seam | None = None
        continues = continuation is not None or prior_usage is not None
        if continues or answer.n_chunks or plan.choice_index:
            # (Not made for the first attempt of an answer, which has nothing to rewrite:
            # no id, role or text shown before it, no earlier usage; ~1 us a request.)
            target = 0 if plan.choice_index is None else plan.choice_index
            seam = _Seam(
                answer.id or None,
                answer.created,
                plan.choice_index if plan.choice_index else None,
                answer.role(target) is not None,
                continuation is not None and continuation.hide_reasoning,
                OverlapTrimmer(answer.content(target))
                if continuation is not None and continuation.trim_overlap
                else None,
                prior_usage,
            )
            self._seam = seam if seam.rewrites() else None
        self._kept = True
        # Chunks can leave as they came (`relay_one`): nothing is rewritten at a seam and no
        # JSON-mode blank answer must be watched for.
        self._plain = self._seam is None and not self._json
        # The attempt's own fold. None while it would equal the answer's: on an attempt
        # that starts the answer and rewrites nothing, every chunk goes to both alike
        # until one is held back or changed (see `_diverge`), so it is folded once.
        self._acc = None if self._seam is None and answer.n_chunks == 0 else ChunkAccumulator()

    @property
    def acc(self) -> ChunkAccumulator:
        """This attempt's stream as delivered, folded (its end state, usage and text)."""
        if self._acc is None:
            self._acc = self._answer.copy()
        return self._acc

    def _diverge(self, chunk: ChatCompletionChunk) -> None:
        # `chunk` is about to reach the answer changed, later or never: from here on the
        # attempt folds its own copy (with `chunk` as it came).
        if self._acc is None:
            self._acc = self._answer.copy()
            self._acc.feed(chunk)

    # -- timers ----------------------------------------------------------------------------

    def on_headers(self, now: float) -> None:
        """The response headers arrived."""
        self.headers_at = now

    def limit(self, phase: TimeoutPhase) -> float | None:
        """The limit of `phase` for this attempt (capped by `failover_s` when a fallback
        route exists), None when disabled."""
        t = self._timeouts
        # Branches, not a dict of the five per call: `expiry` asks on every timer check.
        if phase == "headers":
            value = t.headers_s
        elif phase == "first_token":
            value = t.first_token_s
        elif phase == "idle":
            return t.idle_s
        elif phase == "connect":
            return t.connect_s
        else:
            return t.deadline_s
        if self.plan.has_fallback and t.failover_s is not None:
            value = t.failover_s if value is None else min(value, t.failover_s)
        return value

    def expiry(self) -> tuple[float, TimeoutPhase] | None:
        """When the next timer fires and which, or None when none is armed."""
        # On a tie the earlier-checked phase wins: no headers is the more precise diagnosis.
        best: tuple[float, TimeoutPhase] | None = None
        if self.headers_at is None and (headers := self.limit("headers")) is not None:
            best = (self.started_at + headers, "headers")
        if self.first_token_at is None:
            if (first := self.limit("first_token")) is not None:
                when = self.started_at + first
                if best is None or when < best[0]:
                    best = (when, "first_token")
        elif (idle := self._timeouts.idle_s) is not None:
            when = self.last_data_at + idle
            if best is None or when < best[0]:
                best = (when, "idle")
        deadline = self._deadline_at
        if deadline is not None and (best is None or deadline < best[0]):
            best = (deadline, "deadline")
        return best

    def recheck_at(self, now: float) -> float | None:
        """When a shell that keeps one timer per attempt should look at `expiry()` again:
        the next expiry, or sooner while the first token is awaited, because its arrival
        arms the idle limit, which may fall before the expiry armed now."""
        expiry = self.expiry()
        when = None if expiry is None else expiry[0]
        idle = self._timeouts.idle_s
        if self.first_token_at is None and idle is not None:
            when = now + idle if when is None else min(when, now + idle)
        return when

    def timeout_error(self, phase: TimeoutPhase) -> UpstreamTimeout:
        """The typed error for a timer that fired."""
        limit = self.limit(phase)
        what = {
            "connect": "connecting",
            "headers": "waiting for response headers",
            "first_token": "waiting for the first token (keep-alives do not count)",
            "idle": "waiting for the next data event (keep-alives do not count)",
            "deadline": "for the whole answer (its deadline)",
        }[phase]
        return UpstreamTimeout(
            f"timed out after {limit or 0:g} s {what} on route {self.plan.route.name!r}",
            phase=phase,
            timeout_s=limit or 0.0,
            route=self.plan.route.name,
        )

    # -- data ------------------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> list[ChatCompletionChunk]:
        """One read of the body; returns the chunks to show the consumer, and sets
        `payloads` to their upstream bytes when those can be relayed as they are: a read of
        one event whose chunk nothing here changed (no seam rewrite, no interrupting finish
        hidden, none held back)."""
        self.payloads = None
        chunks = self.decoder.feed(data)
        if not chunks:
            return chunks
        self.last_data_at = now
        return self._out(chunks, now)

    def _out(self, chunks: list[ChatCompletionChunk], now: float) -> list[ChatCompletionChunk]:
        out = self._deliver(chunks, now)
        raw = self.decoder.raw
        if raw is not None and len(out) == 1 and out[0] is chunks[0] and self._kept:
            self.payloads = [raw]
        return out

    def relay_one(self, data: bytes, now: float) -> bytes | list[ChatCompletionChunk] | None:
        """`feed` for a relay's hot path: when the read is one event whose chunk leaves as
        it came (what `payloads` would say) and carries no usage, the chunk is folded and
        its upstream bytes are returned instead of a list (one call, no list per chunk);
        None, nothing consumed, when the read is several whole events that could be so
        (`several_events`): relay each of `split_events(data)` in turn instead; otherwise
        what `feed` returns, with `payloads` set as `feed` sets it. Bytes returned are no
        longer the decoder's `raw` (None): the caller holds the only reference."""
        decoder = self.decoder
        head = decoder._head
        # The fused hot path: a text event on the decoder's template (`feed_one`'s first
        # branch) whose plain text the answer keeps in its source, not here (a gateway's:
        # `ChunkAccumulator.feed_text` on an `_Elsewhere`), while nothing is held and the
        # attempt folds into the answer alone, spelt out in one frame: two calls and their
        # attribute loads less per relayed chunk (bench/hotpath.py --bytecodes). Anything
        # else goes the general way below, which does the same for these events. (A
        # template implies `_plain`: only `feed_one` learns one, called only when it holds.)
        if (
            head
            and data.startswith(b"data: ")
            and data.endswith(b"\n\n")
            and decoder._clean
            and not self._held
            and self._acc is None
            and not decoder.done
            and decoder.error is None
        ):
            # The event's JSON, cut first: its template's checks are then prefix and suffix
            # compares mypyc makes in place (with offsets, each was a method call by name).
            payload = data[6:-2]
            size = len(data)
            start = decoder._text_at
            end = size - decoder._n_tail
            if (
                payload.startswith(head)
                and payload.endswith(decoder._tail)
                and end >= start
                and size - 7 <= decoder._max
            ):
                # Plain text (`_is_plain`), byte by byte (a token is a few bytes: no slice,
                # str or method call by name, ~0.15 us a chunk): printable ASCII but a quote
                # or backslash, and the printable characters of Chinese text (`_cjk_at`);
                # anything else is decoded and checked as a str.
                at = start
                while at < end:
                    byte = data[at]
                    if 32 <= byte <= 126 and byte != 34 and byte != 92:
                        at += 1
                    elif byte >= 0xE3 and at + 2 < end and _cjk_at(data, at, byte):
                        at += 3
                    else:
                        break
                plain = at == end
                if not plain:
                    try:
                        text = data[start:end].decode()
                    except UnicodeDecodeError:
                        text = '"'  # not plain: the general way says what it is
                    plain = '"' not in text and "\\" not in text and text.isprintable()
                state = self._answer._first
                if plain and state is not None and state.index == decoder.text_index:
                    kept = state.reasoning if decoder.text_reasoning else state.content
                    if type(kept) is _Elsewhere:
                        self.payloads = decoder.raw = None
                        self.last_data_at = now
                        self._answer.n_chunks += 1
                        if end > start:
                            kept.any = True
                            state.n_text_deltas += 1
                            if self.first_token_at is None:
                                self.first_token_at = now
                        return payload
        got = decoder.feed_one(data) if self._plain else None
        if got is None:
            if self._plain and several_events(data):
                return None
            return self.feed(data, now)
        self.payloads = None
        self.last_data_at = now
        raw = decoder.raw
        assert raw is not None  # noqa: S101 - `feed_one` set it with what it returned
        if type(got) is str:
            if not self._held:
                # A text chunk like the last but its text: folded as text, never decoded.
                if self.first_token_at is None and got:
                    self.first_token_at = now
                if self._acc is not None:
                    self._acc.feed_text(decoder.text_index, got, decoder.text_reasoning)
                self._answer.feed_text(decoder.text_index, got, decoder.text_reasoning)
                # Handed on: the decoder need not hold the event's bytes until the next
                # read (~290 bytes per held stream; bench/stream_memory.py).
                decoder.raw = None
                return raw
            got = decoder.text_chunk()  # it releases held tool calls: `_deliver` does
        # (Not `cast`: a call per chunk; a chunk it is, after the checks above.)
        chunk: ChatCompletionChunk = got  # type: ignore[assignment]
        if chunk.usage is None and not self._held:
            hold = self._hold
            for choice in chunk.choices:
                reason = choice.finish_reason
                if (reason is not None and reason in INTERRUPTED_REASONS) or (
                    hold and choice.delta is not None and choice.delta.tool_calls
                ):
                    break  # hidden or held: `_deliver` decides
            else:
                if self.first_token_at is None and _has_token(chunk):
                    self.first_token_at = now
                if self._acc is not None:
                    self._acc.feed(chunk)
                self._answer.feed(chunk)
                decoder.raw = None  # handed on (as above)
                return raw
        return self._out([chunk], now)

    def _deliver(self, chunks: list[ChatCompletionChunk], now: float) -> list[ChatCompletionChunk]:
        answer = self._answer
        out: list[ChatCompletionChunk] = []
        # Whether the chunks leave as they came (`payloads`).
        seam = self._seam
        self._kept = seam is None
        hold = self._hold
        for chunk in chunks:
            if self._acc is not None:
                self._acc.feed(chunk)
            tools = False
            for choice in chunk.choices:
                # An interrupting finish (insufficient_system_resource...) is resumed, not
                # shown: the consumer sees one finish, the real one.
                if choice.finish_reason is not None and choice.finish_reason in INTERRUPTED_REASONS:
                    self._diverge(chunk)
                    choice.finish_reason = None
                    self._kept = False
                if hold and choice.delta is not None and choice.delta.tool_calls:
                    tools = True
            if self.first_token_at is None and _has_token(chunk):
                self.first_token_at = now
            if seam is not None:
                seam.splice(chunk)
                if _is_void(chunk):
                    # A seam's leftovers (a role already shown, text the trimmer holds):
                    # an empty chunk tells the consumer nothing.
                    continue
            if self._json and _has_finish(chunk) and self._is_blank(chunk):
                # JSON mode can end with an answer of spaces (DeepSeek blanks non-JSON
                # output): its finish is held back and the attempt judged a failure.
                self._diverge(chunk)
                self._blank = chunk
                continue
            if tools or (hold and self._held):
                if tools and not _has_finish(chunk):
                    self._diverge(chunk)
                    if self._held is _NOT_HELD:
                        self._held = []
                    self._held.append(chunk)
                    continue
                out.extend(self._held)
                for held in self._held:
                    answer.feed(held)
                self._held = _NOT_HELD
            answer.feed(chunk)
            out.append(chunk)
        return out

    def _is_blank(self, chunk: ChatCompletionChunk) -> bool:
        for choice in chunk.choices:
            if choice.finish_reason is None or choice.finish_reason == "tool_calls":
                continue
            delta = choice.delta
            text = self._answer.content(choice.index) + ((delta.content or "") if delta else "")
            if not text.strip():
                return True
        return False

    def finish(
        self, now: float, *, timed_out: bool = False, keep: bool = True
    ) -> list[ChatCompletionChunk]:
        """The body ended (EOF or `[DONE]`), broke or timed out: flush, judge the stream
        (`verdict`), and return the last chunks to show (held tool calls of a complete
        stream, a salvaged JSON body...). A broken stream's held chunks are dropped unseen.

        `keep=False`: for a shell that reads the attempt's fold once, at once (`folded()`),
        and then lets the attempt go: an attempt that folded into the answer alone takes
        no snapshot of it (~250 bytecodes and a copy of its choices per answer); `acc` then
        shows the answer as it is when read, not as it was here."""
        out: list[ChatCompletionChunk] = []
        if not timed_out:
            tail = self.decoder.flush()
            if tail:
                out = self._deliver(tail, now)
        if self._acc is None and keep:
            # Its fold from here on, as it ends (nothing feeds it now): a snapshot, which
            # leaves a text the answer's `TextSource` holds there (a copy reads it back).
            self._acc = self._answer.snapshot()
        # Without `keep`, judged on the answer's own fold, which is the attempt's: nothing
        # of the answer changes here then (held chunks and a blank answer made the attempt
        # a fold of its own already, `_diverge`).
        self.verdict = classify_end(
            self._answer if self._acc is None else self._acc,
            self.decoder,
            timed_out=timed_out,
            omits_finish=self.plan.route.omits_finish_reason,
        )
        if self._blank is not None and self.verdict.state is EndState.COMPLETE:
            self.verdict = StreamEnd(
                EndState.ERROR,
                error=UpstreamStreamError(
                    "the JSON-mode answer was blank (only spaces): retrying",
                    status_code=200,
                    kind="server_error",
                ),
            )
        if self.verdict.state is EndState.COMPLETE and self._held:
            for held in self._held:
                self._answer.feed(held)
            out.extend(self._held)
        self._held = _NOT_HELD
        return out

    @property
    def usage(self) -> Usage | None:
        """The usage this attempt reported (None if it broke before its usage chunk)."""
        return self.acc.usage

    def folded(self) -> ChunkAccumulator:
        """`acc` to read at once, as the attempt ends (`finish`), not to keep: the answer's
        own fold when the attempt folded into it alone (no copy made), which shows what is
        folded into the answer later (another attempt's chunks)."""
        return self._answer if self._acc is None else self._acc


class _Seam:
    """What a continuation's chunks get at the seam with the answer shown (see the theory
    of operation): the answer's id and created, the choice its choice 0 becomes, whether
    the role (already shown) and the reasoning are dropped, the overlap trimmer, and the
    usage of the earlier attempts to add."""

    __slots__ = ("created", "hide_reasoning", "id", "map", "prior", "strip_role", "trim")

    def __init__(
        self,
        id: str | None,
        created: int,
        map: int | None,
        strip_role: bool,
        hide_reasoning: bool,
        trim: OverlapTrimmer | None,
        prior: Usage | None,
    ) -> None:
        self.id = id
        self.created = created
        self.map = map
        self.strip_role = strip_role
        self.hide_reasoning = hide_reasoning
        self.trim = trim
        self.prior = prior

    def rewrites(self) -> bool:
        """Whether any chunk may change at this seam."""
        return (
            bool(self.id or self.map is not None or self.strip_role or self.hide_reasoning)
            or (self.trim is not None)
            or (self.prior is not None)
        )

    def splice(self, chunk: ChatCompletionChunk) -> None:
        """Rewrite `chunk` for the seam, in place."""
        if self.id is not None:
            chunk.id = self.id
            chunk.created = self.created
        trim = self.trim
        for choice in chunk.choices:
            if self.map is not None and choice.index == 0:
                choice.index = self.map
            delta = choice.delta
            if delta is None:
                if trim is not None and choice.finish_reason is not None:
                    rest = trim.flush()
                    if rest:
                        choice.delta = Delta(content=rest)
                continue
            if self.strip_role:
                delta.role = None
            if self.hide_reasoning:
                delta.reasoning_content = None
                delta.reasoning = None
            if trim is not None:
                text = trim.feed(delta.content) if delta.content else ""
                if choice.finish_reason is not None:
                    text += trim.flush()
                if delta.content is not None or text:
                    delta.content = text
        if chunk.usage is not None and self.prior is not None:
            chunk.usage = add_usage(self.prior, chunk.usage)


def _cjk_at(data: bytes, at: int, lead: int) -> bool:
    """Whether the three bytes at `at` (the first, `lead`) are the UTF-8 of a character of
    Chinese text that `str.isprintable` takes (tests/unit/test_attempt.py checks them all):
    U+4000-U+9FFF (CJK ideographs), U+3001-U+303F (CJK punctuation) or U+FF01-U+FF5F (the
    full-width forms)."""
    second = data[at + 1]
    third = data[at + 2]
    if third < 0x80 or third > 0xBF:
        return False
    if lead <= 0xE9:
        if lead >= 0xE4:
            return 0x80 <= second <= 0xBF
        return lead == 0xE3 and second == 0x80 and third >= 0x81
    if lead == 0xEF:
        return (second == 0xBC and third >= 0x81) or (second == 0xBD and third <= 0x9F)
    return False


def _has_token(chunk: ChatCompletionChunk) -> bool:
    for choice in chunk.choices:
        delta = choice.delta
        if delta is not None and (delta.content or delta.reasoning_text or delta.tool_calls):
            return True
    return False


def _is_void(chunk: ChatCompletionChunk) -> bool:
    if chunk.usage is not None:
        return False
    for choice in chunk.choices:
        if choice.finish_reason is not None or choice.logprobs is not None:
            return False
        delta = choice.delta
        if delta is not None and (
            delta.role or delta.content or delta.reasoning_text or delta.tool_calls or delta.refusal
        ):
            return False
    return True


def _has_finish(chunk: ChatCompletionChunk) -> bool:
    return any(choice.finish_reason is not None for choice in chunk.choices)
