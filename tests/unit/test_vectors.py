"""protocol.md §7 test vectors TV01..TV37, encoded as tests of the pure core.

SSE-layer vectors run through `SSEDecoder`, chat-layer vectors through `ChatStreamDecoder` +
`ChunkAccumulator.feed_events` + `classify_end`, HTTP-level vectors through
`decode_error_body`. Every SSE and chat vector runs twice: one feed per listed read, and one
byte per feed (h11 `test_io.py` style). Timer, status, retry and resume parts run through
`Attempt`, `kind_of_status`/`classify`/`parse_retry_after`, `plan_continuation` and `answer_flow`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from unbroken import Client, ResumedEvent
from unbroken.core import (
    ChatEvent,
    ChatStreamDecoder,
    ChunkAccumulator,
    Comment,
    EndState,
    FinishEvent,
    IgnoredField,
    IncompleteEvent,
    ReasoningEvent,
    RoleEvent,
    SSEDecoder,
    SSEEvent,
    SSEItem,
    StreamEnd,
    TextEvent,
    ToolCallEvent,
    UsageEvent,
    classify_end,
)
from unbroken.core.attempt import Attempt, Timeouts
from unbroken.core.backoff import (
    Decision,
    RetryBudget,
    RetryPolicy,
    classify,
    kind_of_status,
    parse_retry_after,
)
from unbroken.core.flow import AttemptOutcome, AttemptPlan, Connect, Sleep, answer_flow
from unbroken.core.resume import plan_continuation
from unbroken.core.routes import Route, RouteHealth
from unbroken.core.tokens import add_usage, estimate_usage
from unbroken.core.wire import ChatCompletionChunk, ErrorObject, Message, Usage, decode_error_body
from unbroken.errors import ProtocolError, UnbrokenError, UpstreamStatusError, UpstreamStreamError

# -- notation ------------------------------------------------------------------------------

H = b'"id":"c1","object":"chat.completion.chunk","created":1735689600,"model":"deepseek-chat","system_fingerprint":"fp_t"'
R = H.replace(b'"model":"deepseek-chat"', b'"model":"deepseek-reasoner"')
KEEP_ALIVE = b": keep-alive\n\n"

ROUTE = Route("deepseek", "https://api.deepseek.com")
BODY: dict[str, Any] = {
    "model": "deepseek-chat",
    "messages": [{"role": "user", "content": "Say hello"}],
    "stream": True,
}


def sub(*reads: bytes) -> tuple[bytes, ...]:
    """The reads with the notation's ‹H› and ‹R› (written <H> and <R> here) substituted."""
    return tuple(r.replace(b"<H>", H).replace(b"<R>", R) for r in reads)


def role(i: int, r: str = "assistant") -> RoleEvent:
    return RoleEvent(i, r)


def text(i: int, s: str) -> TextEvent:
    return TextEvent(i, s)


def reasoning(i: int, s: str) -> ReasoningEvent:
    return ReasoningEvent(i, s)


def tool(
    i: int,
    k: int,
    args: str,
    *,
    id: str | None = None,
    name: str | None = None,
    call_type: str | None = None,
) -> ToolCallEvent:
    return ToolCallEvent(i, k, args, id=id, name=name, call_type=call_type)


def finish(i: int, r: str) -> FinishEvent:
    return FinishEvent(i, r)


def usage(
    prompt: int,
    completion: int,
    total: int,
    hit: int | None = None,
    miss: int | None = None,
    reasoning: int | None = None,
) -> UsageEvent:
    return UsageEvent(prompt, completion, total, hit, miss, reasoning)


# -- harness -------------------------------------------------------------------------------

Split = Callable[[Sequence[bytes]], list[bytes]]


def per_read(reads: Sequence[bytes]) -> list[bytes]:
    return list(reads)


def bytewise(reads: Sequence[bytes]) -> list[bytes]:
    data = b"".join(reads)
    return [data[i : i + 1] for i in range(len(data))]


@pytest.fixture(params=[per_read, bytewise], ids=["per_read", "bytewise"])
def split(request: pytest.FixtureRequest) -> Split:
    """How the vector's bytes reach the decoder: as listed, or one byte per read."""
    fn: Split = request.param
    return fn


@dataclass
class SSERun:
    items: list[SSEItem]
    at_eof: list[SSEItem]
    decoder: SSEDecoder


def run_sse(reads: Sequence[bytes]) -> SSERun:
    decoder = SSEDecoder()
    items: list[SSEItem] = []
    for read in reads:
        items.extend(decoder.feed(read))
    at_eof = decoder.flush()
    return SSERun(items, at_eof, decoder)


@dataclass
class ChatRun:
    events: list[ChatEvent]
    decoder: ChatStreamDecoder
    acc: ChunkAccumulator

    def end(self, *, timed_out: bool = False) -> StreamEnd:
        return classify_end(self.acc, self.decoder, timed_out=timed_out)

    @property
    def message(self) -> Message:
        return self.acc.completion().choices[0].message


def run_chat(
    reads: Sequence[bytes],
    *,
    eof: bool = True,
    decoder: ChatStreamDecoder | None = None,
    acc: ChunkAccumulator | None = None,
) -> ChatRun:
    decoder = ChatStreamDecoder() if decoder is None else decoder
    acc = ChunkAccumulator() if acc is None else acc
    events: list[ChatEvent] = []
    for read in reads:
        for chunk in decoder.feed(read):
            events.extend(acc.feed_events(chunk))
    if eof:
        for chunk in decoder.flush():
            events.extend(acc.feed_events(chunk))
    return ChatRun(events, decoder, acc)


