"""Two gateways on one Redis behind nginx, configured by the very `deploy/nginx.conf` that
compose.yaml uses: requests are spread over both gateways, streams pass through nginx
unbuffered, and keys and usage are shared (a key's usage reads the same through any
gateway)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
import yaml

from tests.nginx import NGINX_TEMPLATE, nginx
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, Settings, hash_key

pytestmark = pytest.mark.integration

KEY = "sk-gw-shared-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Spread me."}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(MockConfig(seed=17, answer_tokens=(20, 24))) as server:
        yield server


def chat_requests(metrics: str) -> float:
    found = re.findall(
        r'^unbroken_gateway_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\S+)',
        metrics,
        re.M,
    )
    return float(found[0]) if found else 0.0


def test_two_gateways_behind_the_shipped_nginx_conf(
    mock: MockServer,
    redis_url: str,
) -> None:
    """Requests through nginx reach both gateways, a stream arrives in pieces over time
    (no buffering), and /v1/usage through nginx counts the requests of both gateways."""
    settings = Settings(
        api_key="sk-up",
        base_url=mock.url,
        gateway=GatewaySettings(
            store=redis_url,
            keys=(KeySettings("shared", hash_key(KEY)),),
            forward_headers=("x-mock-*",),
        ),
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    with ExitStack() as stack:
        gateways = [
            stack.enter_context(ServerThread(create_app(settings), lifespan="on")) for _ in range(2)
        ]
        url = stack.enter_context(nginx([f"127.0.0.1:{g.port}" for g in gateways]))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=20, headers=headers))
        before = client.get("/v1/usage").json()["total"]["requests"]
        for _ in range(6):
            body = {"model": "deepseek-chat", "messages": MESSAGES}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        times = []
        started = time.monotonic()
        streamed = {"model": "deepseek-chat", "messages": MESSAGES, "stream": True}
        with client.stream(
            "POST", "/v1/chat/completions", json=streamed, headers={"X-Mock-Token-Ms": "40"}
        ) as response:
            assert response.status_code == 200
            for data in response.iter_raw():
                times.append((time.monotonic() - started, data))
        usage = client.get("/v1/usage").json()["total"]["requests"]
        per_gateway = [chat_requests(httpx.get(g.url + "/metrics").text) for g in gateways]
    assert all(n >= 2 for n in per_gateway), per_gateway
    assert sum(per_gateway) == 7
    assert usage - before == 7
    raw = b"".join(data for _, data in times)
    assert raw.endswith(b"data: [DONE]\n\n")
    # ~20 tokens 40 ms apart: the first event arrives long before the last one.
    assert len(times) > 5
    assert times[-1][0] - times[0][0] > 0.4


def test_compose_runs_the_same_nginx_conf_with_every_placeholder_filled() -> None:
    """compose.yaml mounts deploy/nginx.conf, substitutes exactly its placeholders, and
    points nginx at gateway services that exist (two of them, on one Redis)."""
    compose = yaml.safe_load((NGINX_TEMPLATE.parents[1] / "compose.yaml").read_text())
    services = compose["services"]
    nginx_service = services["nginx"]
    assert "./deploy/nginx.conf:/etc/unbroken/nginx.conf.template:ro" in nginx_service["volumes"]
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", NGINX_TEMPLATE.read_text()))
    assert placeholders == {"NGINX_WORK", "NGINX_LISTEN", "UNBROKEN_GATEWAYS"}
    command = " ".join(nginx_service["command"])
    assert set(re.findall(r"\$\$([A-Z_]+)", command)) == placeholders
    assert placeholders <= set(nginx_service["environment"])
    backends = re.findall(r"server (\w+):(\d+)", nginx_service["environment"]["UNBROKEN_GATEWAYS"])
    assert [name for name, _ in backends] == ["gateway1", "gateway2"]
    for name, port in backends:
        environment = services[name]["environment"]
        assert environment["UNBROKEN_GATEWAY_PORT"] == port
        assert environment["UNBROKEN_GATEWAY_STORE"].startswith("redis://redis:")
    assert "redis" in services
