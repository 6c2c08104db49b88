"""report.html: one self-contained page (images as base64 PNGs, inline styles, no network)."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from ftcli.fileio import atomic_write_text
from ftcli.reporting.curves import DPI, FULL_WIDTH, confusion_figure, png_bytes, png_width, scores_figure
from ftcli.reporting.diagnosis import Finding
from ftcli.reporting.events import eval_metric_names
from ftcli.reporting.formatting import format_number
from ftcli.reporting.report import Report, RunReport, build_report, gate_table, gate_verdict, metric_rows, run_stats
from ftcli import tasks

REPORT_HTML = "report.html"


def write_html(report: Report) -> Path:
    """report.html in the report's folder, recorded in report.html."""
    report.html = report.folder / REPORT_HTML
    atomic_write_text(report.html, render_html(report))
    return report.html

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin: 8px 0; } h3 { font-size: 15px; }
.muted { color: #656d76; font-size: 13px; }
.runs { display: grid; grid-template-columns: repeat(var(--columns), minmax(520px, 1fr)); gap: 24px; overflow-x: auto; }
.run { border: 1px solid #d0d7de; border-radius: 8px; padding: 16px; min-width: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #d0d7de; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; display: block; margin: 8px 0; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 12px; color: white; font-weight: 600; font-size: 13px; }
.converged { background: #1a7f37; } .still_improving { background: #0969da; } .inconclusive { background: #656d76; }
.overfitting, .underfitting, .weak_spots { background: #bf8700; } .unstable { background: #cf222e; } .overconfidence { background: #8250df; }
.passed { background: #1a7f37; } .failed { background: #cf222e; }
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
    if report.audit is not None:
        parts.append(_audit_section(report.audit))
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
            _gate_section(run),
            "<h3>Diagnosis</h3>",
            *(_finding(finding) for finding in diagnosis.findings),
            _calibration_section(run),
            *(_evaluation_section(split, record, tasks.get(run.task).class_noun) for split, record in run.evaluations.items()),
            "<details><summary>Resolved config</summary>",
            f'<pre class="config">{_escape(run.config_text)}</pre>',
            "</details>",
            "</section>",
        ]
    )


def write_audit_html(runs: list[Path], folder: Path, audit: dict[str, Any]) -> Path:
    """The audit's report.html: its folds side by side under the cross-validated metrics and the label issues."""
    # Each fold drew its curves.png and calibration.png when it trained (ftcli.commands.train).
    report = build_report(runs, folder=folder, draw_runs=False)
    report.audit = audit
    return write_html(report)


AUDIT_ISSUES_SHOWN = 200  # the page lists the likeliest; label_issues.csv has them all


def _audit_section(audit: dict[str, Any]) -> str:
    metrics = [
        [name, format_number(values["mean"]), format_number(values["std"]), ", ".join(format_number(v) for v in values["folds"])]
        for name, values in audit["metrics"].items()
    ]
    issues = audit["label_issues"]
    columns = [key for key in issues[0] if key != "quality"] + ["quality"] if issues else []
    rows = [[format_number(issue[key]) if key == "quality" else str(issue[key]) for key in columns] for issue in issues[:AUDIT_ISSUES_SHOWN]]
    return "\n".join([
        f"<h2>Cross-validation: {audit['folds']} folds of {audit['examples']} training examples</h2>",
        _table(["metric", "mean", "std", "per fold"], metrics, css="metrics"),
        f"<h2>Label issues: {len(issues)} training examples whose labels are probably wrong</h2>",
        '<p class="muted">Out-of-fold probabilities read by cleanlab (confident learning), the likeliest first; '
        f"the first {min(len(issues), AUDIT_ISSUES_SHOWN)} of label_issues.csv.</p>",
        _table(columns, rows, css="issues") if issues else "<p>None found.</p>",
    ])


def _calibration_section(run: RunReport) -> str:
    if run.calibration is None:
        return ""
    rows = [[when, *(format_number(run.calibration[when][key]) for key in ("ece", "brier", "log_loss"))] for when in ("before", "after")]
    return "\n".join([
        f"<h3>Calibration (temperature {run.calibration['temperature']:.3f}, fitted on validation)</h3>",
        _table(["", "ece", "brier", "log_loss"], rows, css="metrics"),
        _image(run.run.calibration_png.read_bytes(), "reliability diagram before and after calibration"),
    ])


def _gate_section(run: RunReport) -> str:
    """A distilled student's gate (distill.json): it beside its teacher, and the verdict."""
    if run.gate is None:
        return ""
    header, rows = gate_table(run.gate)
    word, why = gate_verdict(run.gate)
    return "\n".join([
        f"<h3>Distillation gate (teacher {_escape(run.gate['teacher'])})</h3>",
        _table(header, rows, css="metrics"),
        f'<p class="gate">{_badge(word)} {_escape(why)}</p>',
    ])


# What a list of the error analysis is called, in the order the page shows them.
LISTS = (
    ("residuals", "Residuals by true value"), ("confused_pairs", "Most confused"), ("confident_mistakes", "Surest mistakes"),
    ("entity_errors", "Entity errors by kind"), ("error_examples", "Entity errors, a few of each kind"),
    ("worst_sentences", "Sentences with the most entity errors (each word's gold→predicted tags)"), ("highest_loss", "Highest loss"),
)


def _evaluation_section(split: str, record: dict[str, Any], noun: str = "class") -> str:
    """What ftcli evaluate found on a split: per class (noun: what a row is, e.g. an entity type)
    or label, the confusion matrix, the residuals, and every listed example (the surest mistakes,
    the highest losses, a tagger's entity errors)."""
    errors = record.get("errors", {})
    parts = [f"<h3>Errors on {_escape(split)}</h3>"]
    if "decision_threshold" in record:
        parts.append(f'<p class="muted">decision threshold {record["decision_threshold"]:.2f}</p>')
    per_class = errors.get("per_class") or _per_label_rows(record.get("per_label"))
    if per_class:
        parts.append(_table(["label", "precision", "recall", "f1", "support"], [
            [row["label"], *(format_number(row[key]) for key in ("precision", "recall", "f1")), str(row["support"])] for row in per_class
        ], css="metrics"))
        named = noun if errors.get("per_class") else "label"
        parts.append(_image(png_bytes(scores_figure(per_class, f"F1 per {named} on {split}")), f"F1 per {noun}"))
    # A tagger's entity errors say what its matrix of word tags (mostly O) cannot: which entities went wrong, and how.
    if "confusion_matrix" in record and "entity_errors" not in errors:
        matrix = record["confusion_matrix"]
        parts.append(_image(png_bytes(confusion_figure(matrix["labels"], matrix["counts"])), "confusion matrix"))
    for key, title in LISTS:
        if errors.get(key):
            header = [column for column in errors[key][0] if column != "index"]
            rows = [[_cell(entry[column]) for column in header] for entry in errors[key]]
            parts += [f"<h4>{title}</h4>", _table(header, rows, css="examples")]
    return "\n".join(parts)


def _per_label_rows(per_label: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not per_label:
        return []
    return [
        {"label": label, "precision": per_label["precision"][index], "recall": per_label["recall"][index],
         "f1": per_label["f1"][index], "support": int(per_label["support"][index])}
        for index, label in enumerate(per_label["labels"])
    ]


def _cell(value: Any) -> str:
    return format_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


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
    """Every figure at one scale: its share of the column is its width over the learning curves'
    (which fill it), so text and markers read the same size in each; a 6-inch reliability diagram
    stretched to the column would be drawn at twice the curves' scale."""
    share = min(1.0, png_width(png) / (FULL_WIDTH * DPI))
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_escape(alt)}" src="data:image/png;base64,{encoded}" style="width: {share:.1%}">'


def _badge(verdict: str) -> str:
    return f'<span class="verdict {verdict}">{_escape(verdict.replace("_", " "))}</span>'


def _escape(text: str) -> str:
    return html.escape(str(text), quote=True)