def assert_end(
    run: ChatRun,
    state: EndState,
    *,
    no_done: bool = False,
    missing_finish: bool = False,
    timed_out: bool = False,
) -> None:
    end = run.end(timed_out=timed_out)
    assert (end.state, end.no_done, end.missing_finish) == (state, no_done, missing_finish)
    if state is EndState.ERROR:
        assert end.error is run.decoder.error
    else:
        assert end.error is None


def stream_error(run: ChatRun, cls: type[UnbrokenError]) -> UnbrokenError:
    """The decoder's error, checked to be of class `cls`."""
    error = run.decoder.error
    assert isinstance(error, cls), f"expected {cls.__name__}, got {error!r}"
    return error


def upstream_error(run: ChatRun) -> UpstreamStreamError:
    error = run.decoder.error
    assert isinstance(error, UpstreamStreamError), f"got {error!r}"
    return error


# -- vectors -------------------------------------------------------------------------------

TV01 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":0},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":12}}\n\n',
    b"data: [DONE]\n\n",
)
TV01_EVENTS = [
    role(0, "assistant"),
    text(0, "Hello"),
    text(0, "!"),
    finish(0, "stop"),
    usage(12, 2, 14, 0, 12),
]

TV02 = sub(
    b'data: {<R>,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":""},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<R>,"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"9.11 < 9.80"},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<R>,"choices":[{"index":0,"delta":{"content":null,"reasoning_content":", so 9.8."},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<R>,"choices":[{"index":0,"delta":{"content":"9.8","reasoning_content":null},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<R>,"choices":[{"index":0,"delta":{"content":" is larger.","reasoning_content":null},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<R>,"choices":[{"index":0,"delta":{"content":"","reasoning_content":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":15,"completion_tokens":30,"total_tokens":45,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":24},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":15}}\n\n',
    b"data: [DONE]\n\n",
)

TV03 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":null,"tool_calls":[{"index":0,"id":"call_0_a1","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\":"}}]},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Paris\\"}"}}]},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_1_b2","type":"function","function":{"name":"get_time","arguments":"{\\"tz\\":"}}]},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"\\"CET\\"}"}}]},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":80,"completion_tokens":20,"total_tokens":100,"prompt_cache_hit_tokens":64,"prompt_cache_miss_tokens":16}}\n\n',
    b"data: [DONE]\n\n",
)

# TV01 with stream_options.include_usage: the first three chunks carry "usage":null.
TV04 = tuple(r.replace(b"}]}\n\n", b'}],"usage":null}\n\n') for r in TV01[:3]) + TV01[3:]

TV05 = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n',
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}\n\n',
    b"data: [DONE]\n\n",
)

TV06 = (KEEP_ALIVE, KEEP_ALIVE, KEEP_ALIVE, *TV01)

TV07 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\r\n\r\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n',
)

TV10 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"\xe4\xbd',
    b'\xa0\xe5\xa5\xbd"},"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
)

TV11 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"go \xf0\x9f',
    b'\x9a\x80"},"finish_reason":null}]}\n\ndata: {<H>,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
)

TV12 = sub(
    b'data:{<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}]}\n\ndata:[DONE]\n\n',
)

TV14 = sub(
    b'data: {<H>,"choices":[{"index":0,\ndata: "delta":{"content":"Hi"},"finish_reason":null}]}\n\n',
)

TV21 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n',
    b'data: {"error":{"message":"Internal server error","type":"server_error","param":null,"code":"internal_error"}}\n\n',
    b"data: [DONE]\n\n",
)

TV22 = (b'event: error\ndata: {"error":{"message":"overloaded","type":"overloaded_error"}}\n\n',)

TV23 = (
    b'error: {"code":400,"message":"the request exceeds the available context size","type":"invalid_request_error"}\n\ndata: [DONE]\n\n',
)

TV24 = (
    b'data: {"object":"error","message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}\n\n',
)

TV25 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"lo',
)

TV26 = TV01[:-1]

TV27 = (
    b'{"id":"c2","object":"chat.completion","created":1735689600,"model":"deepseek-reasoner","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there","reasoning_content":"Greet back."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11,"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":5}}',
)

TV28 = (
    b"\n",
    b"\n",
    b'\n{"id":"c3","object":"chat.completion","created":1735689600,"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"OK"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5,"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":4}}',
)

TV29 = b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"

TV30 = b'{"error":{"message":"Rate limit reached","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}'

TV31 = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n',
    b'data: {"choices":[{"content_filter_results":{},"delta":{"content":"","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1,"id":"chatcmpl-9","model":"gpt-4o","object":"chat.completion.chunk","system_fingerprint":null}\n\n',
    b'data: {"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"delta":{"content":"Hello"},"finish_reason":null,"index":0,"logprobs":null}],"created":1,"id":"chatcmpl-9","model":"gpt-4o","object":"chat.completion.chunk","system_fingerprint":null}\n\n',
    b'data: {"choices":[{"delta":{},"finish_reason":"stop","index":0}],"created":1,"id":"chatcmpl-9","model":"gpt-4o","object":"chat.completion.chunk"}\n\n',
    b'data: {"choices":[{"content_filter_offsets":{"check_offset":5,"start_offset":0,"end_offset":5},"content_filter_results":{},"finish_reason":null,"index":0}],"created":0,"id":"","model":"","object":""}\n\n',
    b"data: [DONE]\n\n",
)

TV32 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]',
)

