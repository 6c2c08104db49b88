"""`ftcli report`: for each run a metrics table, curves.png and a diagnosis; a comparison figure
across runs; optionally one self-contained report.html to share.

The HTML page needs no network: images are base64 PNGs and the styles are inline.
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftcli.curves import comparison_figure, run_figure, write_png
from ftcli.diagnosis import Diagnosis, Finding, diagnose, eval_metric_names, series
from ftcli.errors import FtcliError
from ftcli.rundir import RunDir, atomic_write_json, atomic_write_text
from ftcli.ui import format_value

REPORT_HTML = "report.html"
COMPARISON_PNG = "comparison.png"


@dataclass
class RunReport:
    run: RunDir
    label: str
    events: list[dict[str, Any]]
    metrics: dict[str, Any]  # metrics.json
    config_text: str
    diagnosis: Diagnosis


@dataclass
class MetricRow:
    name: str
    best: float | None
    best_step: int | None
    last: float | None
    saved: float | None  # metrics.json: the kept (best) model, scored after training


@dataclass
class Report:
    runs: list[RunReport]
    folder: Path
    comparison_png: Path | None = None
    html: Path | None = None


# ---------------------------------------------------------------- building


def analyze_run(run: RunDir, label: str | None = None) -> RunReport:
    """Read a run's events, diagnose them, write curves.png and diagnosis.json beside them."""
    events = run.read_events()
    if not events:
        raise FtcliError(
            f"{run.path} has no logged events (metrics.jsonl is missing or empty)",
            "train it first; events are logged every training.logging_steps steps",
        )
    config_text = run.config_file.read_text(encoding="utf-8")
    # The raw mapping, not a validated Config: an old run's config need not pass today's checks.
    config = yaml.safe_load(config_text) or {}
    metrics = run.read_metrics()
    diagnosis = diagnose(events, metrics.get("data"), config)
    report = RunReport(run, label or run.path.name, events, metrics, config_text, diagnosis)
    title = f"{report.label}: {diagnosis.verdict.replace('_', ' ')}"
    write_png(run_figure(events, title, best_step=best_eval_step(events)), run.curves_png)
    atomic_write_json(run.diagnosis_file, diagnosis.to_json())
    return report


def build_report(paths: list[Path], html_page: bool = False, folder: Path | None = None) -> Report:
    """Analyze every run; with several, draw them together; with html_page, write report.html.

    The comparison figure and report.html go into folder: by default the run directory itself,
    or the folder that holds all the runs.
    """
    runs = [RunDir.open(path) for path in dict.fromkeys(Path(path).resolve() for path in paths)]
    labels = _labels(runs)
    report = Report([analyze_run(run, label) for run, label in zip(runs, labels)], folder or _common_folder(runs))
    if len(report.runs) > 1:
        report.folder.mkdir(parents=True, exist_ok=True)
        figure = comparison_figure({run.label: run.events for run in report.runs})
        report.comparison_png = write_png(figure, report.folder / COMPARISON_PNG)
    if html_page:
        report.html = report.folder / REPORT_HTML
        atomic_write_text(report.html, render_html(report))
    return report


def _labels(runs: list[RunDir]) -> list[str]:
    """Run names, or paths relative to their common folder when two runs share a name."""
    names = [run.path.name for run in runs]
    if len(set(names)) == len(names):
        return names
    common = _common_folder(runs)
    return [str(run.path.relative_to(common)) for run in runs]


def _common_folder(runs: list[RunDir]) -> Path:
    if len(runs) == 1:
        return runs[0].path
    return Path(os.path.commonpath([run.path for run in runs]))


# ---------------------------------------------------------------- table data


def best_eval_step(events: list[dict[str, Any]]) -> int | None:
    losses = _finite(series(events, "eval_loss"))
    return min(losses, key=lambda pair: pair[1])[0] if losses else None


def _finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, value) for step, value in points if math.isfinite(value)]


def metric_rows(report: RunReport) -> list[MetricRow]:
    """Validation metrics (best, where, last evaluation, kept model), then the training loss."""
    saved = report.metrics.get("validation") or {}
    rows = []
    for name in eval_metric_names(report.events):
        points = _finite(series(report.events, f"eval_{name}"))
        rows.append(_row(name, points, lower_is_better=name == "loss", saved=saved.get(name)))
    rows.append(_row("train_loss", _finite(series(report.events, "train_loss")), lower_is_better=True, saved=None))
    return rows


def _row(name: str, points: list[tuple[int, float]], lower_is_better: bool, saved: float | None) -> MetricRow:
    if not points:
        return MetricRow(name, None, None, None, saved)
    pick = min if lower_is_better else max
    best_step, best = pick(points, key=lambda pair: pair[1])
    return MetricRow(name, best, best_step, points[-1][1], saved)


