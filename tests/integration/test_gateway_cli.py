"""`unbroken demo --once` and `unbroken serve` error paths, run in-process through a
typer app built here (cli/commands.py registers the same functions)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from unbroken.cli.gateway_cmds import demo, serve

pytestmark = pytest.mark.integration

app = typer.Typer()
app.command("serve")(serve)
app.command("demo")(demo)


def test_demo_once_shows_a_resumed_stream() -> None:
    """The demo prints how to call it, then streams an answer through an upstream reset
    and confirms it is identical to the fault-free answer."""
    result = CliRunner().invoke(app, ["demo", "--port", "0", "--once"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "unbroken gateway on http://127.0.0.1:" in out
    assert "curl -N http://127.0.0.1:" in out
    assert "from openai import OpenAI" in out
    assert "resumes=1" in out
    assert "identical to the fault-free one" in out


def test_serve_reports_a_busy_port() -> None:
    """A port in use is a one-line error and exit code 2, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2
    assert "cannot listen on 127.0.0.1" in " ".join(result.output.split())


def test_serve_reports_a_bad_config(tmp_path: Path) -> None:
    """A malformed config file is a one-line error naming the key."""
    config = tmp_path / "u.toml"
    config.write_text("[gateway]\nport = 'eighty'\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "gateway.port must be a number" in " ".join(result.output.split())
