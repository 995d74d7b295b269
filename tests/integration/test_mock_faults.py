"""The fault injector over loopback: every fault of the X-Mock-Fault grammar, seen on the
wire (bytes, TCP reset or clean close, timing) and through the core's decoder."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MOCK_CONFIG
from tests.servers import RawResult, raw_exchange, read_stream
from unbroken.core import EndState
from unbroken.mock import FaultRule, MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Faults, 故障 and 🧪"}]
CHAT: dict[str, Any] = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
FULL = answer_text("deepseek-chat", MESSAGES, config=MOCK_CONFIG)[1]
NGINX_503 = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>"
    b"\r\n</body>\r\n</html>\r\n"
)


def fault(mock: MockServer, spec: str, body: dict[str, Any] | None = None, **kw: Any) -> RawResult:
    headers = {"X-Mock-Fault": spec, **kw.pop("headers", {})}
    return raw_exchange(mock.url, body or CHAT, headers=headers, **kw)


def data_events(body: bytes, eol: bytes = b"\n") -> list[bytes]:
    """The data of every complete `data:` event (comments skipped)."""
    blocks = body.split(eol + eol)[:-1]
    return [b.split(b":", 1)[1].lstrip(b" ") for b in blocks if b.startswith(b"data:")]


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `check()` holds (server-side bookkeeping after a client left)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("spec", "status", "content_type", "message"),
    [
        ("429", 429, "application/json", "Rate limit reached"),
        ("500", 500, "application/json", "Internal server error"),
        ("502", 502, "text/html", "502 Bad Gateway"),
        ("503 body=json", 503, "application/json", "overloaded"),
        ("504", 504, "text/html", "504 Gateway Time-out"),
        ("402", 402, "application/json", "Insufficient Balance"),
        ("401", 401, "application/json", "Authentication Fails"),
        ("400", 400, "application/json", "Invalid request"),
        ("422", 422, "application/json", "Invalid parameters"),
        ("context_length", 400, "application/json", "maximum context length"),
        ("content_filter", 400, "application/json", "Content Exists Risk"),
    ],
)
def test_refusals(
    mock: MockServer, spec: str, status: int, content_type: str, message: str
) -> None:
    """Refusal faults answer the status with DeepSeek's JSON or nginx's HTML, no Retry-After."""
    result = fault(mock, spec)
    assert result.status == status
    assert result.header("content-type") == content_type
    assert result.header("retry-after") is None
    assert message in result.body.decode()
    if content_type == "application/json":
        assert set(result.json()["error"]) == {"message", "type", "param", "code"}


def test_503_is_nginx_html_and_retry_after_is_sent(mock: MockServer) -> None:
    """503 sends nginx's page byte for byte (protocol.md TV29); retry_after sets the header."""
    result = fault(mock, "503 retry_after=2")
    assert (result.status, result.body) == (503, NGINX_503)
    assert result.header("retry-after") == "2"
    limited = fault(mock, "429 retry_after=0.5")
    assert (limited.status, limited.header("retry-after")) == (429, "0.5")
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_reset_before_headers_is_a_tcp_reset(mock: MockServer) -> None:
    """reset_before_headers: not one byte, then RST."""
    result = fault(mock, "reset_before_headers")
    assert (result.ending, result.head, result.status) == ("reset", b"", 0)


def test_slow_headers_delays_the_first_byte(mock: MockServer) -> None:
    """slow_headers ms=150: nothing for 150 ms, then a normal stream."""
    result = fault(mock, "slow_headers ms=150")
    assert result.first_byte_s is not None
    assert result.first_byte_s >= 0.14
    assert data_events(result.body)[-1] == b"[DONE]"


def test_hang_accepts_and_never_answers(mock: MockServer) -> None:
    """hang: the request is read and nothing is ever sent; the server notices the client
    leaving and logs it."""
    result = fault(mock, "hang", max_s=0.3)
    assert (result.ending, result.head) == ("timeout", b"")
    eventually(lambda: mock.stats()["outcomes"].get("hang") == 1)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_reset_after_n_chunks(mock: MockServer, n: int) -> None:
    """reset after=N: exactly N chunks arrive, then a TCP RST (not a clean close)."""
    result = fault(mock, f"reset after={n}")
    assert result.ending == "reset"
    assert not result.is_complete
    events = data_events(result.body)
    assert len(events) == n
    assert all(e.startswith(b"{") for e in events)


def test_reset_after_bytes_cuts_mid_event(mock: MockServer) -> None:
    """reset after_bytes=B: B body bytes (cut anywhere, even inside a character), then RST."""
    result = fault(mock, "reset after_bytes=700")
    assert result.ending == "reset"
    assert len(result.body) == 700
    stream = read_stream_with(mock, "reset after_bytes=700")
    assert stream.end.state is EndState.TRUNCATED
    assert FULL.startswith(stream.content)