def run_stats(report: RunReport) -> dict[str, str]:
    """Steps, epochs, wall time and throughput, from metrics.json (or the events of an unfinished run)."""
    train = report.metrics.get("train") or {}
    last = report.events[-1]
    stats = {
        "steps": str(train.get("global_step", last.get("step", "?"))),
        "epochs": f"{train.get('epoch', last.get('epoch', 0)):.2f}",
    }
    if "train_seconds" in train:
        stats["wall time"] = _duration(train["train_seconds"])
    if "train_samples_per_second" in train:
        stats["throughput"] = f"{train['train_samples_per_second']:,.1f} samples/s"
    if train.get("stopped_early"):
        stats["stopped"] = "early"
    if "train" not in report.metrics:
        stats["status"] = "unfinished (no metrics.json train section)"
    return stats


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {seconds:02d}s"


def format_number(value: float | int | None) -> str:
    return "-" if value is None else format_value(value)


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin: 8px 0; } h3 { font-size: 15px; }
.muted { color: #656d76; font-size: 13px; }
.runs { display: grid; grid-template-columns: repeat(var(--columns), minmax(520px, 1fr)); gap: 24px; overflow-x: auto; }
.run { border: 1px solid #d0d7de; border-radius: 8px; padding: 16px; min-width: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #d0d7de; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { width: 100%; height: auto; border: 1px solid #eaeef2; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 12px; color: white; font-weight: 600; font-size: 13px; }
.converged { background: #1a7f37; } .still_improving { background: #0969da; } .inconclusive { background: #656d76; }
.overfitting, .underfitting { background: #bf8700; } .unstable { background: #cf222e; }
.finding { margin: 8px 0 12px; } .evidence td, .evidence th { font-family: ui-monospace, Menlo, monospace; }
pre { background: #f6f8fa; padding: 12px; border-radius: 6px; overflow-x: auto; font-size: 12px; }
"""


def render_html(report: Report) -> str:
    """One page: a summary (and comparison figure) across runs, then each run side by side."""
    columns = len(report.runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ftcli report: {_escape(', '.join(run.label for run in report.runs))}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>ftcli report</h1>",
        f'<p class="muted">{columns} run{"s" if columns > 1 else ""}, generated {time.strftime("%Y-%m-%d %H:%M")}</p>',
    ]
    if columns > 1:
        parts += ["<h2>Summary</h2>", _summary_table(report.runs)]
    if report.comparison_png:
        parts.append(_image(report.comparison_png.read_bytes(), "comparison of the runs' curves"))
    parts.append(f'<div class="runs" style="--columns: {columns}">')
    parts += [_run_section(run) for run in report.runs]
    parts += ["</div>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _run_section(run: RunReport) -> str:
    diagnosis = run.diagnosis
    stats = "  ·  ".join(f"{key} {value}" for key, value in run_stats(run).items())
    rows = [
        [row.name, format_number(row.best), format_number(row.best_step), format_number(row.last), format_number(row.saved)]
        for row in metric_rows(run)
    ]
    return "\n".join(
        [
            '<section class="run">',
            f"<h2>{_escape(run.label)} {_badge(diagnosis.verdict)}</h2>",
            f'<p class="muted">{_escape(str(run.run.path))}<br>{_escape(stats)}</p>',
            _table(["metric", "best", "at step", "last eval", "saved model"], rows, css="metrics"),
            _image(run.run.curves_png.read_bytes(), f"learning curves of {run.label}"),
            "<h3>Diagnosis</h3>",
            *(_finding(finding) for finding in diagnosis.findings),
            "<details><summary>Resolved config</summary>",
            f'<pre class="config">{_escape(run.config_text)}</pre>',
            "</details>",
            "</section>",
        ]
    )


def _summary_table(runs: list[RunReport]) -> str:
    metrics = list(dict.fromkeys(name for run in runs for name in eval_metric_names(run.events)))
    rows = []
    for run in runs:
        best = {row.name: row.best for row in metric_rows(run)}
        stats = run_stats(run)
        rows.append(
            [run.label, run.diagnosis.verdict.replace("_", " ")]
            + [format_number(best.get(name)) for name in metrics]
            + [stats["steps"], stats.get("wall time", "-")]
        )
    header = ["run", "diagnosis", *(f"best {name}" for name in metrics), "steps", "wall time"]
    return _table(header, rows, css="summary")


def _finding(finding: Finding) -> str:
    evidence = [[key, _evidence_value(value)] for key, value in finding.evidence.items() if value is not None]
    remedies = "".join(f"<li>{_escape(remedy)}</li>" for remedy in finding.remedies)
    return "\n".join(
        [
            '<div class="finding">',
            f"<p>{_badge(finding.verdict)} {_escape(finding.summary)}</p>",
            _table(["evidence", "value"], evidence, css="evidence") if evidence else "",
            f"<p>What to try:</p><ul>{remedies}</ul>" if remedies else "",
            "</div>",
        ]
    )


def _evidence_value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return format_number(value) if isinstance(value, (int, float)) else str(value)


def _table(header: list[str], rows: list[list[str]], css: str) -> str:
    head = "".join(f"<th>{_escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{_escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _badge(verdict: str) -> str:
    return f'<span class="verdict {verdict}">{_escape(verdict.replace("_", " "))}</span>'


def _escape(text: str) -> str:
    return html.escape(str(text), quote=True)