TV33 = (
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"qwen3","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning":"User wants weather."},"finish_reason":null}]}\n\n',
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"qwen3","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"","tool_calls":[{"id":"call_x1","index":0,"type":"function","function":{"name":"get_weather","arguments":"{\\"city\\":\\"Oslo\\"}"}}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1,"model":"qwen3","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls"}]}\n\n',
    b"data: [DONE]\n\n",
)

# TV34 states only the finish chunk (with usage), the empty trailing chunk and [DONE].
TV34 = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n',
    b'data: {<H>,"choices":[]}\n\n',
    b"data: [DONE]\n\n",
)

TV35 = (
    *TV01[:3],
    TV01[3].replace(b'"finish_reason":"stop"', b'"finish_reason":"insufficient_system_resource"'),
    TV01[4],
)

# TV36: TV25's first read, then a keep-alive every 5 s; 12 of them span the 60 s progress timeout.
TV36 = (TV25[0], *([KEEP_ALIVE] * 12))

TV37_CONTINUATION = sub(
    b'data: {<H>,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":"lo!"},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {<H>,"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16,"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":14}}\n\n',
    b"data: [DONE]\n\n",
)


def data_of(read: bytes) -> str:
    """The data of a one-event `data: ...\\n\\n` read."""
    assert read.startswith(b"data: ")
    assert read.endswith(b"\n\n")
    return read[6:-2].decode()


# -- chat layer: DeepSeek and OpenAI-compatible streams ------------------------------------


def test_tv01_deepseek_chat_basic(split: Split) -> None:
    """TV01: a deepseek-chat stream gives role, text, finish, usage, done; complete, "Hello!"."""
    run = run_chat(split(TV01))
    assert run.events == TV01_EVENTS
    assert run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.COMPLETE)
    assert run.message.content == "Hello!"


def test_tv02_deepseek_reasoner_reasoning_then_content(split: Split) -> None:
    """TV02: reasoner deltas give reasoning items, then text items; both are folded apart."""
    run = run_chat(split(TV02))
    assert run.events == [
        role(0, "assistant"),
        reasoning(0, "9.11 < 9.80"),
        reasoning(0, ", so 9.8."),
        text(0, "9.8"),
        text(0, " is larger."),
        finish(0, "stop"),
        usage(15, 30, 45, 0, 15, reasoning=24),
    ]
    assert run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.COMPLETE)
    assert run.message.reasoning_content == "9.11 < 9.80, so 9.8."
    assert run.message.content == "9.8 is larger."


def test_tv03_deepseek_two_parallel_tool_calls_split_args(split: Split) -> None:
    """TV03: two tool calls split over chunks give fragments keyed by index, joined whole."""
    run = run_chat(split(TV03))
    assert run.events == [
        role(0, "assistant"),
        tool(0, 0, "", id="call_0_a1", name="get_weather", call_type="function"),
        tool(0, 0, '{"city":'),
        tool(0, 0, '"Paris"}'),
        tool(0, 1, '{"tz":', id="call_1_b2", name="get_time", call_type="function"),
        tool(0, 1, '"CET"}'),
        finish(0, "tool_calls"),
        usage(80, 20, 100, 64, 16),
    ]
    assert run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.COMPLETE)
    calls = run.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_0_a1", "get_weather", '{"city":"Paris"}'),
        ("call_1_b2", "get_time", '{"tz":"CET"}'),
    ]
    assert run.message.content == ""


def test_tv04_deepseek_include_usage_nulls(split: Split) -> None:
    """TV04: `"usage":null` on every chunk but the last is no item; exactly one usage item."""
    run = run_chat(split(TV04))
    assert run.events == TV01_EVENTS
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)
    assert run.message.content == "Hello!"


def test_tv05_openai_usage_chunk_with_empty_choices(split: Split) -> None:
    """TV05: reading goes on after the finish chunk, so OpenAI's `choices:[]` usage is kept."""
    run = run_chat(split(TV05))
    assert run.events == [role(0, "assistant"), text(0, "Hi"), finish(0, "stop"), usage(9, 1, 10)]
    assert run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.COMPLETE)


def test_tv06_keepalive_comments_before_first_token_chat(split: Split) -> None:
    """TV06: keep-alive comments before the first chunk change nothing in the chat items."""
    run = run_chat(split(TV06))
    assert run.events == TV01_EVENTS
    assert run.decoder.done
    assert run.decoder.n_comments == 3
    assert_end(run, EndState.COMPLETE)


def test_tv06_keepalives_move_no_timer_first_token_is_hello() -> None:
    """TV06: keep-alives move no timer (only data does); time-to-first-token runs to "Hello"."""
    attempt = Attempt(AttemptPlan(route=ROUTE, body=BODY), ChunkAccumulator(), now=0.0)
    attempt.on_headers(0.5)
    for t, read in enumerate(TV06[:3], start=1):
        assert attempt.feed(read, float(t)) == []
        assert attempt.expiry() == (60.5, "idle")
    assert attempt.decoder.n_comments == 3
    attempt.feed(TV06[3], 4.0)  # role chunk with content "": data, but no token
    assert (attempt.first_token_at, attempt.last_data_at) == (None, 4.0)
    attempt.feed(TV06[4], 5.0)  # text(0, "Hello")
    assert attempt.first_token_at == 5.0


def test_tv07_crlf_line_endings(split: Split) -> None:
    """TV07: CRLF line ends frame events like LF; a stream without usage is complete."""
    run = run_chat(split(TV07))
    assert run.events == [role(0, "assistant"), text(0, "Hi"), finish(0, "stop")]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)
    assert run.acc.usage is None