def read_stream_with(mock: MockServer, spec: str, **extra: Any) -> Any:
    with httpx.Client(base_url=mock.url, headers={"Authorization": "Bearer sk"}) as client:
        return read_stream(client, {**CHAT, **extra}, headers={"X-Mock-Fault": spec})


def test_close_after_n_is_clean_but_truncated(mock: MockServer) -> None:
    """close after=N: a clean end of the HTTP body after N chunks: no finish, no [DONE]."""
    result = fault(mock, "close after=4")
    assert result.ending == "eof"
    assert result.is_complete
    assert len(data_events(result.body)) == 4
    assert b'finish_reason":"stop' not in result.body
    assert b"[DONE]" not in result.body
    stream = read_stream_with(mock, "close after=4")
    assert stream.end.state is EndState.TRUNCATED
    assert FULL.startswith(stream.content)
    assert len(stream.content) > 0


@pytest.mark.parametrize("keepalive", [False, True])
def test_stall_then_continue(mock: MockServer, keepalive: bool) -> None:
    """stall after=N ms=S: a silent (or keep-alive only) gap of S ms after N chunks, then
    the rest of the stream."""
    spec = f"stall after=3 ms=200 keepalive={int(keepalive)}"
    result = fault(mock, spec, headers={"X-Mock-Keepalive-Ms": "40"})
    events = data_events(result.body)
    assert events[-1] == b"[DONE]"
    assert b"".join(events).count(b'"finish_reason":"stop"') == 1
    n_keepalives = result.body.count(b": keep-alive\n\n")
    if keepalive:
        assert n_keepalives >= 4
    else:
        assert n_keepalives == 0
        gaps = [b[0] - a[0] for a, b in zip(result.times, result.times[1:], strict=False)]
        assert max(gaps) >= 0.19
    stream = read_stream_with(mock, spec)
    assert stream.content == FULL


@pytest.mark.parametrize("keepalive", [False, True])
def test_stall_forever_until_the_client_leaves(mock: MockServer, keepalive: bool) -> None:
    """stall without ms never ends; the server counts the stream as cancelled once the
    client disconnects."""
    result = fault(
        mock,
        f"stall after=2 keepalive={int(keepalive)}",
        headers={"X-Mock-Keepalive-Ms": "30"},
        max_s=0.3,
    )
    assert result.ending == "timeout"
    assert len(data_events(result.body)) == 2
    assert (result.body.count(b": keep-alive") >= 5) is keepalive
    eventually(lambda: mock.stats()["streams"]["cancelled"] == 1)
    stats = mock.stats()
    assert stats["streams"]["active"] == 0


def test_no_done_keeps_finish_and_usage(mock: MockServer) -> None:
    """no_done: the usage chunk arrives, [DONE] does not."""
    stream = read_stream_with(mock, "no_done")
    assert stream.end.state is EndState.COMPLETE
    assert stream.end.no_done
    assert stream.accumulator.usage is not None
    assert b"[DONE]" not in stream.raw


def test_malformed_chunk(mock: MockServer) -> None:
    """malformed after=N: the (N+1)th event is cut-short JSON; the decoder reports it."""
    result = fault(mock, "malformed after=3")
    events = data_events(result.body)
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[3])
    stream = read_stream_with(mock, "malformed after=3")
    assert stream.end.state is EndState.ERROR
    assert "malformed" in str(stream.end.error)
    assert len(stream.chunks) == 3


def test_error_event_mid_stream(mock: MockServer) -> None:
    """error after=N: `data: {"error":...}` then `data: [DONE]` (protocol.md TV21)."""
    result = fault(mock, "error after=4")
    events = data_events(result.body)
    assert len(events) == 6
    assert json.loads(events[4])["error"]["type"] == "server_error"
    assert events[5] == b"[DONE]"
    stream = read_stream_with(mock, "error after=4")
    assert stream.end.state is EndState.ERROR
    assert stream.content == FULL[: len(stream.content)]


def test_insufficient_system_resource(mock: MockServer) -> None:
    """insufficient after=N: finish_reason insufficient_system_resource with the usage of the
    N-1 tokens sent, then [DONE]."""
    stream = read_stream_with(mock, "insufficient after=6")
    assert stream.end.state is EndState.INTERRUPTED
    assert stream.finish_reason == "insufficient_system_resource"
    assert stream.accumulator.usage is not None
    assert stream.accumulator.usage.completion_tokens == 5
    assert stream.decoder.done
    assert FULL.startswith(stream.content)


def test_done_early_without_finish(mock: MockServer) -> None:
    """done_early after=N: [DONE] with no finish_reason before it: an early end, which the
    core judges truncated (never a silent success)."""
    stream = read_stream_with(mock, "done_early after=3")
    assert stream.decoder.done
    assert stream.end.state is EndState.TRUNCATED
    assert stream.end.ended_early
    assert stream.finish_reason is None


