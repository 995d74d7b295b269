"""The SDK snippets of the README, docs/websocket.md and docs/cache.md run as written
against a real gateway and mock (only their loopback addresses are swapped for the test
servers' ports), and print what the text says they print."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from unbroken import Client
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import GatewaySettings, Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def snippet(path: str, heading: str) -> str:
    """The first python block after `heading` in `path`."""
    text = (ROOT / path).read_text(encoding="utf-8")
    start = text.index(heading + "\n")
    found = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert found is not None, (path, heading)
    return found.group(1)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    """(mock URL, gateway URL)."""
    with MockServer(MockConfig(seed=23)) as mock:
        settings = Settings(api_key="sk-test", base_url=mock.url, gateway=GatewaySettings())
        with ServerThread(create_app(settings), lifespan="on", ws="websockets-sansio") as gw:
            yield mock.url, gw.url


def run(code: str, servers: tuple[str, str]) -> None:
    mock_url, gateway_url = servers
    code = code.replace("http://127.0.0.1:8788", gateway_url)
    code = code.replace("http://127.0.0.1:8787", mock_url)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})  # noqa: S102 - our own docs


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Relative paths of a snippet (answers.db) land in a temporary directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_websocket_and_cache(
    servers: tuple[str, str], in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's snippet: the second identical request is a cache hit."""
    run(snippet("README.md", "### Over a WebSocket, and from a cache"), servers)
    assert capsys.readouterr().out == "None hit\n"
    assert (in_tmp / "answers.db").exists()


def test_websocket_doc_sdk_snippet(
    servers: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/websocket.md: the two answers over one connection are the HTTP answers."""
    run(snippet("docs/websocket.md", "## From the SDK"), servers)
    out = capsys.readouterr().out
    with Client(api_key="my-gateway-key", base_url=servers[1] + "/v1") as http:
        expected = [
            http.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": q}]
            )
            .choices[0]
            .message.content
            for q in ("Which sizes?", "Which colours?")
        ]
    assert out == f"{expected[0]}\n{expected[1]}\n"
    assert all(expected)


def test_cache_doc_sdk_snippet(
    servers: tuple[str, str], in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/cache.md: a hit, then a stale stand-in while the upstream is unreachable."""
    run(snippet("docs/cache.md", "## In the SDK"), servers)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "hit"
    assert out[1].startswith("stale instead of: ")
    assert "127.0.0.1" in out[1] or "connect" in out[1]
