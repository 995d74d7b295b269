"""What the sync and async drivers share about one attempt's HTTP exchange: the request
(URL, body, headers, FIM translation), the status and error-body handling, the timer
decisions and the end of the attempt. Only the I/O (send, read, sleep) is theirs.

Callers never see an httpx exception from our API: `map_transport_error` turns each into
ours at this boundary (httpx `map_httpcore_exceptions` style).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import msgspec

from unbroken.client._common import AnswerRun
from unbroken.core.attempt import Attempt, Timeouts
from unbroken.core.backoff import kind_of_status, parse_retry_after
from unbroken.core.flow import AttemptOutcome, PackedMessages
from unbroken.core.routes import Route
from unbroken.core.wire import ChatCompletionChunk, decode_error_body
from unbroken.errors import (
    TimeoutPhase,
    UnbrokenError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeout,
    status_error_class,
)

__all__ = [
    "MAX_ERROR_BODY_BYTES",
    "USER_AGENT",
    "Exchange",
    "attempt_ended",
    "fim_body",
    "map_transport_error",
    "post_request",
    "request_headers",
    "status_error",
]

# Error bodies are read only this far: an HTML page from a proxy can be large, and nothing
# past the first lines helps (protocol.md §4).
MAX_ERROR_BODY_BYTES = 64 * 1024
USER_AGENT = "unbroken/0.1"

# A timer counts as fired when the clock is this close to its expiry (an httpx read
# timeout set from the same expiry ends a hair before it).
_TIMER_SLACK_S = 0.01


def request_headers(route: Route, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers for a request on `route`. The key goes only into Authorization."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream, application/json",
        # The body is read raw into the SSE decoder: a compressed stream must not arrive.
        "Accept-Encoding": "identity",
        "User-Agent": USER_AGENT,
    }
    headers.update(route.headers)
    if extra:
        headers.update(extra)
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key}"
    return headers


def header_pairs(
    url: httpx.URL,
    content: bytes,
    headers: Mapping[str, str],
    *,
    also: tuple[str, str] | None = None,
) -> list[tuple[bytes, bytes]]:
    """The raw headers `httpx.Request("POST", url, content=..., headers=...)` sends, then
    `request.headers[also[0]] = also[1]`: same order and bytes (see `post_request`)."""
    given: list[tuple[bytes, bytes]] = []
    names: list[bytes] = []
    items: Iterable[tuple[object, object]] = headers.items()  # checked as httpx checks them
    for name, value in items:
        # httpx's normalisation: str as ASCII, bytes as they are, any other value refused.
        key = name if isinstance(name, bytes) else name.encode("ascii")  # type: ignore[attr-defined]
        if isinstance(value, str):
            raw = value.encode("ascii")
        elif isinstance(value, bytes):
            raw = value
        else:
            raise TypeError(f"Header value must be str or bytes, not {type(value)}")
        given.append((key, raw))
        names.append(key.lower())
    pairs: list[tuple[bytes, bytes]] = []
    if b"host" not in names and url.host:
        pairs.append((b"Host", url.netloc))
    if not content and b"content-length" not in names and b"transfer-encoding" not in names:
        pairs.append((b"Content-Length", b"0"))  # httpx's automatic one for an empty POST
    pairs += given
    if content and b"content-length" not in names:
        pairs.append((b"Content-Length", str(len(content)).encode("ascii")))
    if also is not None:
        # Headers.__setitem__: the first header of that name takes the value, later ones go.
        also_key, also_value = also[0].encode(), also[1].encode()
        lower = also_key.lower()
        found = [i for i, (name, _) in enumerate(pairs) if name.lower() == lower]
        for i in reversed(found[1:]):
            del pairs[i]
        if found:
            pairs[found[0]] = (also_key, also_value)
        else:
            pairs.append((also_key, also_value))
    return pairs


def post_request(
    url: httpx.URL,
    content: bytes,
    headers: Mapping[str, str],
    timeout: dict[str, float | None],
    *,
    also: tuple[str, str] | None = None,
) -> httpx.Request:
    """The request `httpx.Request("POST", url, content=..., headers=..., extensions=
    {"timeout": timeout})` builds, then `request.headers[also[0]] = also[1]`: the same
    method, URL, headers (same order and bytes), body and extensions, built in a quarter
    of the time (23 -> 5 us: httpx normalises the headers twice and looks each automatic
    one up through its case-insensitive, encoding-detecting mapping; a gateway sends one
    per answer)."""
    request = httpx.Request(
        "POST",
        url,
        headers=header_pairs(url, content, headers, also=also),
        stream=httpx.ByteStream(content),
        extensions={"timeout": timeout},
    )
    request.read()  # `request.content`, as a request made from content has it
    return request


def status_error(
    route: Route, response: httpx.Response, body: bytes, *, now_epoch: float | None = None
) -> UpstreamStatusError:
    """The typed error for an HTTP error response (body already read, bounded): the class
    openai uses for the status (`RateLimitError`...), with `body`, `response` and
    `request_id`."""
    status = response.status_code
    headers = response.headers
    error = decode_error_body(body)
    retry_after = parse_retry_after(
        headers.get("retry-after"),
        headers.get("retry-after-ms"),
        now_epoch=time.time() if now_epoch is None else now_epoch,
    )
    message = error.message or f"HTTP {status}"
    decoded: Any
    try:
        decoded = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        decoded = body.decode("utf-8", "replace")[:2000]
    cls = status_error_class(status)
    return cls(
        f"route {route.name!r} answered HTTP {status}: {message}",
        status_code=status,
        kind=kind_of_status(status, message, error.code),
        error_type=error.type,
        error_code=error.code,
        retry_after_s=retry_after,
        route=route.name,
        body=decoded,
        response=response,
        request_id=headers.get("x-request-id"),
    )


def map_transport_error(exc: Exception, route: Route, *, got_headers: bool) -> UnbrokenError:
    """Our error for an httpx exception raised while talking to `route`."""
    name = route.name
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamTimeout(
            f"timed out connecting to route {name!r}", phase="connect", timeout_s=0.0, route=name
        )
    if isinstance(exc, httpx.TimeoutException) and not got_headers:
        return UpstreamTimeout(
            f"timed out waiting for response headers from route {name!r}",
            phase="headers",
            timeout_s=0.0,
            route=name,
        )
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(
            f"cannot connect to route {name!r}: {_reason(exc)}",
            kind="unreachable" if _is_permanent(exc) else "server_error",
            route=name,
        )
    return UpstreamConnectError(
        f"connection to route {name!r} failed{' mid-stream' if got_headers else ''}: "
        f"{_reason(exc)}",
        kind="server_error",
        route=name,
    )


# Connection failures that retrying the same route cannot fix: a certificate that does not
# verify, a host name that does not resolve.
_PERMANENT_MARKS = (
    "certificate verify failed",
    "certificate_verify_failed",
    "name or service not known",
    "nodename nor servname",
    "no address associated with hostname",
    "name does not resolve",
    "getaddrinfo failed",
)


def _is_permanent(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if isinstance(current, socket.gaierror):
            # EAI_AGAIN ("temporary failure in name resolution") may heal; the rest will not.
            return current.errno != socket.EAI_AGAIN
        if any(mark in str(current).lower() for mark in _PERMANENT_MARKS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: Exception) -> str:
    # httpx messages name the URL at most, never headers, so no key can leak through them.
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# Keys of the chat-shaped body that a FIM request does not take (the flow plans every
# answer as chat; the FIM exchange sends the prompt and the partial answer as one prompt).
_NOT_FIM = frozenset(
    {"messages", "continue_final_message", "add_generation_prompt", "tools", "tool_choice"}
)


def fim_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The `/completions` body for a chat-shaped FIM plan: the prompt is the first user
    message, and a continuation's partial answer (its last assistant message, whatever
    the dialect) is appended to it, so the model writes only the rest."""
    messages = body.get("messages") or []
    prompt = ""
    for message in messages:
        if message.get("role") == "user":
            prompt = str(message.get("content") or "")
            break
    for message in reversed(messages):
        if message.get("role") == "assistant":
            prompt += str(message.get("content") or "")
            break
    fim = {k: v for k, v in body.items() if k not in _NOT_FIM}
    fim["prompt"] = prompt
    return fim


