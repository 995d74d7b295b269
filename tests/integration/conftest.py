"""Fixtures of the integration tests: one mock DeepSeek for the session, reset per test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from unbroken.mock import MockConfig, MockServer

# The seed of the session's mock; tests compute expected answers with the same config.
MOCK_CONFIG = MockConfig(seed=5)


@pytest.fixture(scope="session")
def mock_server() -> Iterator[MockServer]:
    """The mock DeepSeek on a free loopback port, shared by the session."""
    with MockServer(MOCK_CONFIG) as server:
        yield server


@pytest.fixture
def mock(mock_server: MockServer) -> MockServer:
    """The session's mock with its counters, log, fault keys and cache reset."""
    mock_server.reset()
    return mock_server


@pytest.fixture
def api(mock: MockServer) -> Iterator[httpx.Client]:
    """An httpx client for the (reset) mock, with a Bearer key."""
    with httpx.Client(
        base_url=mock.url, headers={"Authorization": "Bearer sk-test"}, timeout=10.0
    ) as client:
        yield client
