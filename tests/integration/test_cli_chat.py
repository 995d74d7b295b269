"""`unbroken chat` driven through a real pseudo-terminal (typing, Ctrl+C mid-answer, commands,
resuming a saved session) and `unbroken ask` piped; both on the built-in mock (no key)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from unbroken.mock import MockConfig, answer_text
from unbroken.sessions import SQLiteSessionStore

pytestmark = pytest.mark.integration

PROMPT = "you ›"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
    env.update({"HOME": str(tmp_path), "COLUMNS": "120", "TERM": "xterm", "PYTHONUNBUFFERED": "1"})
    return env


def _chat(tmp_path: Path, *args: str) -> pexpect.spawn[str]:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "unbroken.cli", "chat", "--store", str(tmp_path / "s.db"), *args],
        env=_env(tmp_path),
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 120),
    )
    child.expect("mock DeepSeek")
    child.expect(r"session (sess_[0-9a-f]+)")
    return child


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text).replace("\r", "")


def test_chat_answers_stops_on_ctrl_c_and_resumes_a_session(tmp_path: Path) -> None:
    """Typing a question streams the answer; Ctrl+C stops a long answer but not the
    program; /cost works; the saved session resumes in a new process."""
    child = _chat(tmp_path, "--mock-token-ms", "5")
    assert isinstance(child.match, re.Match)
    session_id = child.match.group(1)
    child.expect(PROMPT)
    child.sendline("hello there")
    child.expect("first token")
    expected = answer_text(
        "deepseek-chat", [{"role": "user", "content": "hello there"}], config=MockConfig()
    )[1]
    shown = _plain(str(child.before))
    assert expected[:20] in shown
    child.expect(PROMPT)
    child.sendline("/cost")
    child.expect(r"completion tokens · \$")
    child.expect(PROMPT)
    child.close(force=True)

    # A slow answer, stopped with Ctrl+C mid-stream.
    slow = _chat(tmp_path, "--mock-token-ms", "400", "--session", session_id)
    slow.expect(PROMPT)
    slow.sendline("tell me more")
    slow.expect("tell me more")
    history = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "tell me more"},
    ]
    more = answer_text("deepseek-chat", history, config=MockConfig())[1]
    first = more.lstrip()[:3]  # the answer's own first characters are on screen
    assert len(first.strip()) == 3
    slow.expect_exact(first, timeout=10)
    slow.sendintr()
    slow.expect("stopped")
    slow.expect(PROMPT)
    slow.sendline("/exit")
    slow.expect(pexpect.EOF)
    slow.close()
    assert slow.exitstatus == 0

    _, messages = SQLiteSessionStore(tmp_path / "s.db").load(session_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the stopped turn is not kept


def test_chat_commands(tmp_path: Path) -> None:
    """/help, /model, /system, /sessions, /new and an unknown command."""
    child = _chat(tmp_path, "--mock-token-ms", "0")
    child.expect(PROMPT)
    for command, reply in [
        ("/help", "Ctrl\\+C stops"),
        ("/model deepseek-reasoner", "model: deepseek-reasoner"),
        ("/system be terse", "system prompt set"),
        ("/nope", "unknown command"),
        ("/new", "new session sess_"),
        ("/sessions", "messages"),
        ("/reasoning", "no reasoning"),
        ("/retry", "nothing to retry"),
    ]:
        child.sendline(command)
        child.expect(reply)
        child.expect(PROMPT)
    child.sendline("why?")
    child.expect("thought")  # the reasoner's reasoning is collapsed to one line
    child.expect(PROMPT)
    child.sendline("/reasoning")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)


def test_ask_piped_prints_plain_text(tmp_path: Path) -> None:
    """`unbroken ask` piped prints only the answer text, exactly."""
    done = subprocess.run(
        [sys.executable, "-m", "unbroken.cli", "ask", "What is a stream?"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = answer_text(
        "deepseek-chat", [{"role": "user", "content": "What is a stream?"}], config=MockConfig()
    )[1]
    assert done.stdout == expected + "\n"
    assert "mock DeepSeek" in done.stderr


def test_ask_json(tmp_path: Path) -> None:
    """--json prints the whole completion with unbroken's meta."""
    done = subprocess.run(
        [sys.executable, "-m", "unbroken.cli", "ask", "--json", "hi"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"object":"chat.completion"' in done.stdout
    assert '"unbroken":' in done.stdout