# Request headers `header_pairs` places or replaces itself.
_AUTOMATIC = frozenset({"host", "content-length", "transfer-encoding"})
# Names a request's own headers would replace: those and `request_headers`' defaults.
_REPLACED = _AUTOMATIC | {
    "content-type",
    "accept",
    "accept-encoding",
    "user-agent",
    "authorization",
}


def _fixed_head(
    cache: dict[int, Any], route: Route, url: httpx.URL
) -> tuple[Route, httpx.URL, bytes, bytes, bytes, frozenset[str]] | None:
    """The header lines every request on `route` starts with (Host, the defaults, the
    route's headers), its Authorization line, and the lower-case names of both; None when
    the route's own headers replace a default (then each request is built in full)."""
    fixed = cache.get(id(route))
    # The routes' URLs are made once (`ClientConfig.url`): mostly the same object again.
    if fixed is not None and fixed[0] is route and (fixed[1] is url or fixed[2] == url.netloc):
        return fixed if fixed[3] else None
    own = frozenset(name.lower() for name in route.headers)
    if own & _REPLACED:
        cache[id(route)] = (route, url, url.netloc, b"", b"", own)
        return None
    static = request_headers(route)
    pairs = header_pairs(url, b"-", static)[:-1]  # without its Content-Length
    auth = b""
    if route.api_key:
        name, value = pairs.pop()
        auth = b"%s: %s\r\n" % (name, value)
    prefix = b"".join([b"%s: %s\r\n" % pair for pair in pairs])
    fixed = cache[id(route)] = (route, url, url.netloc, prefix, auth, own | _REPLACED)
    return fixed


