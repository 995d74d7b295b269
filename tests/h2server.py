"""A tiny HTTP/2-only chat server over TLS on loopback (the `h2` state machine and a
`trustme` certificate), so a test can see that a client really speaks HTTP/2: it offers only
`h2` in ALPN and parses only HTTP/2 frames, so an HTTP/1.1 client fails against it."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from pathlib import Path
from types import TracebackType

import h2.config
import h2.connection
import h2.events
import trustme

__all__ = ["ANSWER", "H2ChatServer"]

# What every request is answered with, in pieces (one SSE chunk each).
ANSWER = ("Hello over ", "HTTP/2, ", "世界 🚀")


def _sse() -> bytes:
    out = []
    for i, piece in enumerate(ANSWER):
        delta: dict[str, str] = {"content": piece}
        if i == 0:
            delta["role"] = "assistant"
        chunk = {
            "id": "h2",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "deepseek-chat",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        out.append(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n")
    last = {
        "id": "h2",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    out.append(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n")
    return "".join(out).encode()


class H2ChatServer:
    """Serves `POST .../chat/completions` with ANSWER as an SSE stream, over HTTP/2 only.

    Attributes:
        ca_path: the PEM of the CA that signed its certificate (point SSL_CERT_FILE at it).
        url: the base URL.
        protocols: the ALPN protocol of each connection (None: none agreed).
        paths: the `:path` of each request.
    """

    def __init__(self, tmp: Path) -> None:
        ca = trustme.CA()
        self.ca_path = tmp / "h2-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self._ctx)
        self._ctx.set_alpn_protocols(["h2"])
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"
        self.protocols: list[str | None] = []
        self.paths: list[str] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> H2ChatServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # shutdown wakes the thread blocked in accept(); close alone may not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as conn:
                self.protocols.append(conn.selected_alpn_protocol())
                h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
                h2c.initiate_connection()
                conn.sendall(h2c.data_to_send())
                while data := conn.recv(65536):
                    for event in h2c.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            headers = {bytes(k): bytes(v) for k, v in event.headers or ()}
                            self.paths.append(headers.get(b":path", b"").decode())
                        elif isinstance(event, h2.events.DataReceived):
                            h2c.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id or 0
                            )
                        elif isinstance(event, h2.events.StreamEnded):
                            sid = event.stream_id or 0
                            h2c.send_headers(
                                sid, [(":status", "200"), ("content-type", "text/event-stream")]
                            )
                            h2c.send_data(sid, _sse(), end_stream=True)
                    conn.sendall(h2c.data_to_send())
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            return  # a client that does not speak HTTP/2 over TLS: it sees the failure