def test_tv10_utf8_chinese_split_inside_character(split: Split) -> None:
    """TV10: a character split across reads arrives whole, in one item, with no U+FFFD."""
    run = run_chat(split(TV10))
    assert run.events == [text(0, "你好"), finish(0, "stop")]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)


def test_tv11_utf8_emoji_split_2_plus_2(split: Split) -> None:
    """TV11: a 4-byte emoji split 2+2 (or 1 byte per read) arrives whole."""
    run = run_chat(split(TV11))
    assert run.events == [text(0, "go 🚀"), finish(0, "stop")]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)


def test_tv12_data_without_space(split: Split) -> None:
    """TV12: `data:` without the space (DashScope) decodes the same, `[DONE]` included."""
    run = run_chat(split(TV12))
    assert run.events == [role(0, "assistant"), text(0, "Hi"), finish(0, "stop")]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)


def test_tv14_multiline_data_chat(split: Split) -> None:
    """TV14: JSON split over two data lines parses (LF is JSON whitespace); EOF -> truncated."""
    run = run_chat(split(TV14))
    assert run.events == [text(0, "Hi")]
    assert not run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.TRUNCATED)


def test_tv15_field_without_colon_chat(split: Split) -> None:
    """TV15: the chat layer ignores events whose data is empty or only whitespace."""
    run = run_chat(split((b"data\n\ndata\ndata\n\n",)))
    assert run.events == []
    assert not run.decoder.done
    assert run.decoder.error is None


def test_tv16_event_type_ping_chat(split: Split) -> None:
    """TV16: the chat layer ignores (and counts) the non-message `ping` event."""
    run = run_chat(split((b"event: ping\n\nevent: ping\ndata: x\n\ndata: y\n\n",)))
    assert run.events == []
    assert run.decoder.n_ignored == 1
    # The `message` event "y" is not JSON: malformed_chunk (§4 step 4), not the ping.
    error = stream_error(run, ProtocolError)
    assert isinstance(error, ProtocolError)
    assert error.excerpt == "y"


def test_tv21_error_object_mid_stream(split: Split) -> None:
    """TV21: `data: {"error":…}` is an upstream error; the partial "Hel" is kept, never complete."""
    run = run_chat(split(TV21))
    assert run.events == [role(0, "assistant"), text(0, "Hel")]
    error = upstream_error(run)
    assert error.status_code == 200
    assert error.error_type == "server_error"
    assert "Internal server error" in error.message
    assert not run.decoder.done
    assert_end(run, EndState.ERROR)
    assert run.message.content == "Hel"
    assert run.acc.has_output


def test_tv22_typed_error_event_chat(split: Split) -> None:
    """TV22: an `event: error` block is an upstream error with the data's type and message."""
    run = run_chat(split(TV22))
    assert run.events == []
    error = upstream_error(run)
    assert error.error_type == "overloaded_error"
    assert "overloaded" in error.message
    assert_end(run, EndState.ERROR)


def test_tv23_llamacpp_legacy_error_field_chat(split: Split) -> None:
    """TV23: a legacy `error:` field line is an upstream error; the stream is never complete."""
    run = run_chat(split(TV23))
    assert run.events == []
    error = upstream_error(run)
    assert error.error_code == 400
    assert error.error_type == "invalid_request_error"
    assert "the request exceeds the available context size" in error.message
    assert_end(run, EndState.ERROR)


def test_tv23_input_after_legacy_error_is_ignored(split: Split) -> None:
    """TV23: by design input after an error is ignored: `[DONE]` is not read, the end is error."""
    run = run_chat(split(TV23))
    assert run.decoder.error is not None
    assert not run.decoder.done
    assert run.decoder.finished
    assert run.decoder.feed(b"data: [DONE]\n\n") == []
    assert not run.decoder.done
    assert_end(run, EndState.ERROR)


def test_tv24_vllm_flat_error_object(split: Split) -> None:
    """TV24: vLLM's flat `{"object":"error",…}` is an upstream error with code and type."""
    run = run_chat(split(TV24))
    assert run.events == []
    error = upstream_error(run)
    assert error.error_code == 400
    assert error.error_type == "BadRequestError"
    assert "max_tokens is too large" in error.message
    assert_end(run, EndState.ERROR)


def test_tv25_truncated_mid_line_no_finish_no_done(split: Split) -> None:
    """TV25: EOF inside a line drops the partial event; the answer so far "Hel" is truncated."""
    run = run_chat(split(TV25))
    assert run.events == [role(0, "assistant"), text(0, "Hel")]
    assert not run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.TRUNCATED)
    assert run.message.content == "Hel"  # the resume prefix
    assert run.acc.has_output


def test_tv26_finish_reason_but_no_done(split: Split) -> None:
    """TV26: a finish_reason then EOF without `[DONE]` is complete, flagged no_done."""
    run = run_chat(split(TV26))
    assert run.events == TV01_EVENTS
    assert not run.decoder.done
    assert run.decoder.error is None
    assert_end(run, EndState.COMPLETE, no_done=True)


@pytest.mark.parametrize(
    "reads",
    [TV27, (*TV27, b"\n\ndata: [DONE]\n\n")],
    ids=["application_json", "event_stream_with_done"],
)
def test_tv27_json_body_despite_stream_true(split: Split, reads: tuple[bytes, ...]) -> None:
    """TV27: a whole JSON completion (sniffed by its `{`) replays as items; complete, no flag."""
    run = run_chat(split(reads))
    assert run.decoder.is_json_body
    assert run.events == [
        role(0, "assistant"),
        reasoning(0, "Greet back."),
        text(0, "Hi there"),
        finish(0, "stop"),
        usage(5, 6, 11, 0, 5),
    ]
    assert run.decoder.error is None
    # "no done expected": a JSON body has no `[DONE]`, and its absence is not flagged.
    assert_end(run, EndState.COMPLETE, no_done=False)


