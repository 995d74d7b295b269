"""`unbroken bench URL`: load and recovery testing of any OpenAI-compatible endpoint.

Parse, build a `BenchConfig`, run it with a live display, render the table and write the
reports (STYLE.md §10: no measuring logic here; it lives in `unbroken.loadtest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from unbroken.errors import ConfigError
from unbroken.loadtest.faults import FaultMix, parse_cut, parse_fault_mix
from unbroken.loadtest.procstat import cpu_seconds, server_cost
from unbroken.loadtest.report import (
    BenchReport,
    summary_rows,
    write_csv,
    write_html,
    write_json,
    write_plots,
)
from unbroken.loadtest.runner import MODES, BenchConfig, BenchRun
from unbroken.loadtest.schedule import LoadShape, parse_tokens, sales_peak
from unbroken.loadtest.stats import Percentiles, Summary, summarize

__all__ = ["bench"]

# How often the live display redraws (seconds); a plain progress line when not a terminal.
REFRESH_S = 0.25
PLAIN_PROGRESS_S = 5.0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _load_prompts(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the prompt file {str(path)!r}: {exc.strerror}") from None
    prompts: list[str] = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{i}: not a JSON object") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ConfigError(f'{path}:{i}: a JSON line needs a "prompt" string')
            prompts.append(item["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ConfigError(f"the prompt file {str(path)!r} holds no prompt")
    return tuple(prompts)


def _shape(
    concurrency: int,
    rate: float | None,
    arrival: str,
    ramp_from: float,
    ramp_s: float,
    preset: str | None,
    duration: float,
    requests: int,
) -> LoadShape:
    if preset is not None:
        if preset != "sales-peak":
            raise ConfigError(f"unknown preset {preset!r}: the one preset is sales-peak")
        if rate is None:
            raise ConfigError("--preset sales-peak needs --rate (the peak requests/s)")
        return sales_peak(rate, duration, concurrency=concurrency, max_requests=requests)
    if rate is None:
        return LoadShape("closed", duration, concurrency, max_requests=requests)
    if arrival not in ("constant", "poisson"):
        raise ConfigError(f"unknown --arrival {arrival!r}: constant or poisson")
    if ramp_s > 0:
        return LoadShape(
            "ramp",
            duration,
            concurrency,
            rate,
            start_rate=ramp_from,
            ramp_s=ramp_s,
            max_requests=requests,
        )
    if arrival == "poisson":
        return LoadShape("poisson", duration, concurrency, rate, max_requests=requests)
    return LoadShape("constant", duration, concurrency, rate, max_requests=requests)


def _progress(run: BenchRun, mode: str) -> Table:
    records = list(run.records)
    elapsed = run.elapsed_s
    ok = [r for r in records if r.ok]
    ttft = Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None])
    itl = Percentiles.of([g for r in ok[-200:] for g in r.gaps_s])
    tokens = sum(r.completion_tokens or r.n_chunks for r in records)
    errors = len(records) - len(ok)
    table = Table(box=None, show_header=True, header_style="bold")
    for head in ("mode", "elapsed", "done", "in flight", "errors", "TTFT p50/p99 ms"):
        table.add_column(head, justify="right")
    table.add_column("ITL p50/p99 ms", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_row(
        mode,
        f"{elapsed:.1f}s",
        str(len(records)),
        str(run.in_flight),
        Text(str(errors), style="red" if errors else ""),
        f"{_ms(ttft.p50)}/{_ms(ttft.p99)}",
        f"{_ms(itl.p50)}/{_ms(itl.p99)}",
        f"{tokens / elapsed:.0f}" if elapsed > 0 else "-",
    )
    return table


async def _drive(run: BenchRun, mode: str, console: Console, state: dict[str, bool]) -> None:
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if state["interrupted"]:
            raise KeyboardInterrupt  # a second Ctrl+C: stop at once
        state["interrupted"] = True
        run.stop()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    task = asyncio.create_task(run.run())
    try:
        if console.is_terminal:
            with Live(_progress(run, mode), console=console, transient=True) as live:
                while not task.done():
                    await asyncio.wait({task}, timeout=REFRESH_S)
                    live.update(_progress(run, mode))
        else:
            while not task.done():
                await asyncio.wait({task}, timeout=PLAIN_PROGRESS_S)
                if not task.done():
                    r = run.records
                    errors = sum(1 for x in r if not x.ok)
                    console.print(
                        f"{mode}: {run.elapsed_s:.0f}s, {len(r)} done, {run.in_flight} in "
                        f"flight, {errors} errors",
                        highlight=False,
                    )
        await task
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def _summary_table(summary: Summary, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("ms")
    for head in ("p50", "p90", "p99"):
        table.add_column(head, justify="right")
    for row in summary_rows(summary):
        table.add_row(*row)
    return table


def _render(console: Console, report: BenchReport) -> None:
    for mode, summary in report.summaries.items():
        if mode in report.unsupported:
            console.print(f"[yellow]{mode}: {escape(report.unsupported[mode])}[/yellow]")
            continue
        console.print(_summary_table(summary, f"{mode}: {summary.n_requests} requests"))
        errors = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors.items())) or "none"
        console.print(
            f"{summary.requests_per_s:.2f} requests/s · {summary.tokens_per_s:.0f} tokens/s · "
            f"{summary.completion_tokens} completion tokens ({summary.tokens_received} "
            f"received) · {summary.upstream_attempts} upstream attempts · errors: "
            f"{escape(errors)}",
            highlight=False,
        )
        if mode in report.server:
            cost = report.server[mode]
            console.print(
                f"server: {cost['cpu_s']:.2f} CPU s, {cost['cores'] or 0:.2f} cores busy, "
                f"{cost['cpu_ms_per_request'] or 0:.2f} CPU ms/request, "
                f"{cost['cpu_us_per_token'] or 0:.1f} CPU us/token",
                highlight=False,
            )
        if summary.integrity:
            answers = ", ".join(f"{k} {v}" for k, v in sorted(summary.integrity.items()))
            console.print(
                f"recovery: answers {answers} · {summary.extra_bytes} extra bytes, "
                f"{summary.missing_bytes} missing bytes against the fault-free reference",
                highlight=False,
            )
    if len(report.summaries) > 1:
        table = Table(title="interaction modes side by side", title_justify="left")
        for head in ("mode", "first text p50", "first text p99", "end-to-end p50"):
            table.add_column(head, justify="right")
        for head in ("end-to-end p99", "requests/s", "tokens/s", "errors"):
            table.add_column(head, justify="right")
        for mode, s in report.summaries.items():
            if mode in report.unsupported:
                table.add_row(mode, "unsupported by this endpoint", *[""] * 6)
                continue
            table.add_row(
                mode,
                _ms(s.ttft.p50),
                _ms(s.ttft.p99),
                _ms(s.e2e.p50),
                _ms(s.e2e.p99),
                f"{s.requests_per_s:.2f}",
                f"{s.tokens_per_s:.0f}",
                str(s.n_requests - s.n_ok),
            )
        console.print(table)


def bench(
    url: str = typer.Argument(
        ..., help="base URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8788/v1"
    ),
    model: str = typer.Option("deepseek-chat", help="model to ask for"),
    api_key: str | None = typer.Option(
        None, envvar="UNBROKEN_BENCH_API_KEY", help="Bearer key (env UNBROKEN_BENCH_API_KEY)"
    ),
    concurrency: int = typer.Option(
        8, "--concurrency", "-c", help="requests in flight (closed loop); a cap in open loop"
    ),
    rate: float | None = typer.Option(
        None, help="open loop: requests/s (the peak of a ramp or preset); omit for closed loop"
    ),
    arrival: str = typer.Option("constant", help="open-loop arrivals: constant or poisson"),
    ramp_from: float = typer.Option(0.0, help="open loop: the ramp's first rate (requests/s)"),
    ramp_s: float = typer.Option(0.0, help="open loop: climb from --ramp-from to --rate in S s"),
    preset: str | None = typer.Option(
        None, help="sales-peak: 10% of --rate, ramp over 40% of the run, then hold"
    ),
    duration: float = typer.Option(10.0, "--duration", "-d", help="seconds of starting requests"),
    requests: int = typer.Option(0, "--requests", "-n", help="stop after N requests (0: none)"),
    prompts: Path | None = typer.Option(  # noqa: B008 - typer declares options this way
        None, help='prompt file: one per line, or JSON lines {"prompt": ...}; default generated'
    ),
    max_tokens: str | None = typer.Option(
        None, help="max_tokens: N, uniform:LO-HI or normal:MEAN,SD (default: not sent)"
    ),
    mode: str = typer.Option(
        "stream", help="stream, blocking, longpoll, or all (the three side by side)"
    ),
    fault: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], help="mock fault mix [P:]SPEC sent as X-Mock-Fault, repeatable (see docs/mock.md)"
    ),
    proxy_fault: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], help="[P:]cut after_bytes=B | after_ms=T through the built-in TCP fault proxy"
    ),
    compare: bool = typer.Option(
        True, help="compare faulted answers with a fault-free reference (whole/dup/missing)"
    ),
    seed: int = typer.Option(0, help="seed of prompts, token counts, fault draws, arrivals"),
    timeout: float = typer.Option(60.0, help="per-read timeout, s"),
    header: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], "--header", "-H", help="extra request header 'Name: value', repeatable"
    ),
    out: Path = typer.Option(  # noqa: B008 - typer declares options this way
        Path("bench-report"), help="directory for the reports"
    ),
    name: str = typer.Option("bench", help="file stem of the reports"),
    plots: bool = typer.Option(True, help="draw PNG plots (needs the [bench] extra)"),
    watch_pid: list[int] = typer.Option(  # noqa: B008 - typer declares options this way
        [], help="a local server process to charge CPU time to (Linux), repeatable"
    ),
) -> None:
    """Load-test an OpenAI-compatible endpoint, and how its cut streams recover.

    TTFT, TPOT, ITL and end-to-end latency, throughput, errors by kind, cut-to-next-byte
    and whole/duplicated/missing answers; writes JSON, CSV, PNG plots and an HTML report.
    Ctrl+C stops and still writes what ran.
    """
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        shape = _shape(concurrency, rate, arrival, ramp_from, ramp_s, preset, duration, requests)
        mixes: list[FaultMix] = [parse_fault_mix(f) for f in fault]
        for text in proxy_fault:
            mix = parse_fault_mix(text)
            mixes.append(dataclasses.replace(mix, proxy=parse_cut(mix.spec)))
        headers: list[tuple[str, str]] = []
        for h in header:
            key, sep, value = h.partition(":")
            if not sep or not key.strip():
                raise ConfigError(f"bad --header {h!r}: use 'Name: value'")
            headers.append((key.strip(), value.strip()))
        for pid in watch_pid:
            cpu_seconds(pid)  # fails early, naming a pid that is not there
        if mode not in (*MODES, "all"):
            raise ConfigError(f"unknown --mode {mode!r}: stream, blocking, longpoll or all")
        config = BenchConfig(
            url=url,
            model=model,
            api_key=api_key,
            shape=shape,
            max_tokens=parse_tokens(max_tokens) if max_tokens else None,
            prompts=_load_prompts(prompts) if prompts else None,
            mode="stream" if mode == "all" else mode,  # type: ignore[arg-type] # checked above
            faults=tuple(mixes),
            seed=seed,
            compare=compare,
            timeout_s=timeout,
            headers=tuple(headers),
            watch_pids=tuple(watch_pid),
        )
    except ConfigError as exc:
        err.print(f"[red]unbroken bench: {escape(exc.message)}[/red]")
        raise typer.Exit(2) from None

    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    modes = MODES if mode == "all" else (config.mode,)
    state = {"interrupted": False}
    report = BenchReport(
        started_at=started_at,
        config={
            "url": url,
            "model": model,
            "shape": dataclasses.asdict(shape),
            "max_tokens": max_tokens,
            "prompts": str(prompts) if prompts else "generated",
            "modes": list(modes),
            "faults": [f"{m.probability:g}:{m.proxy or m.spec}" for m in mixes],
            "fault_via": sorted({"proxy" if m.proxy else "mock header" for m in mixes}),
            "seed": seed,
        },
        summaries={},
        records={},
        references={"requests": 0, "completion_tokens": 0},
    )
    for each in modes:
        run = BenchRun(dataclasses.replace(config, mode=each))
        # A full garbage collection walks every object: frozen, what existed before the run
        # (the interpreter, the libraries, an embedding process's heap) is not walked again,
        # so collections during the run stay short and do not show up as latency.
        gc.collect()
        gc.freeze()
        try:
            asyncio.run(_drive(run, each, err, state))
        except KeyboardInterrupt:
            state["interrupted"] = True
        finally:
            gc.unfreeze()
        report.records[each] = summary_records = list(run.records)
        report.summaries[each] = summary = summarize(summary_records, run.elapsed_s)
        if run.server_cpu_s is not None:
            report.server[each] = server_cost(
                run.server_cpu_s, summary.duration_s, summary.n_ok, summary.tokens_received
            )
        report.references["requests"] += run.n_references
        report.references["completion_tokens"] += run.reference_tokens
        if run.unsupported:
            report.unsupported[each] = run.unsupported
        if state["interrupted"]:
            break
    report.interrupted = state["interrupted"]
    _render(console, report)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    if plots:
        try:
            pngs = write_plots(report, out, name)
        except ImportError:
            err.print(
                "[yellow]plots need matplotlib: pip install 'unbroken[bench]'; "
                "writing the other reports[/yellow]"
            )
    write_json(report, out / f"{name}.json", [p.name for p in pngs])
    write_csv(report, out / f"{name}.csv")
    write_html(report, out / f"{name}.html", pngs)
    console.print(f"reports: {out / name}.json, .csv, .html" + (" and PNG plots" if pngs else ""))
    if report.interrupted:
        err.print("[yellow]interrupted: the reports hold what ran[/yellow]")
        raise typer.Exit(130)
