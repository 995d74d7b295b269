"""`unbroken mock`: the command serves the mock DeepSeek until stopped, and refuses a bad
configuration with a clear message."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from unbroken.cli.commands import MOCK_PORT, app
from unbroken.mock import DEFAULT_PORT

pytestmark = pytest.mark.integration


def test_unbroken_mock_serves_until_interrupted() -> None:
    """`unbroken mock --port 0` prints its URL and answers on it; Ctrl+C stops it cleanly."""
    code = "import sys; from unbroken.cli import main; sys.argv[0] = 'unbroken'; main()"
    with subprocess.Popen(
        [sys.executable, "-c", code, "mock", "--port", "0", "--seed", "3", "--token-ms", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert line.startswith("mock DeepSeek listening on http://127.0.0.1:")
            url = line.split()[-1]
            auth = {"Authorization": "Bearer sk"}
            assert httpx.get(url + "/models", headers=auth, timeout=10).status_code == 200
            chat = httpx.post(
                url + "/chat/completions",
                headers=auth,
                json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert chat.json()["choices"][0]["finish_reason"] == "stop"
        finally:
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert b"Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault", "explode"], "unknown fault kind"),
        (["--fault", "0.7:503", "--fault", "0.7:429"], "add up to 1.4"),
        (["--token-ms", "-1"], "token_ms"),
    ],
)
def test_unbroken_mock_rejects_bad_configuration(args: list[str], message: str) -> None:
    """A bad option exits with status 2 and names the problem, before listening."""
    result = CliRunner().invoke(app, ["mock", "--port", "0", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_unbroken_mock_reports_a_busy_port() -> None:
    """A port in use exits with status 1 and says so; the default port is DEFAULT_PORT."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["mock", "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert MOCK_PORT == DEFAULT_PORT == 8787
