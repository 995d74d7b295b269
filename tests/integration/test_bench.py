"""`unbroken bench` against the demo stack (the gateway in front of the mock DeepSeek, as
`unbroken demo` builds it), run in-process through the CLI; Ctrl+C in a real subprocess."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from unbroken.cli.bench_cmds import bench

pytestmark = pytest.mark.integration

app = typer.Typer()
app.command()(bench)
app.command("noop")(lambda: None)  # two commands, so `bench` is a subcommand as in the CLI

# The demo's settings (cli/gateway_cmds.py `demo`): 10 ms per token, x-mock-* forwarded,
# quick retries. Each server runs in its own process, as in production, so the tool's
# timings are not disturbed by sharing an interpreter with the servers.
DEMO_TOKEN_MS = 10.0
GATEWAY_TOML = """\
[gateway]
forward_headers = ["x-mock-*"]
retry_wait_initial_s = 0.05
retry_wait_max_s = 0.5
"""
_MAIN = "import sys; from unbroken.cli import main; sys.argv[0] = 'unbroken'; main()"


@dataclass
class MockProcess:
    """The mock DeepSeek in its own process, read through its admin endpoints."""

    url: str
    gateway_pid: int = 0

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_mock/stats", timeout=10).json())

    def log(self, limit: int) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/_mock/log", params={"limit": limit}, timeout=10).json()
        return list(body if isinstance(body, list) else body["entries"])

    def reset(self) -> None:
        httpx.post(f"{self.url}/_mock/reset", timeout=10).raise_for_status()


def _start(args: list[str], env: dict[str, str], stack: contextlib.ExitStack) -> tuple[str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _MAIN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )

    def stop() -> None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

    stack.callback(stop)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # the URL line, printed once listening
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert match, f"no URL in {line!r}"
    return match.group(0), proc.pid


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MockProcess, str]]:
    """The demo stack on free loopback ports, each server its own process: (the mock, the
    gateway's /v1 URL)."""
    config = tmp_path_factory.mktemp("gateway") / "gateway.toml"
    config.write_text(GATEWAY_TOML, encoding="utf-8")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src, "DEEPSEEK_API_KEY": "sk-demo"}
    with contextlib.ExitStack() as stack:
        mock_url, _ = _start(
            ["mock", "--port", "0", "--seed", "7", "--token-ms", str(DEMO_TOKEN_MS)], env, stack
        )
        gateway_url, gateway_pid = _start(
            ["serve", "--port", "0", "--upstream", mock_url, "--config", str(config),
             "--log-level", "warning"],
            env,
            stack,
        )  # fmt: skip
        yield MockProcess(mock_url, gateway_pid), f"{gateway_url}/v1"


def _run(args: list[str]) -> Any:
    result = CliRunner().invoke(app, ["bench", *args])
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


def _mock_tokens_sent(log: list[dict[str, Any]]) -> int:
    # The mock counts `data:` chunks: a role chunk, one per token, then (when the answer
    # ended normally) the usage chunk and [DONE]; a refused request sent none.
    return sum(max(0, e["chunks"] - 1 - (2 if e["outcome"] == "ok" else 0)) for e in log)


