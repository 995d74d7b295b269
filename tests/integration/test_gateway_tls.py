"""The gateway against a TLS upstream (a test CA from trustme): streams and resumes over
TLS, and a certificate that fails verification (untrusted CA, wrong name) is one clear
502 naming the certificate, with no retry."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests.servers import read_stream
from unbroken.gateway.app import build_upstream, create_app
from unbroken.gateway.upstream import LeanTransport
from unbroken.instrumentation import PrometheusHook
from unbroken.mock import MockConfig, ServerThread, answer_text
from unbroken.mock import create_app as create_mock
from unbroken.settings import GatewaySettings, Settings

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.integration

MOCK = MockConfig(seed=12)
MESSAGES = [{"role": "user", "content": "Tell me about TLS."}]
BODY = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}


@pytest.fixture(scope="module")
def ca() -> Any:
    return trustme.CA()


@contextmanager
def mock_with_cert(ca: Any, folder: Path, *names: str) -> Iterator[str]:
    cert = ca.issue_cert(*names)
    key, chain = folder / "key.pem", folder / "chain.pem"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    with ServerThread(create_mock(MOCK), ssl_keyfile=str(key), ssl_certfile=str(chain)) as server:
        yield f"https://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def tls_mock(ca: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The mock DeepSeek over TLS with a certificate for 127.0.0.1 and localhost."""
    with mock_with_cert(ca, tmp_path_factory.mktemp("tls"), "127.0.0.1", "localhost") as url:
        yield url


def gateway(base_url: str, context: ssl.SSLContext | None) -> ServerThread:
    settings = Settings(
        api_key="sk-up",
        base_url=base_url,
        gateway=GatewaySettings(
            forward_headers=("x-mock-*",), retry_wait_initial_s=0.01, retry_wait_max_s=0.02
        ),
    )
    if context is None:
        return ServerThread(create_app(settings), lifespan="on")
    registry = CollectorRegistry()
    transport = LeanTransport(ssl_context=context)
    upstream = build_upstream(settings, [PrometheusHook(registry)], transport)
    app = create_app(settings, upstream=upstream, registry=registry)
    return ServerThread(app, lifespan="on")


def trusting(ca: Any) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_a_stream_over_tls_arrives_whole(ca: Any, tls_mock: str) -> None:
    """A streamed answer from a TLS upstream arrives whole and ends with [DONE]."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK)
    with gateway(tls_mock, trusting(ca)) as server, httpx.Client(base_url=server.url) as client:
        read = read_stream(client, BODY, path="/v1/chat/completions")
    assert read.status == 200
    assert read.content == content
    assert read.raw.endswith(b"data: [DONE]\n\n")


def test_a_reset_over_tls_is_resumed(ca: Any, tls_mock: str) -> None:
    """A TLS upstream that resets mid-stream is resumed: one answer, no repeat, no gap."""
    _, content = answer_text("deepseek-chat", MESSAGES, config=MOCK)
    headers = {"X-Mock-Fault": "reset after=6 times=1", "X-Mock-Fault-Key": "tls-reset"}
    with gateway(tls_mock, trusting(ca)) as server, httpx.Client(base_url=server.url) as client:
        read = read_stream(client, BODY, path="/v1/chat/completions", headers=headers)
        metrics = client.get("/metrics").text
    assert read.content == content
    assert b'"resumes":1' in read.raw
    assert "unbroken_resumes_total" in metrics


@pytest.mark.parametrize("name", ["untrusted", "wrong_name"])
def test_a_certificate_that_fails_verification_is_one_clear_error(
    ca: Any, tls_mock: str, name: str, tmp_path: Path
) -> None:
    """An untrusted CA or a certificate for another name: a 502 that says so, at once,
    without a retry."""
    with ExitStack() as stack:
        if name == "untrusted":
            base, context = tls_mock, trusting(trustme.CA())
        else:
            other = mock_with_cert(ca, tmp_path, "api.example.test")
            base, context = stack.enter_context(other), trusting(ca)
        server = stack.enter_context(gateway(base, context))
        client = stack.enter_context(httpx.Client(base_url=server.url))
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json=BODY)
        took = time.monotonic() - started
        metrics = client.get("/metrics").text
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_certificate_invalid"
    assert "certificate" in error["message"]
    assert "not retried" in error["message"]
    assert "unbroken_retries_total{" not in metrics
    assert took < 2.0


def test_the_system_trust_store_does_not_know_the_test_ca(tls_mock: str) -> None:
    """With the default transport (system trust), the test CA is refused the same way."""
    with gateway(tls_mock, None) as server, httpx.Client(base_url=server.url) as client:
        response = client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_certificate_invalid"


def test_trustme_is_used_with_files(ca: Any, tmp_path: Path) -> None:
    """The test CA can be written out for SSL_CERT_FILE (how an operator would trust one)."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    context = ssl.create_default_context(cafile=str(path))
    assert context.cert_store_stats()["x509_ca"] >= 1
