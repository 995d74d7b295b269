"""The gateway's upstream transport through a real proxy on loopback: an https upstream
through a CONNECT tunnel (TLS inside it, proxy credentials sent), a plain-http upstream
in absolute form through HTTP_PROXY, NO_PROXY bypassing the proxy, and a proxy that
refuses the tunnel reported without its credentials. All from environment variables."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.servers import read_stream
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread, answer_text
from unbroken.mock.app import create_app as create_mock_app
from unbroken.settings import Settings

pytestmark = pytest.mark.integration

trustme = pytest.importorskip("trustme")

MOCK = MockConfig(seed=13, answer_tokens=(10, 20))
MESSAGES = [{"role": "user", "content": "Through the proxy, please."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}


class ConnectProxy:
    """A tiny HTTP proxy on loopback: CONNECT tunnels and absolute-form forwarding, run on
    its own event loop in a thread. Records each request line and Proxy-Authorization."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.lines: list[str] = []
        self.authorizations: list[str | None] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, OSError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        self.lines.append(lines[0])
        auth = [
            v.strip()
            for k, _, v in (h.partition(":") for h in lines[1:])
            if k.lower() == "proxy-authorization"
        ]
        self.authorizations.append(auth[0] if auth else None)
        method, target, _ = lines[0].split(" ", 2)
        if self.refuse:
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            writer.close()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target)
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
            kept = [line for line in lines if not line.lower().startswith("proxy-authorization")]
            up_writer.write("\r\n".join(kept).encode("latin-1"))
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Closed on this loop before it closes: a writer collected after that warns
            # ("loop is closed"), and the warning failed a test that ran later.
            for writer in self._writers:
                writer.close()
            await asyncio.sleep(0)  # the transports' close callbacks run

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def tls_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The mock DeepSeek over https (a throwaway CA), and the CA's certificate file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    chain, ca_file = folder / "server.pem", folder / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(ca_file))
    app = create_mock_app(MOCK)
    with ServerThread(app, ssl_certfile=str(chain), ssl_keyfile=str(chain)) as server:
        yield f"https://127.0.0.1:{server.port}", ca_file


@pytest.fixture
def trusted(tls_mock: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> str:
    """The https mock's URL, with its CA trusted the standard way (SSL_CERT_FILE)."""
    url, ca_file = tls_mock
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return url


def answer_through(env: dict[str, str]) -> str:
    settings = Settings.from_env({"DEEPSEEK_API_KEY": "sk-up", **env})
    with (
        ServerThread(create_app(settings), lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=20) as client,
    ):
        read = read_stream(client, BODY, path="/v1/chat/completions")
    assert read.status == 200, read.raw[:300]
    return read.content


def expected() -> str:
    return answer_text("deepseek-chat", MESSAGES, config=MOCK)[1]


def test_https_upstream_through_a_connect_tunnel(trusted: str) -> None:
    """HTTPS_PROXY: the gateway opens a CONNECT tunnel (with the proxy's credentials) and
    speaks TLS to the upstream inside it; the whole answer arrives."""
    with ConnectProxy() as proxy:
        host_port = trusted.removeprefix("https://")
        got = answer_through(
            {
                "UNBROKEN_BASE_URL": trusted,
                "HTTPS_PROXY": f"http://ops:p%40ss@127.0.0.1:{proxy.port}",
            }
        )
    assert got == expected()
    assert proxy.lines[0] == f"CONNECT {host_port} HTTP/1.1"
    assert proxy.authorizations[0] == "Basic " + base64.b64encode(b"ops:p@ss").decode()


def test_plain_http_upstream_through_http_proxy() -> None:
    """HTTP_PROXY (lower case works too): a plain-http upstream is asked in absolute form."""
    with MockServer(MOCK) as mock, ConnectProxy() as proxy:
        got = answer_through({"UNBROKEN_BASE_URL": mock.url, "http_proxy": proxy.url})
        paths = sorted(entry["path"] for entry in mock.log())
    assert got == expected()
    assert proxy.lines == [f"POST {mock.url}/chat/completions HTTP/1.1"]
    assert paths == ["/chat/completions"]


def test_no_proxy_bypasses_the_proxy(trusted: str) -> None:
    """A host in NO_PROXY is reached directly."""
    with ConnectProxy() as proxy:
        got = answer_through(
            {
                "UNBROKEN_BASE_URL": trusted,
                "HTTPS_PROXY": proxy.url,
                "NO_PROXY": "localhost,127.0.0.1",
            }
        )
    assert got == expected()
    assert proxy.lines == []


def test_a_refusing_proxy_is_a_clear_error_without_its_credentials(trusted: str) -> None:
    """A proxy that refuses CONNECT: the client gets a 502 naming the proxy's address and
    status, never its password."""
    with ConnectProxy(refuse=True) as proxy:
        settings = Settings.from_env(
            {
                "DEEPSEEK_API_KEY": "sk-up",
                "UNBROKEN_BASE_URL": trusted,
                "HTTPS_PROXY": f"http://ops:hunter2@127.0.0.1:{proxy.port}",
                "UNBROKEN_GATEWAY_RETRY_ATTEMPTS": "2",
                "UNBROKEN_GATEWAY_RETRY_WAIT_MAX_S": "0.05",
            }
        )
        with (
            ServerThread(create_app(settings), lifespan="on") as server,
            httpx.Client(base_url=server.url, timeout=20) as client,
        ):
            response = client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert f"127.0.0.1:{proxy.port}" in message
    assert "403" in message
    assert "hunter2" not in response.text
