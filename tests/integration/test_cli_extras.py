"""Everyday CLI: --version, `python -m unbroken`, `ask -` from stdin, --api-key and
OPENAI_API_KEY for a --base-url, and no hard wrapping when piped."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import unbroken
from unbroken.mock import MockConfig, MockServer, answer_text

pytestmark = pytest.mark.integration

QUESTION = "What is a stream?"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY", "COLUMNS")
    }
    env.update({"HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", **extra})
    return env


def _run(
    tmp_path: Path, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unbroken", *args],
        env=_env(tmp_path, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def keyed() -> Iterator[MockServer]:
    """A mock that accepts one key only."""
    with MockServer(MockConfig(api_keys=frozenset({"sk-good"}))) as server:
        yield server


def test_version(tmp_path: Path) -> None:
    """`python -m unbroken --version` prints the package version."""
    done = _run(tmp_path, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"unbroken {unbroken.__version__}"


def test_ask_reads_the_question_from_stdin(tmp_path: Path) -> None:
    """`ask -` asks what stdin holds (here on the built-in mock)."""
    done = _run(tmp_path, "ask", "-", stdin=QUESTION + "\n")
    assert done.returncode == 0, done.stderr
    _, expected = answer_text("deepseek-chat", [{"role": "user", "content": QUESTION}])
    assert done.stdout == expected + "\n"


def test_ask_with_empty_stdin_is_a_usage_error(tmp_path: Path) -> None:
    """Nothing on stdin: exit 2 with a message, no request."""
    done = _run(tmp_path, "ask", "-", stdin="  \n")
    assert done.returncode == 2
    assert "stdin was empty" in done.stderr


def test_api_key_option_and_openai_api_key(tmp_path: Path, keyed: MockServer) -> None:
    """--api-key, or OPENAI_API_KEY with --base-url, is the key sent; a wrong one fails."""
    _, expected = answer_text("deepseek-chat", [{"role": "user", "content": QUESTION}])
    given = _run(tmp_path, "ask", "--base-url", keyed.url, "--api-key", "sk-good", QUESTION)
    assert given.stdout == expected + "\n", given.stderr
    from_env = _run(tmp_path, "ask", "--base-url", keyed.url, QUESTION, OPENAI_API_KEY="sk-good")
    assert from_env.stdout == expected + "\n", from_env.stderr
    wrong = _run(tmp_path, "ask", "--base-url", keyed.url, QUESTION, OPENAI_API_KEY="sk-bad")
    assert wrong.returncode == 1
    assert "sk-bad" not in wrong.stderr


def test_piped_chat_is_not_hard_wrapped(tmp_path: Path) -> None:
    """Piped, the chat's lines are never cut at a console width: the answer and its own
    messages (here a long model name echoed back) each stay on one line."""
    model = "deepseek-" + "x" * 120
    done = _run(
        tmp_path,
        "chat",
        "--no-store",
        "--mock-token-ms",
        "0",
        stdin=f"{QUESTION}\n/model {model}\n",
    )
    assert done.returncode == 0, done.stderr
    _, expected = answer_text("deepseek-chat", [{"role": "user", "content": QUESTION}])
    assert len(expected) > 80  # a hard wrap would cut it
    assert "\n" not in expected
    (line,) = [line for line in done.stdout.splitlines() if expected[:20] in line]
    assert line.endswith(expected[-20:])  # the whole answer on the one line
    assert any(line.endswith(f"model: {model}") for line in done.stdout.splitlines())