def test_json_body_instead_of_a_stream(mock: MockServer) -> None:
    """json_body: stream:true answered by a whole chat.completion (application/json);
    sse=1 sends it as text/event-stream with [DONE] appended (protocol.md TV27)."""
    result = fault(mock, "json_body")
    assert result.header("content-type") == "application/json"
    assert result.json()["object"] == "chat.completion"
    assert result.json()["choices"][0]["message"]["content"] == FULL
    sse = fault(mock, "json_body sse=1")
    assert sse.header("content-type") == "text/event-stream; charset=utf-8"
    assert sse.body.startswith(b"{")
    assert sse.body.endswith(b"}\n\ndata: [DONE]\n\n")
    stream = read_stream_with(mock, "json_body sse=1")
    assert stream.end.state is EndState.COMPLETE
    assert stream.content == FULL


def test_json_blank(mock: MockServer) -> None:
    """json_blank: json_object mode answering only spaces (protocol.md §1.12)."""
    messages = [{"role": "user", "content": "answer in json"}]
    body = {
        "model": "deepseek-chat",
        "messages": messages,
        "response_format": {"type": "json_object"},
    }
    result = fault(mock, "json_blank", body)
    content = result.json()["choices"][0]["message"]["content"]
    expected = answer_text("deepseek-chat", messages, config=MOCK_CONFIG, json_object=True)[1]
    assert content == " " * len(expected)


def test_keepalive_storm(mock: MockServer) -> None:
    """keepalive_storm n=7: seven keep-alive comments before every chunk."""
    result = fault(mock, "keepalive_storm n=7")
    n_events = len(data_events(result.body))
    assert result.body.count(b": keep-alive\n\n") == 7 * n_events
    assert read_stream_with(mock, "keepalive_storm n=7").content == FULL


def test_split_utf8_cuts_every_multibyte_character(mock: MockServer) -> None:
    """split_utf8: each write ends right after the lead byte of a multi-byte character, so
    every such character is cut between two writes."""
    result = fault(mock, "split_utf8")
    pieces = result.pieces
    assert len(pieces) > 20
    lead = range(0xC0, 0xF8)
    for piece in pieces[:-1]:
        assert piece[-1] in lead
        assert not any(b in lead for b in piece[:-1])
    assert read_stream_with(mock, "split_utf8 gap_ms=1").content == FULL


def test_one_byte_writes(mock: MockServer) -> None:
    """one_byte: every write is a single byte; the answer still decodes whole."""
    result = fault(mock, "one_byte", headers={"X-Mock-Tokens": "8"})
    assert result.pieces
    assert {len(p) for p in result.pieces} == {1}
    expected = answer_text("deepseek-chat", MESSAGES, n_tokens=8, config=MOCK_CONFIG)[1]
    with httpx.Client(base_url=mock.url, headers={"Authorization": "Bearer sk"}) as client:
        stream = read_stream(
            client, CHAT, headers={"X-Mock-Fault": "one_byte", "X-Mock-Tokens": "8"}
        )
    assert stream.content == expected


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ("crlf", lambda b: b"\r\n\r\n" in b and b.count(b"\n") == b.count(b"\r\n")),
        ("cr", lambda b: b"\n" not in b and b"\r\r" in b),
        ("nospace", lambda b: b"data: " not in b and b.startswith(b"data:{")),
        ("bom", lambda b: b.startswith(b"\xef\xbb\xbfdata: {")),
    ],
)
def test_framing_variants(mock: MockServer, spec: str, check: Callable[[bytes], bool]) -> None:
    """CRLF / CR line ends, `data:` without a space and a leading BOM; each decodes whole."""
    result = fault(mock, spec)
    assert check(result.body)
    stream = read_stream_with(mock, spec)
    assert stream.end.state is EndState.COMPLETE
    assert stream.content == FULL


def test_combined_faults(mock: MockServer) -> None:
    """Faults combine: CRLF framing and a reset after 7 chunks."""
    result = fault(mock, "crlf; reset after=7")
    assert result.ending == "reset"
    assert len(data_events(result.body, b"\r\n")) == 7