def test_bench_against_the_demo_with_a_fault_mix(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """The table is printed, JSON/CSV/PNG/HTML are written, and the requests and tokens the
    report counts are the ones the mock counted."""
    mock, url = demo
    mock.reset()
    result = _run(
        [
            url,
            "--concurrency", "6",
            "--duration", "2",
            "--fault", "0.3:reset after=8 times=1",
            "--fault", "0.15:429 times=1",
            "--fault", "0.1:stall after=5 ms=150 times=1",
            "--fault", "0.1:400",
            "--seed", "2",  # its first six fault draws hold every kind of the mix
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    for label in ("TTFT", "time per output token", "inter-token latency", "end-to-end", "p99"):
        assert label in out
    assert "cut-to-next-byte" in out
    assert "requests/s" in out
    assert "tokens/s" in out
    assert "errors: http_400" in out

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["schema"] == "unbroken.bench/1"
    s = report["modes"]["stream"]
    rows = _rows(tmp_path / "bench.csv")
    assert len(rows) == s["requests"] > 10
    assert s["errors"] == {"http_400": sum(1 for r in rows if r["error"] == "http_400")}
    assert s["errors"]["http_400"] >= 1
    assert s["recovery"]["cut_to_next_byte_s"]["n"] >= 1
    assert sum(s["recovery"]["answers"].values()) == sum(
        1 for r in rows if r["fault"] and r["status"] == "200"
    )

    stats = mock.stats()
    log = mock.log(1000)
    assert len(log) == stats["requests_total"]
    # Every upstream request: the gateway's attempts (its trailer) plus the references.
    assert stats["requests_total"] == s["upstream_attempts"] + report["references"]["requests"]
    assert stats["faults"]["reset"] == sum(1 for r in rows if r["fault"].startswith("reset"))
    # Every token the mock sent reached the tool once (the gateway drops what it resumed
    # past), plus the references' tokens.
    tokens = s["tokens_received"] + report["references"]["completion_tokens"]
    assert _mock_tokens_sent(log) == tokens
    # The same from the counters alone: every 200 answer's role chunk, and each answer
    # that ended normally its usage chunk and [DONE], are chunks but not tokens.
    assert stats["chunks_sent"] - stats["statuses"]["200"] - 2 * stats["outcomes"]["ok"] == tokens

    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["bench-latency.png", "bench-throughput.png", "bench-ttft.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "bench.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "Errors by kind" in page
    assert "http_400" in page


def test_cut_to_next_byte_matches_the_mock_log(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """A stream cut after a known chunk: the measured cut-to-next-byte latency is within
    10 ms of the mock's log (the cut request's end to the resume's arrival)."""
    mock, url = demo
    mock.reset()
    # Its own process, as a user runs it: the test runner's heap and tracer stay out of
    # the timings.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", _MAIN, "bench", url, "-c", "1", "-n", "1", "-d", "30",
         "--fault", "reset after=8 times=1", "--no-plots", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    rows = _rows(tmp_path / "bench.csv")
    assert len(rows) == 1
    log = sorted(mock.log(100), key=lambda e: e["seq"])
    cuts = [e for e in log if e["outcome"] == "reset"]
    resumes = [e for e in log if e["path"] == "/beta/chat/completions"]
    assert len(cuts) == len(resumes) == 1
    for row, cut, resume in zip(rows, cuts, resumes, strict=True):
        # ttft is 0: the resumed answer's first token leaves as the resume arrives.
        by_mock_ms = (resume["time"] - cut["time"]) * 1000 - cut["duration_ms"]
        measured_ms = float(row["cut_to_next_byte_ms"])
        assert abs(measured_ms - by_mock_ms) <= 10.0, (measured_ms, by_mock_ms)
        assert row["integrity"] == "whole"


def test_a_proxy_cut_without_reconnect_loses_bytes(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """Through the built-in TCP fault proxy, straight at the mock (which cannot reconnect a
    stream): each cut answer is an error and the comparison counts the missing bytes."""
    mock, _ = demo
    mock.reset()
    result = _run(
        [mock.url, "--api-key", "sk-test", "-c", "2", "-n", "6", "-d", "30",
         "--proxy-fault", "0.5:cut after_bytes=1500",
         "--no-plots", "--out", str(tmp_path), "--seed", "1"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "bench.csv")
    cut = [r for r in rows if r["fault"]]
    assert cut, "the seed draws no cut"
    for r in cut:
        assert r["error"] == "reset"
        assert r["integrity"] == "missing"
        assert int(r["missing_bytes"]) > 0
    for r in rows:
        if not r["fault"]:
            assert r["error"] == ""


def test_a_proxy_cut_reconnects_through_the_gateway(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """Through the TCP fault proxy to the gateway: each cut answer is read again from the
    stream log (`GET /v1/streams/{id}`, `Last-Event-ID`) and arrives whole; the
    cut-to-next-byte latency is measured from the proxy's cut, and no upstream request was
    repeated."""
    mock, url = demo
    mock.reset()
    result = _run(
        [url, "-c", "3", "-n", "8", "-d", "30", "--proxy-fault", "0.5:cut after_bytes=3000",
         "--no-plots", "--out", str(tmp_path), "--seed", "1"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "bench.csv")
    cut = [r for r in rows if r["fault"]]
    assert cut, "the seed draws no cut"
    for r in cut:
        assert r["error"] == ""
        assert r["integrity"] == "whole"
        assert 0 < float(r["cut_to_next_byte_ms"]) < 1000
    report = json.loads((tmp_path / "bench.json").read_text())
    assert mock.stats()["requests_total"] == len(rows) + report["references"]["requests"]


def test_three_modes_side_by_side(demo: tuple[MockProcess, str], tmp_path: Path) -> None:
    """--mode all runs blocking, streaming and long-poll at the same load: one table, one
    plot; a mode the endpoint lacks is reported as unsupported."""
    mock, url = demo
    mock.reset()
    result = _run([url, "--mode", "all", "-c", "4", "-d", "1.5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "interaction modes side by side" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    blocking, stream = report["modes"]["blocking"], report["modes"]["stream"]
    assert blocking["ok"] > 0
    assert stream["ok"] > 0
    # First visible text: a blocking answer shows when it is whole, a stream at its first token.
    assert stream["ttft_s"]["p50"] < blocking["ttft_s"]["p50"]
    if "longpoll" in report["unsupported"]:
        assert "unsupported by this endpoint" in out
    else:
        assert report["modes"]["longpoll"]["ok"] > 0
    assert (tmp_path / "bench-modes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://x"], "URL must be"),
        (["http://127.0.0.1:9/v1", "--max-tokens", "lots"], "bad --max-tokens"),
        (["http://127.0.0.1:9/v1", "--fault", "2:reset"], "bad fault"),
        (["http://127.0.0.1:9/v1", "--proxy-fault", "drop"], "bad proxy fault"),
        (["http://127.0.0.1:9/v1", "--preset", "sales-peak"], "needs --rate"),
        (["http://127.0.0.1:9/v1", "--mode", "carrier-pigeon"], "unknown --mode"),
        (["http://127.0.0.1:9/v1", "--prompts", "/nonexistent/p.txt"], "cannot read"),
        (["http://127.0.0.1:9/v1", "--watch-pid", "999999999"], "no process 999999999"),
        (["http://127.0.0.1:9/v1", "-H", "no colon"], "bad --header"),
        (["http://127.0.0.1:9/v1", "--rate", "5", "--arrival", "bursty"], "unknown --arrival"),
        (["http://127.0.0.1:9/v1", "--preset", "black-friday", "--rate", "5"], "unknown preset"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    """Bad options exit 2 with a message naming the problem, before any request."""
    result = _run(args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_ctrl_c_stops_and_still_writes_the_report(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """SIGINT during a long run: the command stops within seconds, exits 130 and the
    reports hold the requests that ran."""
    mock, url = demo
    mock.reset()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "unbroken.cli", "bench", url, "-c", "4", "-d", "120",
         "--rate", "20", "--out", str(tmp_path), "--no-plots"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while mock.stats()["requests_total"] < 10:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the bench sent no requests"
            time.sleep(0.05)  # polling the mock's counter, not waiting out a race
        interrupted_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - interrupted_at < 10
    assert proc.returncode == 130, output.decode()
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["interrupted"] is True
    assert report["modes"]["stream"]["requests"] >= 10
    assert report["modes"]["stream"]["ok"] >= 5
    rows = _rows(tmp_path / "bench.csv")
    assert len(rows) == report["modes"]["stream"]["requests"]
    with httpx.Client() as client:  # the gateway is still serving: nothing was left stuck
        assert client.get(url.removesuffix("/v1") + "/healthz").status_code == 200


def test_locustfile_runs_headless_against_the_demo(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """examples/locustfile.py, headless for 10 s: streams parsed, TTFT and token counts
    reported as Locust rows, no failure, and every answer it counted reached the mock."""
    mock, url = demo
    mock.reset()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "UNBROKEN_BENCH_API_KEY": "sk-demo"}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(root / "examples" / "locustfile.py"),
         "--headless", "-u", "4", "-r", "4", "-t", "10s", "--host", url.removesuffix("/v1"),
         "--only-summary", "--csv", str(tmp_path / "locust"), "--loglevel", "WARNING"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    stats = {(r["Type"], r["Name"]): r for r in _rows(tmp_path / "locust_stats.csv")}
    ttft = stats[("TTFT", "/v1/chat/completions")]
    answers = stats[("STREAM", "/v1/chat/completions")]
    assert int(answers["Request Count"]) >= 10
    assert int(answers["Failure Count"]) == 0
    assert int(ttft["Request Count"]) >= int(answers["Request Count"])
    assert float(ttft["Average Response Time"]) < float(answers["Average Response Time"])
    assert float(answers["Average Content Size"]) > 1  # completion tokens per answer
    assert mock.stats()["streams"]["completed"] >= int(answers["Request Count"])


def test_long_poll_is_unsupported_by_a_plain_endpoint(
    demo: tuple[MockProcess, str], tmp_path: Path
) -> None:
    """Straight at the mock (no stream ids), --mode all still runs blocking and streaming
    and reports long-poll as unsupported by this endpoint, after one request."""
    mock, _ = demo
    result = _run(
        [mock.url, "--api-key", "sk-test", "--mode", "all", "-c", "2", "-d", "1", "--no-plots",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "long-poll is unsupported by this endpoint" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["unsupported"]) == {"longpoll"}
    assert report["modes"]["longpoll"]["errors"] == {"unsupported": 2}
    assert report["modes"]["blocking"]["ok"] > 0
    assert report["modes"]["stream"]["ok"] > 0


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["--rate", "20", "--arrival", "poisson"], "poisson"),
        (["--rate", "20", "--ramp-from", "5", "--ramp-s", "1"], "ramp"),
        (["--preset", "sales-peak", "--rate", "20"], "ramp"),
    ],
)
def test_open_loop_shapes(
    demo: tuple[MockProcess, str], tmp_path: Path, args: list[str], kind: str
) -> None:
    """Poisson, ramp and sales-peak runs start requests on their schedule and report it."""
    mock, _ = demo
    result = _run(
        [mock.url, "--api-key", "sk-test", "-d", "1.5", "-c", "0", "--max-tokens", "uniform:5-20",
         "--no-plots", "--out", str(tmp_path), *args]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["config"]["shape"]["kind"] == kind
    s = report["modes"]["stream"]
    assert s["requests"] >= 5
    assert s["ok"] == s["requests"]
    rows = _rows(tmp_path / "bench.csv")
    assert all(5 <= int(r["completion_tokens"]) <= 20 for r in rows)
    assert max(float(r["start_s"]) for r in rows) < 1.5


def test_watch_pid_charges_the_gateway_cpu(demo: tuple[MockProcess, str], tmp_path: Path) -> None:
    """--watch-pid reports the CPU the gateway process spent on the load."""
    mock, url = demo
    result = _run(
        [url, "-c", "4", "-d", "1", "--watch-pid", str(mock.gateway_pid), "--no-plots",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "CPU ms/request" in " ".join(result.output.split())
    cost = json.loads((tmp_path / "bench.json").read_text())["server"]["stream"]
    assert cost["cpu_s"] > 0
    assert cost["cpu_ms_per_request"] > 0
    assert cost["cpu_us_per_token"] > 0


def test_a_prompt_file_is_cycled(demo: tuple[MockProcess, str], tmp_path: Path) -> None:
    """Prompts come from a file (plain lines and JSON lines), in order, and the blocking
    mode reads whole answers; a prompt file with a bad JSON line is refused."""
    mock, _ = demo
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        'hi\n\n{"prompt": "a much longer second question about returns"}\n', encoding="utf-8"
    )
    mock.reset()
    result = _run(
        [mock.url, "--api-key", "sk-test", "-c", "1", "-n", "4", "--prompts", str(prompts),
         "--mode", "blocking", "--no-plots", "--out", str(tmp_path)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "bench.csv")
    assert [r["error"] for r in rows] == [""] * 4
    # Two prompts of different lengths, alternating: the prompt token counts alternate.
    counts = [int(r["prompt_tokens"]) for r in rows]
    assert counts[0] == counts[2] != counts[1] == counts[3]
    assert mock.stats()["requests_total"] == 4
    prompts.write_text('{"question": "no prompt key"}\n', encoding="utf-8")
    refused = _run([mock.url, "--prompts", str(prompts)])
    assert refused.exit_code == 2
    assert 'needs a "prompt" string' in " ".join(refused.output.split())
