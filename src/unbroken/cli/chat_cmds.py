"""`unbroken chat` (interactive, live, resumable sessions) and `unbroken ask` (one shot).

Parse, build the client, call the SDK, render: no stream logic here (STYLE.md §10). Without
DEEPSEEK_API_KEY and --base-url both run against the built-in mock DeepSeek.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from unbroken.cli.lineinput import MULTILINE_HELP, line_reader
from unbroken.cli.render import Turn, render_answer
from unbroken.client.sync import Client
from unbroken.core.events import TextEvent
from unbroken.errors import UnbrokenError
from unbroken.sessions.session import ChatSession
from unbroken.sessions.store import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    SQLiteSessionStore,
    default_sessions_path,
)
from unbroken.settings import Settings, data_home, openai_api_key

__all__ = ["ask", "chat"]

HELP = f"""commands:
  /new                 start a new session        /sessions       list saved sessions
  /load ID             resume a saved session     /system TEXT    set the system prompt
  /model NAME          switch model               /cost           tokens and cost so far
  /retry               a new answer to the last question, replacing the old one
  /reasoning           show the last reasoning    /help           this help
  /exit                leave (or Ctrl+D)
keys: {MULTILINE_HELP}
Ctrl+C stops the current answer (or drops the line being typed); it does not quit."""


@contextlib.contextmanager
def _client(
    base_url: str | None,
    model: str,
    console: Console,
    mock_token_ms: float,
    api_key: str | None = None,
) -> Iterator[Client]:
    settings = Settings.from_env()
    # A key for --base-url (a gateway's, say) may also come as OPENAI_API_KEY, as openai's
    # tools read it; DeepSeek's own URL only ever gets DEEPSEEK_API_KEY.
    key = api_key or settings.api_key or (openai_api_key() if base_url else None)
    if base_url is None and key is None:
        from unbroken.mock import Latency, MockConfig, MockServer

        console.print(
            "[dim]no DEEPSEEK_API_KEY and no --base-url: using the built-in mock DeepSeek[/dim]",
            highlight=False,
        )
        with (
            MockServer(MockConfig(latency=Latency(token_ms=mock_token_ms))) as mock,
            Client(api_key="sk-mock", base_url=mock.url) as client,
        ):
            yield client
        return
    with Client(api_key=key or "sk-none", base_url=base_url or settings.base_url) as c:
        yield c


def _console(*, stderr: bool = False) -> Console:
    console = Console(highlight=False, stderr=stderr)
    # Piped or redirected, lines are never hard-wrapped at the console width.
    console.soft_wrap = not console.is_terminal
    return console


def _store(spec: str | None, no_store: bool) -> SessionStore:
    if no_store:
        return MemorySessionStore()
    if spec and spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisSessionStore(spec)
    return SQLiteSessionStore(spec or default_sessions_path(data_home()))


def _summary(session: ChatSession, turn: Turn, max_tokens: int | None = None) -> str:
    last = session.last
    parts = []
    if turn.ttft_s is not None:
        parts.append(f"first token {turn.ttft_s:.2f}s")
    if last is not None and last.usage is not None:
        cap = f" / {max_tokens}" if max_tokens is not None else ""
        parts.append(f"{last.usage.completion_tokens}{cap} tokens")
    if last is not None:
        parts.append(f"${last.unbroken.cost_usd:.5f}")
        if last.unbroken.resumes:
            parts.append(f"resumed {last.unbroken.resumes}x")
        if last.unbroken.retries:
            parts.append(f"retried {last.unbroken.retries}x")
        if last.unbroken.fallbacks:
            parts.append(f"via {last.unbroken.route}")
    return " · ".join(parts)


def _sessions_table(store: SessionStore) -> Table:
    table = Table("id", "title", "model", "messages", "updated", box=None)
    for info in store.list(limit=20):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.updated_s))
        table.add_row(info.id, escape(info.title), info.model, str(info.n_messages), when)
    return table


def chat(
    model: str = typer.Option("deepseek-chat", help="model to talk to"),
    base_url: str | None = typer.Option(
        None, help="any OpenAI-compatible server or an unbroken gateway"
    ),
    system: str | None = typer.Option(None, help="system prompt"),
    session: str | None = typer.Option(None, help="resume a saved session by id"),
    store: str | None = typer.Option(None, help="SQLite file or redis:// URL for sessions"),
    no_store: bool = typer.Option(False, help="keep the conversation in memory only"),
    mock_token_ms: float = typer.Option(
        15.0, help="token interval of the built-in mock (demos and tests)"
    ),
    api_key: str | None = typer.Option(
        None, help="the key (default DEEPSEEK_API_KEY; OPENAI_API_KEY with --base-url)"
    ),
    max_tokens: int | None = typer.Option(
        None, min=1, help="cap on each answer's tokens (a live count is shown against it)"
    ),
) -> None:
    """Chat in the terminal: line editing and history, live streaming, reasoning dimmed,
    Ctrl+C stops an answer. Alt+Enter or a line ending in \\ starts a new line."""
    console = _console()
    db = _store(store, no_store)
    with _client(base_url, model, console, mock_token_ms, api_key) as client:
        current = (
            ChatSession.load(client, db, session)
            if session
            else ChatSession(client, model=model, system=system, store=db)
        )
        console.print(f"[bold]unbroken chat[/bold] · {current.model} · session {current.id}")
        console.print("[dim]/help for commands[/dim]")
        reader = line_reader(lambda: console.input("[bold cyan]you ›[/bold cyan] "), data_home())
        # A question whose answer was stopped or failed (so it is not in the session).
        unanswered: str | None = None
        while True:
            try:
                line = reader.read()
            except EOFError:
                console.print()
                break
            except KeyboardInterrupt:
                console.print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                command, _, arg = line.partition(" ")
                arg = arg.strip()
                if command in ("/exit", "/quit"):
                    break
                if command == "/help":
                    console.print(HELP, markup=False)
                elif command == "/new":
                    current = ChatSession(
                        client, model=current.model, system=current.system, store=db
                    )
                    console.print(f"[dim]new session {current.id}[/dim]")
                elif command == "/sessions":
                    console.print(_sessions_table(db))
                elif command == "/load":
                    try:
                        current = ChatSession.load(client, db, arg)
                    except UnbrokenError as exc:
                        console.print(f"[red]{escape(exc.message)}[/red]")
                        continue
                    console.print(
                        f"[dim]resumed {current.id}: {len(current.messages)} messages[/dim]"
                    )
                elif command == "/system":
                    current.set_system(arg or None)
                    console.print("[dim]system prompt set[/dim]")
                elif command == "/model":
                    if arg:
                        current.model = arg
                    console.print(f"[dim]model: {current.model}[/dim]")
                elif command == "/cost":
                    u = current.usage
                    console.print(
                        f"[dim]this session: {u.prompt_tokens} prompt + {u.completion_tokens} "
                        f"completion tokens · ${current.cost_usd:.5f}[/dim]"
                    )
                elif command == "/reasoning":
                    last = current.last
                    text = (
                        last.choices[0].message.reasoning_content if last and last.choices else None
                    )
                    console.print(Text(text or "(no reasoning)", style="dim"))
                elif command == "/retry":
                    if unanswered is not None:
                        unanswered = _answer(current, unanswered, console, max_tokens)
                    elif not any(m["role"] == "user" for m in current.messages):
                        console.print("[dim]nothing to retry[/dim]")
                    else:
                        _answer(current, None, console, max_tokens)
                else:
                    console.print(f"[red]unknown command {escape(command)}[/red] (/help)")
                continue
            unanswered = _answer(current, line, console, max_tokens)
    db.close()


def _answer(
    session: ChatSession, question: str | None, console: Console, max_tokens: int | None
) -> str | None:
    """Ask `question` (None: regenerate the last answer) and show the answer; returns the
    question when it got no complete answer (stopped or failed), None otherwise."""
    started = time.monotonic()
    params: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    events = session.retry(**params) if question is None else session.send(question, **params)
    try:
        turn = render_answer(
            events, console, started, pretty=console.is_terminal, max_tokens=max_tokens
        )
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close is not None:
            close()
        console.print("\n[yellow]⏹ stopped[/yellow]")
        return question
    except UnbrokenError as exc:
        console.print(f"\n[red]error: {escape(exc.message)}[/red]")
        return question
    console.print()
    console.print(f"[dim]{_summary(session, turn, max_tokens)}[/dim]")
    return None


def ask(
    question: str = typer.Argument(..., help="the question; - reads it from stdin"),
    model: str = typer.Option("deepseek-chat", help="model to ask"),
    base_url: str | None = typer.Option(None, help="any OpenAI-compatible server or gateway"),
    system: str | None = typer.Option(None, help="system prompt"),
    json_output: bool = typer.Option(False, "--json", help="print the whole completion as JSON"),
    mock_token_ms: float = typer.Option(0.0, help="token interval of the built-in mock"),
    api_key: str | None = typer.Option(
        None, help="the key (default DEEPSEEK_API_KEY; OPENAI_API_KEY with --base-url)"
    ),
    max_tokens: int | None = typer.Option(
        None, min=1, help="cap on the answer's tokens (on a terminal, a live count against it)"
    ),
) -> None:
    """Ask once and print the answer (plain text when piped)."""
    console = _console()
    errors = _console(stderr=True)
    if question == "-":
        question = sys.stdin.read().strip()
        if not question:
            errors.print("unbroken ask: stdin was empty; nothing to ask", style="red")
            raise typer.Exit(2)
    with _client(base_url, model, errors, mock_token_ms, api_key) as client:
        params: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
        session = ChatSession(client, model=model, system=system, **params)
        if json_output:
            done = session.ask(question)
            sys.stdout.write(msgspec.json.encode(done).decode() + "\n")
            return
        if not console.is_terminal:
            for event in session.send(question):
                if isinstance(event, TextEvent):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            return
        turn = render_answer(
            session.send(question), console, time.monotonic(), pretty=True, max_tokens=max_tokens
        )
        console.print()
        errors.print(f"[dim]{_summary(session, turn, max_tokens)}[/dim]")
