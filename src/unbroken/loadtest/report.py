"""Writing a bench run down: JSON (versioned schema), CSV (one row per request), PNG plots
(matplotlib, imported only here and only when plots are asked for) and one self-contained
HTML report with the plots inlined. Reads records and summaries; no network.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unbroken.loadtest.stats import Percentiles, RequestRecord, Summary, throughput_series

__all__ = [
    "SCHEMA",
    "BenchReport",
    "summary_rows",
    "write_csv",
    "write_html",
    "write_json",
    "write_plots",
]

# The JSON report's schema id; bump the number on any incompatible change of its shape.
SCHEMA = "unbroken.bench/1"
CSV_FIELDS = (
    "n",
    "mode",
    "start_s",
    "status",
    "error",
    "ttft_ms",
    "e2e_ms",
    "tpot_ms",
    "itl_mean_ms",
    "itl_max_ms",
    "chunks",
    "bytes",
    "prompt_tokens",
    "completion_tokens",
    "attempts",
    "resumes",
    "fault",
    "cut_to_next_byte_ms",
    "integrity",
    "extra_bytes",
    "missing_bytes",
)


# One color per mode in every plot.
COLORS = {"stream": "tab:blue", "blocking": "tab:orange", "longpoll": "tab:green"}


@dataclass(slots=True)
class BenchReport:
    """Everything a report holds: the run's settings, one summary per mode, the records."""

    started_at: str
    config: dict[str, Any]
    summaries: dict[str, Summary]
    records: dict[str, list[RequestRecord]]
    interrupted: bool = False
    references: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    server: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def as_dict(self, plots: Sequence[str] = ()) -> dict[str, Any]:
        """The JSON document (schema `SCHEMA`)."""
        return {
            "schema": SCHEMA,
            "started_at": self.started_at,
            "interrupted": self.interrupted,
            "config": self.config,
            "modes": {mode: s.as_dict() for mode, s in self.summaries.items()},
            "unsupported": self.unsupported,
            "references": self.references,
            "server": self.server,
            "plots": list(plots),
        }


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1000.0:.3f}"


def write_json(report: BenchReport, path: Path, plots: Sequence[str] = ()) -> None:
    """Write the JSON report."""
    path.write_text(json.dumps(report.as_dict(plots), indent=2) + "\n", encoding="utf-8")


def write_csv(report: BenchReport, path: Path) -> None:
    """Write one row per request (every mode), times in milliseconds."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for records in report.records.values():
            for r in records:
                gaps = r.gaps_s
                writer.writerow(
                    [
                        r.n,
                        r.mode,
                        f"{r.start_s:.4f}",
                        r.status,
                        r.error or "",
                        _ms(r.ttft_s),
                        _ms(r.e2e_s),
                        _ms(r.tpot_s),
                        _ms(sum(gaps) / len(gaps) if gaps else None),
                        _ms(max(gaps) if gaps else None),
                        r.n_chunks,
                        r.n_bytes,
                        "" if r.prompt_tokens is None else r.prompt_tokens,
                        "" if r.completion_tokens is None else r.completion_tokens,
                        "" if r.attempts is None else r.attempts,
                        "" if r.resumes is None else r.resumes,
                        r.fault or "",
                        _ms(r.cut_gap_s),
                        r.integrity.kind if r.integrity else "",
                        r.integrity.extra_bytes if r.integrity else "",
                        r.integrity.missing_bytes if r.integrity else "",
                    ]
                )


def write_plots(report: BenchReport, directory: Path, stem: str) -> list[Path]:
    """Draw the PNG plots: latency over time, the TTFT histogram, throughput over time, and
    (with more than one mode) the modes side by side. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    out: list[Path] = []
    colors = COLORS

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for mode, records in report.records.items():
        ok = [r for r in records if r.ok and r.e2e_s is not None]
        color = colors.get(mode, "tab:gray")
        ax.scatter(
            [r.start_s for r in ok],
            [(r.e2e_s or 0) * 1000 for r in ok],
            s=10,
            color=color,
            alpha=0.5,
            label=f"{mode}: end-to-end",
        )
        first = [r for r in ok if r.ttft_s is not None]
        ax.scatter(
            [r.start_s for r in first],
            [(r.ttft_s or 0) * 1000 for r in first],
            s=10,
            marker="^",
            color=color,
            label=f"{mode}: first text (TTFT)",
        )
        bad = [r for r in records if not r.ok]
        if bad:
            ax.scatter(
                [r.start_s for r in bad],
                [(r.e2e_s or 0) * 1000 for r in bad],
                s=30,
                marker="x",
                color="tab:red",
                label=f"{mode}: errors ({len(bad)})",
            )
    ax.set(xlabel="request start (s into the run)", ylabel="latency (ms)")
    ax.set_title("Latency over time")
    ax.grid(alpha=0.3)
    # Below the axes, so that no point hides behind it.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    out.append(_save(fig, directory / f"{stem}-latency.png"))

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for mode, records in report.records.items():
        ttfts = [r.ttft_s * 1000 for r in records if r.ok and r.ttft_s is not None]
        if ttfts:
            p = Percentiles.of([t / 1000 for t in ttfts])
            ax.hist(ttfts, bins=40, alpha=0.6, color=colors.get(mode, "tab:gray"), label=mode)
            for q, style in ((p.p50, "-"), (p.p99, "--")):
                if q is not None:
                    ax.axvline(q * 1000, color=colors.get(mode, "tab:gray"), linestyle=style)
    ax.set(xlabel="time to first token (ms); lines: p50 solid, p99 dashed", ylabel="requests")
    ax.set_title("TTFT distribution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.append(_save(fig, directory / f"{stem}-ttft.png"))

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), dpi=100, sharex=True)
    for mode, records in report.records.items():
        summary = report.summaries[mode]
        bucket = max(0.5, round(summary.duration_s / 20, 1))
        series = throughput_series(records, bucket, summary.duration_s)
        color = colors.get(mode, "tab:gray")
        # The last bucket is drawn to its end: repeat its value one bucket later.
        xs = [t for t, *_ in series] + [series[-1][0] + bucket]
        started, done, tokens = ([row[k] for row in series] for k in (1, 2, 3))
        ax.step(xs, [*started, started[-1]], where="post", color=color, linestyle=":",
                label=f"{mode}: started (offered)")  # fmt: skip
        ax.step(xs, [*done, done[-1]], where="post", color=color, label=f"{mode}: completed")
        ax2.step(xs, [*tokens, tokens[-1]], where="post", color=color, label=mode)
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax2.set(xlabel="time into the run (s)", ylabel="completion tokens/s")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="upper left")
    out.append(_save(fig, directory / f"{stem}-throughput.png"))

    if len(report.summaries) > 1:
        out.append(_modes_plot(report, directory / f"{stem}-modes.png", plt))
    return out


