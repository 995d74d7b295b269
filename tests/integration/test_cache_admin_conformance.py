"""The answer cache's admin endpoints against the OpenAPI document, fuzzed by schemathesis
with every check and an admin key on a gateway with a cache (the main conformance run uses
a user key, which only ever gets 403 there)."""

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
from unbroken.settings import CacheSettings, GatewaySettings, KeySettings, Settings, hash_key

pytest.importorskip("schemathesis")

pytestmark = pytest.mark.integration

ADMIN = "sk-gw-cache-admin-0123456789"
MAX_TIME_S = 40


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServerThread]:
    with MockServer(MockConfig(seed=3, answer_tokens=(3, 6))) as upstream:
        settings = Settings(
            api_key="sk-up",
            base_url=upstream.url,
            gateway=GatewaySettings(
                keys=(KeySettings("ops", hash_key(ADMIN), role="admin"),),
                cache=CacheSettings(store="memory", serve_models=("deepseek-chat",)),
            ),
        )
        with ServerThread(create_app(settings), lifespan="on") as server:
            yield server


def test_cache_admin_endpoints_conform_to_the_openapi_document(
    gateway: ServerThread, tmp_path: Path
) -> None:
    """`schemathesis run --checks all` on the /v1/cache operations, as an admin, reports no
    failure: every answer (200 with what was removed, or a typed 4xx) matches the document."""
    binary = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert binary is not None
    result = subprocess.run(
        [
            binary,
            "run",
            f"{gateway.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN}",
            "--include-path-regex",
            "^/v1/cache",
            "--checks",
            "all",
            "--max-examples",
            "10",
            "--max-time",
            str(MAX_TIME_S),
            "--seed",
            "1",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=MAX_TIME_S + 120,
        cwd=tmp_path,
        check=False,
    )
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    cases = next(line for line in result.stdout.splitlines() if " generated" in line)
    assert "passed" in cases, summary
    assert "failed" not in cases, summary
    assert "errored" not in cases, summary
    # The three cache operations were selected and run, nothing else.
    assert "Tested: 3" in result.stdout, summary
