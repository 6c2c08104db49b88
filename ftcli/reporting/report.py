"""`ftcli report`: for each run a metrics table, curves.png and a diagnosis; a comparison figure
across runs; optionally one self-contained report.html to share (ftcli.reporting.html)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json, read_json
from ftcli.metrics import higher_is_better
from ftcli.reporting.curves import comparison_figure, reliability_figure, run_figure, write_png
from ftcli.reporting.diagnosis import Diagnosis, diagnose
from ftcli.reporting.events import best_eval_step, eval_metric_names, finite, series
from ftcli.reporting.formatting import format_flops, format_number
from ftcli.runs.rundir import CALIBRATION_FILE, RunDir
from ftcli import tasks

COMPARISON_PNG = "comparison.png"


@dataclass
class RunReport:
    run: RunDir
    label: str
    events: list[dict[str, Any]]
    metrics: dict[str, Any]  # metrics.json
    config_text: str
    diagnosis: Diagnosis
    calibration: dict[str, Any] | None = None  # model/calibration.json
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> eval_<split>.json
    task: str = tasks.DEFAULT  # config.task, which names what its tables hold (Task.class_noun)
    gate: dict[str, Any] | None = None  # distill.json: a distilled student beside its teacher


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
    audit: dict[str, Any] | None = None  # ftcli audit: cross_validation.json, and label_issues under "label_issues"


# ---------------------------------------------------------------- building


def analyze_run(run: RunDir, label: str | None = None, draw: bool = True) -> RunReport:
    """Read a run's events, diagnose them, write curves.png and diagnosis.json beside them (with
    draw False, the figures its training drew stay as they are)."""
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
    calibration_file = run.model_dir / CALIBRATION_FILE
    calibration = read_json(calibration_file, run.repair_hint) if calibration_file.is_file() else None
    evaluations = [read_json(path, run.repair_hint) for path in run.eval_files()]
    evaluated = {evaluation["split"]: evaluation for evaluation in evaluations}
    gate = read_json(run.gate_file, run.repair_hint) if run.gate_file.is_file() else None
    # The kept model's validation scores, with what evaluate found on them when it ran.
    validation = evaluated.get("validation") or metrics.get("validation")
    diagnosis = diagnose(events, metrics.get("data"), config, calibration, validation)
    report = RunReport(
        run, label or run.path.name, events, metrics, config_text, diagnosis, calibration, evaluated, config.get("task") or tasks.DEFAULT, gate
    )
    title = f"{report.label}: {diagnosis.verdict.replace('_', ' ')}"
    if draw:
        write_png(run_figure(events, title, best_step=best_eval_step(events)), run.curves_png)
        if calibration is not None:
            write_png(reliability_figure(calibration), run.calibration_png)
    atomic_write_json(run.diagnosis_file, diagnosis.to_json())
    return report


def build_report(paths: list[Path], folder: Path | None = None, draw_runs: bool = True) -> Report:
    """Analyze every run (redrawing its figures unless draw_runs is False); with several, draw them together.

    The comparison figure (and report.html, ftcli.reporting.html) go into folder: by default the
    run directory itself, or the folder that holds all the runs.
    """
    runs = [RunDir.open(path) for path in dict.fromkeys(Path(path).resolve() for path in paths)]
    labels = _labels(runs)
    analyzed = [analyze_run(run, label, draw_runs) for run, label in zip(runs, labels)]
    report = Report(analyzed, folder or _common_folder(runs))
    if len(report.runs) > 1:
        report.folder.mkdir(parents=True, exist_ok=True)
        figure = comparison_figure({run.label: run.events for run in report.runs})
        report.comparison_png = write_png(figure, report.folder / COMPARISON_PNG)
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


def metric_rows(report: RunReport) -> list[MetricRow]:
    """Validation metrics (best, where, last evaluation, kept model), then the training loss."""
    saved = report.metrics.get("validation") or {}
    rows = []
    for name in eval_metric_names(report.events):
        points = finite(series(report.events, f"eval_{name}"))
        rows.append(_row(name, points, lower_is_better=not higher_is_better(name), saved=saved.get(name)))
    rows.append(_row("train_loss", finite(series(report.events, "train_loss")), lower_is_better=True, saved=None))
    return rows


def _row(name: str, points: list[tuple[int, float]], lower_is_better: bool, saved: float | None) -> MetricRow:
    if not points:
        return MetricRow(name, None, None, None, saved)
    pick = min if lower_is_better else max
    best_step, best = pick(points, key=lambda pair: pair[1])
    return MetricRow(name, best, best_step, points[-1][1], saved)


def gate_table(gate: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """distill.json's teacher and student side by side: each metric per split, the parameters and
    the examples a second on each device timed; (header, rows)."""
    sides = gate["models"]
    splits = list(sides["teacher"]["metrics"])
    metrics = list(sides["teacher"]["metrics"][splits[0]])
    devices = list(sides["teacher"]["examples_per_second"])
    header = ["model", *(f"{split} {name}" for split in splits for name in metrics), "parameters", *(f"examples/s {device}" for device in devices)]
    rows = [
        [
            name, *(format_number(side["metrics"][split].get(metric)) for split in splits for metric in metrics),
            _count(side["parameters"]), *(f"{side['examples_per_second'][device]:,.0f}" for device in devices),
        ]
        for name, side in sides.items()
    ]
    return header, rows


def gate_verdict(gate: dict[str, Any]) -> tuple[str, str]:
    """The gate in one line: passed or failed, and why (by how much the first metric moved, and
    what the student saves)."""
    # drop is signed by the metric's direction (a worse mse drops too): below 0 the student is better.
    moved = f"dropped by {gate['drop']:.4f}" if gate["drop"] >= 0 else f"improved by {-gate['drop']:.4f}"
    speed = ", ".join(f"{rate:.2f}x as fast on {device}" for device, rate in gate["speedup"].items())
    why = f"{gate['metric']} on {gate['split']} {moved} (max {gate['max_drop']}); {gate['smaller']:.2f}x fewer parameters, {speed}"
    return "passed" if gate["passed"] else "failed", why


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.2f}M" if parameters >= 1_000_000 else f"{parameters:,}"


def run_stats(report: RunReport) -> dict[str, str]:
    """Steps, epochs, wall time, throughput, achieved FLOP/s and peak GPU memory, from metrics.json (or the events of an unfinished run)."""
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
    if "achieved_flops_per_second" in train:  # model FLOPs over the training time (training/flops.py)
        stats["achieved"] = f"{format_flops(train['achieved_flops_per_second'])}/s"
    if "peak_gpu_memory_bytes" in train:  # runs on a GPU (runtime.peak_memory)
        stats["peak GPU memory"] = f"{train['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"
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