def _modes_plot(report: BenchReport, path: Path, plt: Any) -> Path:
    modes = [m for m, s in report.summaries.items() if s.n_ok]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=100)
    labels = ("first text\np50", "first text\np99", "end-to-end\np50", "end-to-end\np99")
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        s = report.summaries[mode]
        values = [s.ttft.p50, s.ttft.p99, s.e2e.p50, s.e2e.p99]
        xs = [j + i * width for j in range(len(labels))]
        color = COLORS.get(mode, "tab:gray")
        ax.bar(xs, [(v or 0) * 1000 for v in values], width, label=mode, color=color)
        ax2.bar([i], [s.requests_per_s], 0.6, label=mode, color=color)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("ms")
    ax.set_title("Latency by interaction mode")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax2.set_xticks(range(len(modes)), modes)
    ax2.set_ylabel("completed requests/s")
    ax2.set_title("Throughput by mode")
    ax2.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def summary_rows(summary: Summary) -> list[tuple[str, str, str, str]]:
    """(measure, p50, p90, p99) rows in milliseconds, for the terminal and HTML tables."""
    rows = []
    for name, p in (
        ("TTFT", summary.ttft),
        ("time per output token", summary.tpot),
        ("inter-token latency", summary.itl),
        ("end-to-end", summary.e2e),
        ("cut-to-next-byte", summary.cut_gap),
    ):
        if p.n or name != "cut-to-next-byte":
            rows.append((name, _fmt_ms(p.p50), _fmt_ms(p.p90), _fmt_ms(p.p99)))
    return rows


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _kv(items: Mapping[str, object]) -> str:
    return _table(("", ""), [(k, v) for k, v in items.items()])


def write_html(report: BenchReport, path: Path, plots: Sequence[Path]) -> None:
    """Write one self-contained HTML file: the tables and the PNG plots inlined as data."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>unbroken bench report</title><style>",
        "body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;",
        "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}",
        "img{max-width:100%;border:1px solid #eee;margin:.5em 0}.warn{color:#a60}",
        "</style></head><body>",
        "<h1>unbroken bench</h1>",
        f"<p>started {html.escape(report.started_at)}"
        + (" &middot; <b class='warn'>interrupted</b>" if report.interrupted else "")
        + "</p>",
        "<h2>Settings</h2>",
        _kv({k: json.dumps(v) if not isinstance(v, str) else v for k, v in report.config.items()}),
    ]
    for mode, summary in report.summaries.items():
        parts.append(f"<h2>{html.escape(mode)}</h2>")
        if mode in report.unsupported:
            parts.append(f"<p class='warn'>{html.escape(report.unsupported[mode])}</p>")
        parts.append(
            _kv(
                {
                    "requests": summary.n_requests,
                    "ok": summary.n_ok,
                    "requests/s": f"{summary.requests_per_s:.2f}",
                    "tokens/s": f"{summary.tokens_per_s:.1f}",
                    "completion tokens": summary.completion_tokens,
                    "tokens received": summary.tokens_received,
                    "upstream attempts": summary.upstream_attempts,
                    "duration (s)": f"{summary.duration_s:.2f}",
                }
            )
        )
        parts.append(_table(("ms", "p50", "p90", "p99"), summary_rows(summary)))
        if summary.errors:
            parts.append("<h3>Errors by kind</h3>")
            parts.append(_table(("kind", "count"), sorted(summary.errors.items())))
        if summary.integrity:
            parts.append("<h3>Recovery: answers against the fault-free reference</h3>")
            rows = [*sorted(summary.integrity.items())]
            rows += [("extra bytes", summary.extra_bytes), ("missing bytes", summary.missing_bytes)]
            parts.append(_table(("answers", "count"), rows))
    parts.append("<h2>Plots</h2>")
    for png in plots:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