# The last timers `Exchange.timeouts` made the extension of (without a read limit), and it.
_LAST_TIMEOUTS: tuple[Timeouts, dict[str, float | None]] | None = None
# `Exchange.head`'s `also` headers: each one's lower-case name and its line.
_ALSO_LINES: dict[tuple[str, str], tuple[str, bytes]] = {}


class Exchange:
    """One attempt's HTTP exchange, as both drivers run it:

        request = exchange.request                 # send it (sync or async)
        failed(exc, now)                           # send raised, or a timer fired
        streaming(response, now)                   # False: read the error body, then
            error_status(body, now)                #   the outcome
        ended(fired, now)                          # the body ended, broke or timed out

    `read_s` is the httpx read timeout of the request (the sync driver bounds the wait for
    headers with it; the async one uses a cancel scope and passes None).
    """

    # The request is built when asked for (`request`, or `content` and `head` for a
    # transport that takes a POST's raw parts): nothing of it stays held for the answer.
    __slots__ = (
        "_also",
        "_body",
        "_read_s",
        "_request",
        "attempt",
        "response",
        "route",
        "run",
        "url",
    )

    def __init__(
        self,
        run: AnswerRun,
        attempt: Attempt,
        *,
        read_s: float | None,
        also: tuple[str, str] | None = None,
    ) -> None:
        self.run = run
        self.attempt = attempt
        route = self.route = attempt.plan.route
        plan = attempt.plan
        config = run.config
        if run.endpoint == "fim":
            # DeepSeek serves FIM under /beta only; other servers at /completions.
            # `auto` counts as DeepSeek's until the route has rejected `/beta`.
            beta = config.route_health(route).dialect(route) == "deepseek"
            url = config.url(route, "/completions", beta=beta)
            self._body = fim_body(plan.body)
        else:
            url = config.url(route, "/chat/completions", beta=plan.beta)
            self._body = plan.body
        if run.query:
            url = url.copy_merge_params(run.query)
        self.url = url
        self._read_s = read_s
        self._also = also
        self._request: httpx.Request | None = None
        self.response: httpx.Response | None = None

    def timeouts(self) -> dict[str, float | None]:
        """httpx's timeout extension of the request: {"connect", "read", "write", "pool"}
        (read only: the one of the same timers is shared)."""
        global _LAST_TIMEOUTS  # a one-entry cache: most answers share the client's timers
        t = self.run.timeouts
        read_s = self._read_s
        last = _LAST_TIMEOUTS
        if last is not None and last[0] is t and read_s is None:
            return last[1]
        connect = t.connect_s if read_s is None or t.connect_s is None else min(t.connect_s, read_s)
        made = {"connect": connect, "read": read_s, "write": t.connect_s, "pool": t.connect_s}
        if read_s is None:
            _LAST_TIMEOUTS = (t, made)
        return made

    def content(self, *, exact: bool = True) -> bytes:
        """The request's JSON body; with `exact=False` maybe in a larger buffer (for a
        caller that copies it at once, into the request's bytes).

        A chat request's messages are packed first (`AnswerRun.pack_messages`: held as
        their JSON while the attempt streams), and that JSON goes into the body as it is:
        the messages are encoded once per attempt, not for the wire and then again to
        pack them (a long conversation's encoding was done twice per answer)."""
        body = self._body
        if body is self.attempt.plan.body:  # (a FIM body is made of it, without messages)
            self.run.pack_messages(self.attempt.plan)
            messages = body.get("messages")
            if type(messages) is PackedMessages:
                body = {**body, "messages": msgspec.Raw(messages)}
        encoded = msgspec.json.encode(body)
        # Exact size: msgspec's buffer is up to 1.5x the JSON.
        return bytes(memoryview(encoded)) if exact else encoded

    def head(self, content: bytes) -> bytes:
        """The request's header lines (`Name: value\\r\\n` each, no blank line after them),
        the bytes `request` would send with `content`."""
        fixed = _fixed_head(self.run.config.heads, self.route, self.url)
        if fixed is not None and content:
            # The route's own lines encoded once; only the request's extra headers per
            # request (~3 us less), when none of them replaces one of the route's.
            _, _, _, prefix, auth, names = fixed
            also = self._also
            also_lower: str | None = None
            also_line = b""
            if also is not None:
                # Its name's lower case and its line, made once per `also` (the engine's
                # is always the same).
                known = _ALSO_LINES.get(also)
                if known is None:
                    known = _ALSO_LINES[also] = (
                        also[0].lower(),
                        f"{also[0]}: {also[1]}\r\n".encode(),
                    )
                also_lower, also_line = known
            lines = [prefix]
            for name, value in self.run.extra_headers.items():
                if type(name) is not str or type(value) is not str:
                    break
                lower = name.lower()
                if lower in names or lower == also_lower:
                    break
                lines.append(f"{name}: {value}\r\n".encode("ascii"))
            else:
                lines += [auth, b"Content-Length: %d\r\n" % len(content), also_line]
                return b"".join(lines)
        pairs = header_pairs(
            self.url, content, request_headers(self.route, self.run.extra_headers), also=self._also
        )
        return b"".join([b"%s: %s\r\n" % pair for pair in pairs])

    @property
    def request(self) -> httpx.Request:
        """The attempt's request as an httpx.Request (built on first use)."""
        if self._request is None:
            self._request = post_request(
                self.url,
                self.content(),
                request_headers(self.route, self.run.extra_headers),
                self.timeouts(),
                also=self._also,
            )
        return self._request

    def failed(self, exc: Exception | None, now: float) -> AttemptOutcome:
        """Sending failed: `exc` from httpx, or None when our own timer cut the wait."""
        attempt = self.attempt
        expiry = attempt.expiry()
        error: UnbrokenError
        if expiry is not None and (exc is None or now >= expiry[0] - _TIMER_SLACK_S):
            error = attempt.timeout_error(expiry[1])  # the headers or deadline timer
        elif exc is None:
            error = attempt.timeout_error("headers")
        else:
            error = map_transport_error(exc, self.route, got_headers=False)
        attempt.finish(now, timed_out=True)
        return self.run.end_attempt(attempt, now, status_code=None, error=error)

    def streaming(self, response: httpx.Response, now: float) -> bool:
        """The headers arrived; True when the body is the answer's stream (200)."""
        self.response = self.run.response = response
        self.attempt.on_headers(now)
        return response.status_code == 200

    def error_status(self, body: bytes, now: float) -> AttemptOutcome:
        """The outcome of an error status, from its (bounded, maybe partial) body."""
        response = self.response
        assert response is not None  # noqa: S101 - streaming() came first
        error = status_error(self.route, response, body[:MAX_ERROR_BODY_BYTES])
        self.attempt.finish(now, timed_out=True)
        return self.run.end_attempt(
            self.attempt, now, status_code=response.status_code, error=error
        )

    def ended(
        self, fired: TimeoutPhase | None, now: float
    ) -> tuple[list[ChatCompletionChunk], AttemptOutcome]:
        """The body ended, broke or a timer fired (`fired`): the last chunks to show and
        the outcome."""
        status = self.response.status_code if self.response is not None else None
        return attempt_ended(self.run, self.attempt, status, fired, now)


def attempt_ended(
    run: AnswerRun, attempt: Attempt, status: int | None, fired: TimeoutPhase | None, now: float
) -> tuple[list[ChatCompletionChunk], AttemptOutcome]:
    """`Exchange.ended` of an exchange whose response had `status` (None: no response)."""
    error = attempt.timeout_error(fired) if fired is not None else None
    # (Not kept: `end_attempt` reads the attempt's fold at once, and the drivers let the
    # attempt go after it.)
    chunks = attempt.finish(now, timed_out=fired is not None, keep=False)
    return chunks, run.end_attempt(attempt, now, status_code=status, error=error)
