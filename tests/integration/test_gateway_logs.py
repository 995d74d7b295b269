"""The access log of a real `unbroken serve` process, in text and JSON: one line for every
request of the run (found by its X-Request-ID), every warning or error line carries its
request id, and no secret (gateway keys, the upstream key, a wrong key a client sent)
appears in any line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from unbroken.mock import MockConfig, MockServer
from unbroken.settings import hash_key

pytestmark = pytest.mark.integration

SERVE = "from unbroken.cli import main; main()"
UPSTREAM_KEY = "sk-upstream-very-secret-4f1d9c"
GATEWAY_KEY = "sk-gw-alice-secret-77a0e1"
LIMITED_KEY = "sk-gw-limited-secret-19bb2c"
WRONG_KEY = "sk-wrong-but-still-secret-5c3a"
SECRETS = (UPSTREAM_KEY, GATEWAY_KEY, LIMITED_KEY, WRONG_KEY)
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockServer]:
    with MockServer(
        MockConfig(seed=2, answer_tokens=(4, 8), api_keys=frozenset({UPSTREAM_KEY}))
    ) as server:
        yield server


def start(mock: MockServer, log_format: str, tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "DEEPSEEK_API_KEY": UPSTREAM_KEY,
        "UNBROKEN_GATEWAY_KEYS": f"alice={hash_key(GATEWAY_KEY)}",
        "UNBROKEN_GATEWAY_FORWARD_HEADERS": "x-mock-*",
        "UNBROKEN_GATEWAY_RETRY_WAIT_MAX_S": "0.05",
        "UNBROKEN_GATEWAY_RETRY_ATTEMPTS": "2",
    }
    config_key = f'[[gateway.keys]]\nname = "limited"\nsha256 = "{hash_key(LIMITED_KEY)}"\nrequests_per_minute = 1\n'
    config = tmp_path / "unbroken.toml"
    config.write_text(config_key, encoding="utf-8")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "serve",
            "--port",
            "0",
            "--upstream",
            mock.url,
            "--log-format",
            log_format,
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "unbroken gateway on " not in line:
        _, errors = proc.communicate(timeout=10)
        pytest.fail(f"the gateway did not start: {line!r} {errors}")
    return proc, line.split("unbroken gateway on ")[1].split()[0]


def run_requests(url: str) -> list[tuple[str, int]]:
    """A mixed run: answers, a stream, failures of every kind. Returns (request id, status)."""
    seen: list[tuple[str, int]] = []
    alice = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    body: dict[str, Any] = {"model": "deepseek-chat", "messages": MESSAGES}
    with httpx.Client(base_url=url, timeout=20) as client:
        calls = [
            ("POST", "/v1/chat/completions", body, alice),
            ("POST", "/v1/chat/completions", {**body, "stream": True}, alice),
            ("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {WRONG_KEY}"}),
            ("POST", "/v1/chat/completions", {**body, "model": "nope"}, alice),
            ("POST", "/v1/chat/completions", body, limited),
            ("POST", "/v1/chat/completions", body, limited),  # over its 1 request per minute
            # An upstream that keeps failing: an error after the retries.
            ("POST", "/v1/chat/completions", body, {**alice, "X-Mock-Fault": "503"}),
            ("GET", "/v1/models", None, alice),
            ("GET", "/v1/usage", None, alice),
            ("GET", "/healthz", None, {}),
            ("GET", "/metrics", None, {}),
            ("GET", "/no/such/path", None, {}),
        ]
        for method, path, payload, headers in calls:
            response = client.request(method, path, json=payload, headers=headers)
            seen.append((response.headers["x-request-id"], response.status_code))
    return seen


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_request_has_one_access_line_and_no_secret_is_logged(
    mock: MockServer, log_format: str, tmp_path: Path
) -> None:
    """Each request of the run has exactly one access line with its id, status, key and
    outcome; warning and error lines carry a request id; no secret appears anywhere."""
    proc, url = start(mock, log_format, tmp_path)
    try:
        seen = run_requests(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    output = out + err
    for secret in SECRETS:
        assert secret not in output
        assert hash_key(secret) not in output
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        access = [r for r in records if r["logger"] == "unbroken.access"]
        by_id = {}
        for r in access:
            assert r["request_id"] not in by_id
            by_id[r["request_id"]] = r
        for request_id, status in seen:
            assert request_id in by_id, (
                [i for i, s in enumerate(seen) if s[0] == request_id],
                status,
            )
            assert by_id[request_id]["status"] == status
        assert len(access) == len(seen)
        first = by_id[seen[0][0]]
        assert first["key"] == "alice"
        assert first["model"] == "deepseek-chat"
        assert first["outcome"] == "complete"
        assert first["route"] == "default"
        assert first["attempts"] == 1
        assert first["prompt_tokens"] > 0
        assert first["completion_tokens"] > 0
        assert first["cost_usd"] > 0
        assert "ttft_s" in first
        assert "duration_s" in first
        assert by_id[seen[2][0]]["outcome"] == "rejected"
        assert by_id[seen[2][0]]["error"] == "invalid_api_key"
        assert by_id[seen[5][0]]["error"] == "requests_per_minute_exceeded"
        assert by_id[seen[6][0]]["outcome"] == "error"
        problems = [r for r in records if r["level"] in ("warning", "error", "critical")]
        assert all(r["request_id"] != "-" for r in problems if r["logger"] != "uvicorn.error")
    else:
        access = [line for line in lines if " unbroken.access " in line]
        assert len(access) == len(seen)
        for request_id, status in seen:
            matching = [line for line in access if f"[{request_id}]" in line]
            assert len(matching) == 1
            assert re.search(rf" {status} ", matching[0])
        assert "key=alice model=deepseek-chat route=default outcome=complete" in access[0]
        problems = [
            line for line in lines if re.search(r" (WARNING|ERROR|CRITICAL) unbroken", line)
        ]
        assert all("[-]" not in line for line in problems)