def test_tv28_nonstream_keepalive_newlines(split: Split) -> None:
    """TV28: keep-alive newlines before a JSON body are skipped; the body decodes complete."""
    run = run_chat(split(TV28))
    assert run.decoder.is_json_body
    assert run.events == [
        role(0, "assistant"),
        text(0, "OK"),
        finish(0, "stop"),
        usage(4, 1, 5, 0, 4),
    ]
    assert run.decoder.error is None
    assert_end(run, EndState.COMPLETE, no_done=False)


def test_tv28_only_keepalive_newlines_is_empty_body(split: Split) -> None:
    """TV28 fault: only keep-alive newlines then EOF is an empty_body error, never complete."""
    run = run_chat(split((b"\n\n\n\n",)))
    assert run.events == []
    error = stream_error(run, ProtocolError)
    assert "empty body" in error.message
    assert_end(run, EndState.ERROR)


def test_tv31_azure_prompt_filter_and_annotations(split: Split) -> None:
    """TV31: Azure's empty prompt-filter chunk and post-finish annotation change nothing."""
    run = run_chat(split(TV31))
    assert run.events == [role(0, "assistant"), text(0, "Hello"), finish(0, "stop")]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)
    completion = run.acc.completion()
    assert (completion.id, completion.model) == ("chatcmpl-9", "gpt-4o")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == "Hello"


@pytest.mark.parametrize("tail", [b"", b"\n"], ids=["no_line_end", "one_lf"])
def test_tv32_done_without_trailing_blank_line_chat(split: Split, tail: bytes) -> None:
    """TV32: an unterminated `data: [DONE]` at EOF is salvaged as done; complete."""
    run = run_chat(split((TV32[0] + tail,)))
    assert run.events == [text(0, "Hi"), finish(0, "stop")]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)


def test_tv33_ollama_style(split: Split) -> None:
    """TV33: Ollama's `reasoning`, repeated role and whole tool call give one role, one call."""
    run = run_chat(split(TV33))
    assert run.events == [
        role(0, "assistant"),
        reasoning(0, "User wants weather."),
        tool(0, 0, '{"city":"Oslo"}', id="call_x1", name="get_weather", call_type="function"),
        finish(0, "tool_calls"),
    ]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)


def test_tv34_usage_then_empty_trailing_chunk(split: Split) -> None:
    """TV34: a trailing `choices:[]` chunk without usage never clears the usage seen before."""
    run = run_chat(split(TV34))
    assert run.events == [finish(0, "stop"), usage(3, 1, 4)]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)
    assert run.acc.usage == Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    assert run.acc.completion().usage == run.acc.usage


def test_tv35_insufficient_system_resource_interrupt(split: Split) -> None:
    """TV35: finish `insufficient_system_resource` is interrupted even with `[DONE]`; "Hello!" kept."""
    run = run_chat(split(TV35))
    assert run.events == [
        *TV01_EVENTS[:3],
        finish(0, "insufficient_system_resource"),
        TV01_EVENTS[4],
    ]
    assert run.decoder.done
    assert_end(run, EndState.INTERRUPTED)
    assert run.message.content == "Hello!"  # the resume prefix


def test_tv36_keepalive_forever_progress_timeout(split: Split) -> None:
    """TV36: keep-alives after "Hel" with no EOF: undecided until a timer fires, then stalled."""
    run = run_chat(split(TV36), eof=False)
    assert run.events == [role(0, "assistant"), text(0, "Hel")]
    assert run.decoder.n_comments == 12
    assert not run.decoder.finished
    assert_end(run, EndState.STALLED, timed_out=True)
    assert run.message.content == "Hel"  # the resume prefix


def test_tv36_idle_timer_fires_through_keepalives() -> None:
    """TV36: keep-alives never hold off the idle timer; it fires 60 s after "Hel": stalled."""
    answer = ChunkAccumulator()
    attempt = Attempt(
        AttemptPlan(route=ROUTE, body=BODY), answer, now=0.0, timeouts=Timeouts(idle_s=60.0)
    )
    attempt.on_headers(0.0)
    assert attempt.feed(TV36[0], 0.0) != []  # role + text(0, "Hel")
    for i, read in enumerate(TV36[1:], start=1):
        assert attempt.feed(read, 5.0 * i) == []
        assert attempt.expiry() == (60.0, "idle")
    assert attempt.decoder.n_comments == 12
    error = attempt.timeout_error("idle")
    assert (error.phase, error.timeout_s) == ("idle", 60.0)
    assert attempt.finish(60.0, timed_out=True) == []
    assert attempt.verdict == StreamEnd(EndState.STALLED)
    assert answer.content() == "Hel"  # the resume prefix


def test_tv37_continuation_stream(split: Split) -> None:
    """TV37: the continuation stream alone decodes to role, "lo!", finish, usage; complete."""
    run = run_chat(split(TV37_CONTINUATION))
    assert run.events == [
        role(0, "assistant"),
        text(0, "lo!"),
        finish(0, "stop"),
        usage(14, 2, 16, 0, 14),
    ]
    assert run.decoder.done
    assert_end(run, EndState.COMPLETE)


