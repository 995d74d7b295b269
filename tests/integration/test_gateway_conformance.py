"""The gateway against its own OpenAPI document, fuzzed by schemathesis with every check
(server errors, status codes, content types, headers, response schemas incl. each SSE
event, Allow headers, positive and negative data), bounded in examples and time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, KeySettings, Settings, hash_key

pytest.importorskip("schemathesis")

pytestmark = pytest.mark.integration

KEY = "sk-gw-conformance-0123456789"
# Bounds: a few examples per operation and phase, and a hard time budget for the run.
MAX_EXAMPLES = 5
MAX_TIME_S = 60


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServerThread]:
    with MockServer(MockConfig(seed=1, answer_tokens=(3, 6))) as upstream:
        settings = Settings(
            api_key="sk-up",
            base_url=upstream.url,
            gateway=GatewaySettings(
                keys=(KeySettings("conformance", hash_key(KEY)),),
                sessions_per_minute=100_000,
                retry_wait_initial_s=0.01,
                retry_wait_max_s=0.02,
            ),
        )
        with ServerThread(create_app(settings), lifespan="on") as server:
            yield server


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(
    gateway: ServerThread, tmp_path: Path
) -> None:
    """`schemathesis run --checks all` on /openapi.json reports no failure at all."""
    binary = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert binary is not None
    result = subprocess.run(
        [
            binary,
            "run",
            f"{gateway.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--max-time",
            str(MAX_TIME_S),
            "--seed",
            "1",
            "--request-timeout",
            "20",
            "--no-color",
            # /v1/usage has rules across its fields (start on or before end, at most 93
            # days) that JSON Schema cannot state; its own tests cover them.
            "--exclude-path",
            "/v1/usage",
        ],
        capture_output=True,
        text=True,
        timeout=MAX_TIME_S + 120,
        cwd=tmp_path,
        check=False,
    )
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    # Warnings (operations the fuzzer has no data for, such as a stream id) are not issues;
    # a failed or errored case is.
    cases = next(line for line in result.stdout.splitlines() if " generated" in line)
    assert "passed" in cases, summary
    assert "failed" not in cases, summary
    assert "errored" not in cases, summary
