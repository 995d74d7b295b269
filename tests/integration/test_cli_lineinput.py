"""`unbroken chat` in a real pseudo-terminal with real key sequences: arrow-key editing,
Up-arrow history across runs, multi-line input, Ctrl+C on a half-typed line, Ctrl+D;
/retry replacing the last answer; piped input; and the live token count of `ask` and
`chat` against --max-tokens. All on the built-in mock (no key)."""

from __future__ import annotations

import io
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
LEFT, RIGHT, HOME, END, UP = "\x1b[D", "\x1b[C", "\x1b[H", "\x1b[F", "\x1b[A"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
    env.update(
        {
            "HOME": str(tmp_path),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "COLUMNS": "100",
            "TERM": "xterm",
            "PYTHONUNBUFFERED": "1",
            # pexpect does not answer cursor-position requests; prompt_toolkit's own
            # switch for that case (it would otherwise wait 2 s and print a warning).
            "PROMPT_TOOLKIT_NO_CPR": "1",
        }
    )
    return env


def _spawn(tmp_path: Path, *args: str) -> pexpect.spawn[str]:
    return pexpect.spawn(
        sys.executable,
        ["-m", "unbroken.cli", *args],
        env=_env(tmp_path),
        encoding="utf-8",
        timeout=30,
        dimensions=(30, 100),
    )


def _chat(tmp_path: Path, *args: str) -> tuple[pexpect.spawn[str], str]:
    child = _spawn(tmp_path, "chat", "--store", str(tmp_path / "s.db"), *args)
    child.expect(r"session (sess_[0-9a-f]+)")
    assert isinstance(child.match, re.Match)
    session_id = child.match.group(1)
    child.expect(PROMPT)
    return child, session_id


def _ask(child: pexpect.spawn[str], keys: str) -> None:
    child.send(keys)
    child.expect("first token")
    child.expect(PROMPT)


def _stored(tmp_path: Path, session_id: str) -> list[dict[str, object]]:
    store = SQLiteSessionStore(tmp_path / "s.db")
    try:
        return store.load(session_id)[1]
    finally:
        store.close()


def _expected(history: list[dict[str, object]], max_tokens: int | None = None) -> str:
    return answer_text("deepseek-chat", history, config=MockConfig(), max_tokens=max_tokens)[1]


def test_editing_history_multiline_and_keys(tmp_path: Path) -> None:
    """Arrow keys, Home/End and Ctrl+A/E edit the line; Up recalls the previous message,
    also in a new run; Alt+Enter and a trailing backslash make one multi-line message;
    Ctrl+C drops a half-typed line and Ctrl+D exits cleanly. The stored session (and the
    mock's answers, a function of what it was sent) show exactly what was typed."""
    child, first_id = _chat(tmp_path, "--mock-token-ms", "0")
    _ask(child, f"helo{LEFT}l{HOME}say {END} world\r")
    _ask(child, f"orld{HOME}\x01w{END}\x05?\r")
    _ask(child, "line one\\\rline two\x1b\rline three\r")
    child.send("this is dropped\x03")
    child.expect(PROMPT)
    # Up recalls the 3-line message, walks up its lines, then recalls the one before.
    _ask(child, f"{UP * 4}\r")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    questions = ["say hello world", "world?", "line one\nline two\nline three", "world?"]
    stored = _stored(tmp_path, first_id)
    assert [m["content"] for m in stored if m["role"] == "user"] == questions
    history: list[dict[str, object]] = []
    for question, reply in zip(questions, stored[1::2], strict=True):
        history.append({"role": "user", "content": question})
        assert reply["content"] == _expected(history)
        history.append(reply)

    # A new run finds the history of the last one.
    again, second_id = _chat(tmp_path, "--mock-token-ms", "0")
    _ask(again, f"{UP}{LEFT}!\r")
    again.sendline("/exit")
    again.expect(pexpect.EOF)
    assert _stored(tmp_path, second_id)[0]["content"] == "world!?"
    assert "+world?" in (tmp_path / "data" / "unbroken" / "chat_history").read_text()


def test_retry_replaces_the_answer_on_screen_and_in_the_store(tmp_path: Path) -> None:
    """/retry after an answer leaves one copy of the question and one answer; /retry after
    a stopped answer asks that question again."""
    child, session_id = _chat(tmp_path, "--mock-token-ms", "0")
    _ask(child, "first question\r")
    _ask(child, "/retry\r")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    stored = _stored(tmp_path, session_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "first question"

    slow, slow_id = _chat(tmp_path, "--mock-token-ms", "300")
    slow.send("a slow one\r")
    slow.expect_exact(_expected([{"role": "user", "content": "a slow one"}]).lstrip()[:3])
    slow.sendintr()
    slow.expect("stopped")
    slow.expect(PROMPT)
    assert _stored(tmp_path, slow_id) == []
    slow.sendline("/exit")
    slow.expect(pexpect.EOF)


def test_piped_chat_reads_plain_lines(tmp_path: Path) -> None:
    """Piped, chat reads plain lines (a trailing backslash continues) and /retry keeps one
    copy of the question."""
    done = subprocess.run(
        [sys.executable, "-m", "unbroken.cli", "chat", "--store", str(tmp_path / "p.db")],
        input="two\\\nlines\n/retry\n",
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    session_id = re.search(r"session (sess_[0-9a-f]+)", done.stdout)
    assert session_id is not None
    store = SQLiteSessionStore(tmp_path / "p.db")
    stored = store.load(session_id.group(1))[1]
    store.close()
    assert stored[0]["content"] == "two\nlines"
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert "\x1b[" not in done.stdout  # no editor, no escape codes


def test_token_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """`ask --max-tokens` on a terminal shows a live `N / max tokens` line while the answer
    streams and the upstream's exact count at the end; piped, only the answer is printed."""
    question = "Tell me about streams."
    expected = _expected([{"role": "user", "content": question}], max_tokens=60)
    child = _spawn(tmp_path, "ask", "--max-tokens", "60", "--mock-token-ms", "40", question)
    child.logfile_read = io.StringIO()
    child.expect(r"first token [\d.]+s · (\d+) / 60 tokens")
    assert isinstance(child.match, re.Match)
    exact = int(child.match.group(1))
    child.expect(pexpect.EOF)
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", child.logfile_read.getvalue())
    live = [int(n) for n in re.findall(r"(\d+) / 60 tokens", screen)][:-1]  # the last: summary
    # Drawn again and again as the answer grows (estimated counts, so never falling).
    assert len(set(live)) >= 3
    assert live == sorted(live)
    assert exact == 60 or len(expected) < 150  # capped, unless the mock's answer is short
    flat = screen.replace("\r", "").replace("\n", "")
    assert expected.replace("\n", "")[-20:] in flat

    piped = subprocess.run(
        [sys.executable, "-m", "unbroken.cli", "ask", "--max-tokens", "60", question],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert piped.stdout == expected + "\n"
    assert "tokens" not in piped.stdout + piped.stderr


def test_chat_progress_with_max_tokens(tmp_path: Path) -> None:
    """`chat --max-tokens` shows the live count during an answer and the exact one after."""
    child, _ = _chat(tmp_path, "--mock-token-ms", "40", "--max-tokens", "30")
    child.send("hello\r")
    child.expect(r"\d+ / 30 tokens")
    child.expect(r"first token [\d.]+s · 30 / 30 tokens")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