def test_tv37_continuation_folds_onto_first_attempt(split: Split) -> None:
    """TV37: folding the continuation onto attempt 1 adds "lo!" only: no second role, "Hello!"."""
    first = run_chat(split(TV25))
    assert_end(first, EndState.TRUNCATED)
    assert first.message.content == "Hel"
    second = run_chat(split(TV37_CONTINUATION), acc=first.acc)
    assert second.events == [text(0, "lo!"), finish(0, "stop"), usage(14, 2, 16, 0, 14)]
    assert_end(second, EndState.COMPLETE)
    assert second.message.content == "Hello!"


def test_tv37_deepseek_continuation_request() -> None:
    """TV37: after "Hel" the DeepSeek continuation is POST /beta/chat/completions with messages + {"role":"assistant","content":"Hel","prefix":true}."""
    plan = plan_continuation(BODY, dialect="deepseek", content="Hel", reasoning="")
    assert plan is not None
    assert plan.beta
    assert ROUTE.url("/chat/completions", beta=plan.beta) == (
        "https://api.deepseek.com/beta/chat/completions"
    )
    assert plan.body["messages"] == [
        *BODY["messages"],
        {"role": "assistant", "content": "Hel", "prefix": True},
    ]


def test_tv37_consumer_sees_resumed_event_and_summed_usage() -> None:
    """TV37: the consumer sees text "Hel", resumed, text "lo!", finish(0,stop); usage per attempt and summed."""
    answer = ChunkAccumulator()
    consumer = ChunkAccumulator()  # folds exactly what was shown, for its events
    flow = answer_flow(
        BODY,
        [ROUTE],
        {ROUTE.name: RouteHealth()},
        answer,
        policy=RetryPolicy(),
        budget=RetryBudget(),
        rng=random.Random(0),
        now=0.0,
    )
    seen: list[object] = []
    attempts: list[Attempt] = []
    prior = estimate_usage(12, "Hel")  # the shell bills a broken attempt by estimate
    now = 0.0
    action = next(flow)
    with pytest.raises(StopIteration):
        for reads in (TV25, TV37_CONTINUATION):
            if isinstance(action, Sleep):
                now += action.seconds
                action = flow.send(None)
            assert isinstance(action, Connect)
            plan = action.plan
            attempt = Attempt(plan, answer, now=now, prior_usage=prior if attempts else None)
            attempts.append(attempt)
            shown: list[ChatCompletionChunk] = []
            for read in reads:
                shown += attempt.feed(read, now)
            shown += attempt.finish(now)
            for chunk in shown:
                seen.extend(consumer.feed_events(chunk))
            action = flow.send(AttemptOutcome(end=attempt.verdict, error=None, now=now))
    billed = add_usage(prior, attempts[1].usage)
    assert billed is not None
    assert seen == [
        role(0),
        text(0, "Hel"),
        text(0, "lo!"),
        finish(0, "stop"),
        usage(26, 3, 29, 0, 26),
    ]
    assert attempts[1].plan.kind == "resume"
    assert attempts[1].plan.beta
    assert (attempts[0].usage, attempts[1].usage) == (None, Usage(14, 2, 16, 0, 14))
    assert answer.usage == billed
    assert answer.content() == "Hello!"


def test_tv37_chat_stream_shows_resumed_between_the_texts() -> None:
    """TV37 through the public ChatStream: an upstream that sends TV25 and then, to the beta
    continuation, TV37's rest; the events observed are text "Hel", resumed at offset 3,
    text "lo!", and the whole answer is done."""
    requests: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        reads = TV25 if len(requests) == 1 else TV37_CONTINUATION
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=httpx.ByteStream(b"".join(reads)),
        )

    http = httpx.Client(transport=httpx.MockTransport(upstream))
    with Client(api_key="sk", http_client=http, retry=RetryPolicy(wait_initial_s=0.0)) as client:
        stream = client.chat.stream(model="deepseek-chat", messages=BODY["messages"])
        events = [e for e in stream if e.type in ("text", "resumed", "done")]
    http.close()
    kinds = [(e.type, e.text if isinstance(e, TextEvent) else None) for e in events]
    assert kinds == [("text", "Hel"), ("resumed", None), ("text", "lo!"), ("done", None)]
    resumed = events[1]
    assert isinstance(resumed, ResumedEvent)
    assert (resumed.attempt, resumed.index, resumed.offset) == (2, 0, 3)
    assert requests[1].url.path == "/beta/chat/completions"
    assert json.loads(requests[1].content)["messages"][-1] == {
        "role": "assistant",
        "content": "Hel",
        "prefix": True,
    }


@pytest.mark.parametrize(
    ("vector", "prefix", "state"),
    [
        ("TV21", "Hel", EndState.ERROR),
        ("TV25", "Hel", EndState.TRUNCATED),
        ("TV35", "Hello!", EndState.INTERRUPTED),
        ("TV36", "Hel", EndState.STALLED),
    ],
)
def test_resume_plan_uses_answer_so_far_as_prefix(
    vector: str, prefix: str, state: EndState
) -> None:
    """TV21/25/35/36: the end state leads to a resume whose assistant prefix is the answer so far."""
    reads = {"TV21": TV21, "TV25": TV25, "TV35": TV35, "TV36": TV36}[vector]
    run = run_chat(reads, eof=vector != "TV36")
    end = run.end(timed_out=vector == "TV36")
    assert end.state is state
    if end.error is not None:
        assert classify(end.error) is Decision.RETRY
    plan = plan_continuation(
        BODY, dialect="deepseek", content=run.message.content or "", reasoning=""
    )
    assert plan is not None
    assert plan.body["messages"][-1] == {"role": "assistant", "content": prefix, "prefix": True}