def test_times_heals_after_k_attempts_of_the_same_request(mock: MockServer) -> None:
    """`times=K` applies to the first K attempts with the same fault key, then heals; another
    conversation (or X-Mock-Fault-Key) is another key."""
    statuses = [fault(mock, "503 times=2").status for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    other = {**CHAT, "messages": [{"role": "user", "content": "another"}]}
    assert fault(mock, "503 times=2", other).status == 503
    keyed = [
        fault(mock, "503 times=1", headers={"X-Mock-Fault-Key": "k1"}).status for _ in range(2)
    ]
    assert keyed == [503, 200]
    # A resumed request (trailing prefix) shares the key of the original request.
    prefix = {
        **CHAT,
        "messages": [*MESSAGES, {"role": "assistant", "content": FULL[:5], "prefix": True}],
    }
    assert fault(mock, "reset after=2 times=1").ending == "reset"
    resumed = raw_exchange(
        mock.url,
        prefix,
        path="/beta/chat/completions",
        headers={"X-Mock-Fault": "reset after=2 times=1"},
    )
    assert resumed.ending == "eof"
    assert resumed.status == 200


def test_for_ms_heals_after_a_time(mock: MockServer) -> None:
    """`for_ms=T` applies while the fault key was first seen less than T ms ago."""
    started = time.monotonic()
    assert fault(mock, "503 for_ms=150").status == 503
    while fault(mock, "503 for_ms=150").status == 503:
        assert time.monotonic() - started < 5
    assert time.monotonic() - started >= 0.15


def test_fault_counters_and_log(mock: MockServer) -> None:
    """Injected faults are counted by kind and logged with the request."""
    fault(mock, "429")
    fault(mock, "reset after=2")
    fault(mock, "crlf; no_done")
    stats = mock.stats()
    assert stats["faults"] == {"429": 1, "crlf": 1, "no_done": 1, "reset": 1}
    assert stats["requests"]["POST /chat/completions"] == {"200": 2, "429": 1}
    log = mock.log()
    assert [e["faults"] for e in log] == [["429"], ["reset"], ["crlf", "no_done"]]
    assert [e["outcome"] for e in log] == ["429", "reset", "ok"]
    assert all(e["fault_key"] for e in log)


_CREATED = re.compile(rb'"created":\d+')


def test_faults_on_non_stream_requests(mock: MockServer) -> None:
    """On a non-stream request: reset/close cut the body, malformed ends it early, error is
    an error object at 200, insufficient cuts the answer, stall delays the body (with blank
    lines when keepalive=1)."""
    body = {**CHAT, "stream": False}
    whole = raw_exchange(mock.url, body).body
    reset = fault(mock, "reset after_bytes=100", body)
    assert (reset.ending, len(reset.body)) == ("reset", 100)
    # Another id, and across a second's boundary another `created`.
    same = whole[:100].replace(whole[7:43], reset.body[7:43])
    assert _CREATED.sub(b"", reset.body) == _CREATED.sub(b"", same)
    cut = fault(mock, "close", body)
    assert (cut.ending, cut.is_complete) == ("eof", True)
    assert abs(len(cut.body) - len(whole) // 2) <= 2  # half (cache-hit digits may differ)
    assert fault(mock, "reset", body).ending == "reset"
    malformed = fault(mock, "malformed", body)
    assert malformed.is_complete
    with pytest.raises(ValueError, match=r"decode|Expecting|Unterminated"):
        json.loads(malformed.body)
    error = fault(mock, "error", body)
    assert (error.status, error.json()["error"]["code"]) == (200, "internal_error")
    short = fault(mock, "insufficient after=4", body).json()
    assert short["choices"][0]["finish_reason"] == "insufficient_system_resource"
    assert short["usage"]["completion_tokens"] == 3
    assert FULL.startswith(short["choices"][0]["message"]["content"])
    stalled = fault(mock, "stall ms=150 keepalive=1", body, headers={"X-Mock-Keepalive-Ms": "40"})
    assert stalled.body.startswith(b"\n\n\n")
    assert json.loads(stalled.body)["choices"][0]["message"]["content"] == FULL
    assert stalled.times[-1][0] >= 0.15
    silent = fault(mock, "stall ms=120", body)
    assert silent.first_byte_s is not None
    assert silent.first_byte_s < 0.1  # headers, then nothing until the body
    assert silent.times[-1][0] >= 0.12
    forever = fault(mock, "stall", body, max_s=0.2)
    assert (forever.ending, forever.status, forever.body) == ("timeout", 200, b"")
    storm = fault(mock, "keepalive_storm n=3; bom", body)
    assert storm.body.startswith(b"\xef\xbb\xbf\n\n\n{")


def test_hang_and_slow_headers_on_server_wide_rules() -> None:
    """Server-wide rules take every fault of the grammar, with their times budget."""
    config = MockConfig(faults=(FaultRule("slow_headers ms=100; 503 times=1", first_requests=2),))
    with MockServer(config) as server:
        first = raw_exchange(server.url, CHAT)
        second = raw_exchange(server.url, CHAT)
        third = raw_exchange(server.url, CHAT)
    assert first.status == 503
    assert first.first_byte_s is not None
    assert first.first_byte_s >= 0.1
    assert second.status == 200  # same key: the 503 healed, the delay did not
    assert second.first_byte_s is not None
    assert second.first_byte_s >= 0.1
    assert third.status == 200
    assert third.first_byte_s is not None
    assert third.first_byte_s < 0.1
