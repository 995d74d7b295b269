"""Loopback servers for integration tests, and readers for what they send.

`serve(app)` runs any ASGI app under uvicorn in a background thread on a free 127.0.0.1 port
(the same `ServerThread` that `MockServer` uses). `read_stream` reads a chat stream through
the core's `ChatStreamDecoder` and `ChunkAccumulator`; `raw_exchange` speaks HTTP/1.1 over a
bare socket so a test can tell a TCP reset from a clean close and see every byte.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from unbroken.core import ChatStreamDecoder, ChunkAccumulator, StreamEnd, classify_end
from unbroken.core.wire import ChatCompletionChunk
from unbroken.mock.server import ServerThread

__all__ = ["RawResult", "StreamRead", "raw_exchange", "read_stream", "serve"]

AUTH = {"Authorization": "Bearer sk-test"}


@contextmanager
def serve(app: Callable[..., Any], **uvicorn_options: Any) -> Iterator[ServerThread]:
    """Serve `app` on a free loopback port for the duration of the block."""
    with ServerThread(app, "127.0.0.1", 0, **uvicorn_options) as server:
        yield server


@dataclass
class StreamRead:
    """What a chat stream delivered, decoded by the core."""

    status: int
    headers: httpx.Headers
    raw: bytes
    reads: list[bytes]
    chunks: list[ChatCompletionChunk]
    accumulator: ChunkAccumulator
    decoder: ChatStreamDecoder
    end: StreamEnd
    error: Exception | None = None

    @property
    def content(self) -> str:
        """The answer text of choice 0."""
        return self.accumulator.content(0)

    @property
    def reasoning(self) -> str:
        """The reasoning of choice 0."""
        return self.accumulator.reasoning(0)

    @property
    def finish_reason(self) -> str | None:
        """The finish_reason of choice 0."""
        return self.accumulator.finish_reason(0)


def read_stream(
    client: httpx.Client,
    body: Mapping[str, Any],
    *,
    path: str = "/chat/completions",
    headers: Mapping[str, str] | None = None,
) -> StreamRead:
    """POST `body` and read the whole answer (stream or not) through the core's decoder.

    Transport errors (a reset, a truncated chunked body) end the read and are kept in
    `error`; what arrived before them is decoded.
    """
    decoder = ChatStreamDecoder()
    accumulator = ChunkAccumulator()
    chunks: list[ChatCompletionChunk] = []
    reads: list[bytes] = []
    error: Exception | None = None
    with client.stream("POST", path, json=dict(body), headers=dict(headers or {})) as response:
        try:
            for data in response.iter_raw():
                reads.append(data)
                for chunk in decoder.feed(data):
                    chunks.append(chunk)
                    accumulator.feed(chunk)
        except httpx.TransportError as exc:
            error = exc
        for chunk in decoder.flush():
            chunks.append(chunk)
            accumulator.feed(chunk)
        return StreamRead(
            status=response.status_code,
            headers=response.headers,
            raw=b"".join(reads),
            reads=reads,
            chunks=chunks,
            accumulator=accumulator,
            decoder=decoder,
            end=classify_end(accumulator, decoder),
            error=error,
        )


@dataclass
class RawResult:
    """One HTTP/1.1 exchange over a bare socket.

    Attributes:
        status: the status code (0 when no status line arrived).
        head: the status line and headers, as received.
        body: the body, with chunked transfer coding removed (as far as it arrived).
        ending: `eof` (the server closed cleanly), `reset` (TCP RST) or `timeout`.
        is_complete: the body ended as HTTP says it should (last chunk or full length).
        first_byte_s: seconds from sending the request to the first byte received.
        times: (seconds since the request, bytes) for every read.
        pieces: the body as the server wrote it: one item per HTTP chunk (one per write).
    """

    status: int
    head: bytes
    body: bytes
    ending: Literal["eof", "reset", "timeout"]
    is_complete: bool
    first_byte_s: float | None
    times: list[tuple[float, bytes]] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        """A response header (case-insensitive), or None."""
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


def _dechunk(data: bytes) -> tuple[list[bytes], bool]:
    """The payloads of the chunks of a chunked body (the last one maybe cut short), and
    whether the terminating zero-size chunk arrived."""
    pieces: list[bytes] = []
    position = 0
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            return pieces, False
        size = int(data[position:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return pieces, True
        start = end + 2
        pieces.append(data[start : start + size])
        if start + size + 2 > len(data):
            return pieces, False
        position = start + size + 2


def raw_exchange(
    base_url: str,
    body: Mapping[str, Any] | bytes,
    *,
    path: str = "/chat/completions",
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    max_s: float | None = None,
) -> RawResult:
    """Send one request over a fresh socket (`Connection: close`) and read until the server
    closes, resets, `timeout_s` passes without a byte, or `max_s` passes in all (then the
    client closes; the ending is `timeout`)."""
    parts = urlsplit(base_url)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        "Connection: close",
        f"Content-Length: {len(payload)}",
        "Content-Type: application/json",
    ]
    lines += [f"{k}: {v}" for k, v in {**AUTH, **(headers or {})}.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
    received = bytearray()
    times: list[tuple[float, bytes]] = []
    ending: Literal["eof", "reset", "timeout"]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sent = time.monotonic()
        sock.sendall(request)
        while True:
            if max_s is not None:
                left = max_s - (time.monotonic() - sent)
                if left <= 0:
                    ending = "timeout"
                    break
                sock.settimeout(min(timeout_s, left))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                ending = "reset"
                break
            except TimeoutError:
                ending = "timeout"
                break
            if not data:
                ending = "eof"
                break
            times.append((time.monotonic() - sent, data))
            received += data
    raw = bytes(received)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        pieces, is_complete = _dechunk(rest)
        body_bytes = b"".join(pieces)
    else:
        pieces = [rest]
        body_bytes = rest
        length = None
        for line in lowered.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        is_complete = length is not None and len(rest) == length
    return RawResult(
        status=status,
        head=head,
        body=body_bytes,
        ending=ending,
        is_complete=is_complete,
        first_byte_s=times[0][0] if times else None,
        times=times,
        pieces=pieces,
    )