# -- SSE layer -----------------------------------------------------------------------------


def test_tv06_keepalive_comments_sse(split: Split) -> None:
    """TV06: three keep-alive comments come out as comments, before TV01's events."""
    run = run_sse(split(TV06))
    assert run.items == [
        Comment(" keep-alive"),
        Comment(" keep-alive"),
        Comment(" keep-alive"),
        *(SSEEvent(data_of(r)) for r in TV01),
    ]
    assert run.at_eof == []


def test_tv08_cr_only_line_endings(split: Split) -> None:
    """TV08: a lone CR ends a line; CR CR is a blank line that dispatches."""
    run = run_sse(split((b"data: a\rdata: b\r\rdata: c\r\r",)))
    assert run.items == [SSEEvent("a\nb"), SSEEvent("c")]
    assert run.at_eof == []


def test_tv09_crlf_split_across_reads(split: Split) -> None:
    """TV09: CR at the end of a read and LF at the start of the next are one line end."""
    run = run_sse(split((b"data: x\r", b"\ndata: y\r\n\r\n")))
    assert run.items == [SSEEvent("x\ny")]
    assert run.at_eof == []


def test_tv13_only_one_space_stripped(split: Split) -> None:
    """TV13: only one leading space of a value is removed; a second space or a tab stays."""
    run = run_sse(split((b"data:  two\n\ndata:\tthree\n\n",)))
    assert run.items == [SSEEvent(" two"), SSEEvent("\tthree")]


def test_tv14_multiline_data_joined_with_lf(split: Split) -> None:
    """TV14: two data lines join with exactly one LF between their values."""
    run = run_sse(split(TV14))
    assert run.items == [
        SSEEvent(
            (b'{<H>,"choices":[{"index":0,\n"delta":{"content":"Hi"},"finish_reason":null}]}')
            .replace(b"<H>", H)
            .decode()
        )
    ]
    assert run.at_eof == []


def test_tv15_field_without_colon(split: Split) -> None:
    """TV15: a bare `data` line appends an empty value plus LF, so such blocks still dispatch."""
    run = run_sse(split((b"data\n\ndata\ndata\n\n",)))
    assert run.items == [SSEEvent(""), SSEEvent("\n")]


def test_tv16_event_type_without_data_and_reset(split: Split) -> None:
    """TV16: an event type without data dispatches nothing; the type resets after dispatch."""
    run = run_sse(split((b"event: ping\n\nevent: ping\ndata: x\n\ndata: y\n\n",)))
    assert run.items == [SSEEvent("x", event="ping"), SSEEvent("y", event="message")]


def test_tv17_comments_unknown_and_case_sensitive_fields(split: Split) -> None:
    """TV17: comments are reported, `Data` (case-sensitive) and `foo` are ignored fields."""
    run = run_sse(split((b": hello\nData: x\nfoo: bar\n\n",)))
    assert run.items == [Comment(" hello"), IgnoredField("Data", "x"), IgnoredField("foo", "bar")]
    assert run.at_eof == []


@pytest.mark.parametrize(
    ("reads", "events", "ignored"),
    [
        ((b"\xef\xbb", b"\xbfdata: x\n\n"), [SSEEvent("x")], []),
        # The second BOM is part of the field name: "\ufeffdata" is an unknown field.
        ((b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n",), [], [IgnoredField("\ufeffdata", "x")]),
        (
            (b"data: x\n\n\xef\xbb\xbfdata: y\n\n",),
            [SSEEvent("x")],
            [IgnoredField("\ufeffdata", "y")],
        ),
    ],
    ids=["split_bom_stripped", "second_bom_is_data", "late_bom_is_data"],
)
def test_tv18_bom_at_stream_start(
    split: Split,
    reads: tuple[bytes, ...],
    events: list[SSEEvent],
    ignored: list[IgnoredField],
) -> None:
    """TV18: only one BOM at the very start of the stream is dropped, even split across reads."""
    run = run_sse(split(reads))
    assert [i for i in run.items if isinstance(i, SSEEvent)] == events
    assert [i for i in run.items if isinstance(i, IgnoredField)] == ignored
    assert run.at_eof == []


@pytest.mark.parametrize(
    ("stream", "events", "retry_ms"),
    [
        (b"retry: 2500\n\n", [], 2500),
        (b"retry: 2.5\nretry: -1\nretry: 1e3\nretry:\ndata: z\n\n", [SSEEvent("z")], None),
        (b"retry: 1000\ndata: x\n\n", [SSEEvent("x")], 1000),
    ],
    ids=["digits_set_time", "non_digits_ignored", "with_data"],
)
def test_tv19_retry_field(
    split: Split, stream: bytes, events: list[SSEEvent], retry_ms: int | None
) -> None:
    """TV19: `retry` sets the reconnection time only when its value is all ASCII digits."""
    run = run_sse(split((stream,)))
    assert run.items == events
    assert run.decoder.reconnection_time_ms == retry_ms


TV20 = b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: x\x00y\ndata: d\n\nid: 42\n\n"


def test_tv20_id_field_persistence_null_and_reset(split: Split) -> None:
    """TV20: the id persists across events, `id` alone resets it, an id with NUL is ignored."""
    run = run_sse(split((TV20,)))
    assert run.items == [
        SSEEvent("a", id="7"),
        SSEEvent("b", id="7"),
        SSEEvent("c", id=""),
        SSEEvent("d", id=""),
    ]
    assert run.decoder.last_event_id == "42"  # a reconnect sends Last-Event-ID: 42


def test_tv20_no_last_event_id_after_d(split: Split) -> None:
    """TV20: right after event "d" the last event ID is empty, so a reconnect sends no header."""
    before_last_block = TV20[: TV20.index(b"id: 42")]
    run = run_sse(split((before_last_block,)))
    assert run.items[-1] == SSEEvent("d", id="")
    assert run.decoder.last_event_id == ""


def test_tv22_typed_error_event_sse(split: Split) -> None:
    """TV22: an `event: error` block is an event of type `error` at the SSE layer."""
    run = run_sse(split(TV22))
    assert run.items == [
        SSEEvent('{"error":{"message":"overloaded","type":"overloaded_error"}}', event="error")
    ]


def test_tv23_llamacpp_legacy_error_field_sse(split: Split) -> None:
    """TV23: the legacy `error:` line is an ignored field, then `[DONE]` is an event."""
    run = run_sse(split(TV23))
    assert run.items == [
        IgnoredField(
            "error",
            '{"code":400,"message":"the request exceeds the available context size","type":"invalid_request_error"}',
        ),
        SSEEvent("[DONE]"),
    ]


def test_tv25_truncated_mid_line_sse(split: Split) -> None:
    """TV25: one event; the block no blank line closed is never dispatched at EOF."""
    run = run_sse(split(TV25))
    assert run.items == [SSEEvent(data_of(TV25[0]))]
    # Reported only as IncompleteEvent (§4), never as an SSEEvent.
    partial = TV25[1].removeprefix(b"data: ").decode()
    assert run.at_eof == [IncompleteEvent(partial)]


@pytest.mark.parametrize("tail", [b"", b"\n"], ids=["no_line_end", "one_lf"])
def test_tv32_done_without_trailing_blank_line_sse(split: Split, tail: bytes) -> None:
    """TV32: an unterminated `data: [DONE]` is not dispatched; EOF reports it as incomplete."""
    run = run_sse(split((TV32[0] + tail,)))
    assert run.items == [
        SSEEvent(
            b'{<H>,"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}'.replace(
                b"<H>", H
            ).decode()
        )
    ]
    assert run.at_eof == [IncompleteEvent("[DONE]")]


# -- HTTP level ----------------------------------------------------------------------------


def test_tv29_http_503_html() -> None:
    """TV29: an HTML error page is read for its <title>, never parsed as SSE."""
    assert decode_error_body(TV29) == ErrorObject(message="503 Service Temporarily Unavailable")


def tv29_error() -> UpstreamStatusError:
    """The error a shell builds for TV29's 503 response."""
    message = decode_error_body(TV29).message
    return UpstreamStatusError(message, status_code=503, kind=kind_of_status(503, message))


def test_tv29_http_503_is_overloaded() -> None:
    """TV29: status 503 gives an error with status_code=503, kind="overloaded", retryable, nothing emitted."""
    error = tv29_error()
    assert (error.status_code, error.kind, error.message) == (
        503,
        "overloaded",
        "503 Service Temporarily Unavailable",
    )
    assert classify(error) is Decision.RETRY


def test_tv30_http_429_json_body() -> None:
    """TV30: a 429 JSON body gives the provider's message, type and code."""
    assert decode_error_body(TV30) == ErrorObject(
        message="Rate limit reached", type="rate_limit_error", code="rate_limit_exceeded"
    )


def test_tv30_http_429_retry_after() -> None:
    """TV30: status 429 with `Retry-After: 2` gives retry_after_s == 2.0 and no retry sooner."""
    body = decode_error_body(TV30)
    retry_after = parse_retry_after("2")
    assert retry_after == 2.0
    error = UpstreamStatusError(
        body.message,
        status_code=429,
        kind=kind_of_status(429, body.message, body.code),
        retry_after_s=retry_after,
    )
    assert error.kind == "rate_limited"
    assert classify(error) is Decision.RETRY
    flow = answer_flow(
        BODY,
        [ROUTE],
        {ROUTE.name: RouteHealth()},
        ChunkAccumulator(),
        policy=RetryPolicy(),
        budget=RetryBudget(),
        rng=random.Random(0),
        now=0.0,
    )
    assert isinstance(next(flow), Connect)
    assert flow.send(AttemptOutcome(end=None, error=error, now=1.0)) == Sleep(2.0, error)
    retry = flow.send(None)
    assert isinstance(retry, Connect)
    assert (retry.plan.kind, retry.plan.waited_s) == ("retry", 2.0)


@pytest.mark.parametrize(
    ("vector", "retryable"),
    [("TV21", True), ("TV22", True), ("TV23", False), ("TV28-fault", True), ("TV29", True)],
)
def test_error_retryability(vector: str, retryable: bool) -> None:
    """TV21/22/23/28/29: server, overload and empty-body errors are retryable; context-size 400 is not."""
    if vector == "TV29":
        error: UnbrokenError | None = tv29_error()
    else:
        reads = {"TV21": TV21, "TV22": TV22, "TV23": TV23, "TV28-fault": (b"\n\n\n\n",)}
        error = run_chat(reads[vector]).decoder.error
    assert error is not None
    assert (classify(error) is Decision.RETRY) == retryable
    if vector == "TV23":
        # Not on the same route; a route with a larger context may still serve it.
        assert isinstance(error, UpstreamStreamError)
        assert error.kind == "context_length_exceeded"
        assert classify(error) is Decision.FALLBACK
