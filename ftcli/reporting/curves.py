"""Learning-curve figures: one run's curves.png, and one figure comparing several runs.

Built on matplotlib's object API with the Agg canvas: no pyplot state and no display, so it works
headless, on servers and inside tests.
"""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ftcli.reporting.events import eval_metric_names, series, steps_per_epoch

# Above this many epochs, boundary lines would hide the curves.
MAX_EPOCH_LINES = 20
# Values spanning more than this ratio (a loss 0.7 -> 0.001, learning rates of several runs) are drawn
# on a log scale, or the small ones sit flat on the axis.
LOG_SCALE_RATIO = 100.0
DPI = 100
# The learning curves' width, in inches: the widest figure ftcli draws for a page, which the HTML
# report shows at its column's full width; every other figure is shown at the same scale.
FULL_WIDTH = 12
# The figures every training run draws (curves.png, calibration.png) and the comparison have a fixed
# size and fixed panels, so their margins are fixed too (fractions of the figure, room for the tick
# labels, the axis labels and the titles): matplotlib's constrained layout measured every text of the
# figure in an extra drawing pass, half the time of drawing it. The top row's titles of curves.png
# sit above its epoch axis.
RUN_MARGINS = {"left": 0.065, "right": 0.985, "bottom": 0.065, "top": 0.855, "wspace": 0.17, "hspace": 0.2}
COMPARISON_MARGINS = RUN_MARGINS | {"top": 0.9, "hspace": 0.25}
RELIABILITY_MARGINS = {"left": 0.11, "right": 0.97, "bottom": 0.1, "top": 0.93}


def run_figure(events: list[dict[str, Any]], title: str, best_step: int | None = None) -> Figure:
    """Loss (training and validation), validation metrics, learning rate and gradient norm over steps."""
    figure = Figure(figsize=(FULL_WIDTH, 8), dpi=DPI)
    FigureCanvasAgg(figure)
    loss_axes, metric_axes, rate_axes, norm_axes = figure.subplots(2, 2, sharex=True, gridspec_kw=RUN_MARGINS).flat
    figure.suptitle(title, fontsize=14, y=0.985)

    _line(loss_axes, series(events, "train_loss"), "training", alpha=0.8)
    _line(loss_axes, series(events, "eval_loss"), "validation", marker="o")
    if best_step is not None:
        loss_axes.axvline(best_step, color="tab:green", linestyle="--", label=f"lowest validation loss (step {best_step})")
    _mark_non_finite(loss_axes, events)
    _finish(loss_axes, "Loss", "loss")
    _log_scale_if_wide(loss_axes, [v for key in ("train_loss", "eval_loss") for _, v in series(events, key)])

    for name in eval_metric_names(events):
        if name != "loss":
            _line(metric_axes, series(events, f"eval_{name}"), name, marker="o")
    _finish(metric_axes, "Validation metrics", "score", empty="no evaluations logged")

    _line(rate_axes, series(events, "learning_rate"), "learning rate", color="tab:purple")
    _finish(rate_axes, "Learning rate", "learning rate")
    rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    _line(norm_axes, series(events, "grad_norm"), "gradient norm", color="tab:red")
    _finish(norm_axes, "Gradient norm (before clipping)", "norm")

    per_epoch = steps_per_epoch(events)
    for axes in (loss_axes, metric_axes, rate_axes, norm_axes):
        _mark_epochs(axes, events, per_epoch)
    for axes in (loss_axes, metric_axes):
        _epoch_axis(axes, per_epoch)
    for axes in (rate_axes, norm_axes):
        axes.set_xlabel("optimizer step")
    return figure


def comparison_figure(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """Several runs on shared panels: training loss, validation loss, first metric, learning rate."""
    figure = Figure(figsize=(FULL_WIDTH, 8), dpi=DPI)
    FigureCanvasAgg(figure)
    train_axes, eval_axes, metric_axes, rate_axes = figure.subplots(2, 2, gridspec_kw=COMPARISON_MARGINS).flat
    figure.suptitle(f"{len(runs)} runs compared", fontsize=14, y=0.985)
    # Each run's first metric (the one that picks its best model); named per run only when they differ.
    metrics = {label: next((name for name in eval_metric_names(events) if name != "loss"), None) for label, events in runs.items()}
    shown = " / ".join(dict.fromkeys(name for name in metrics.values() if name)) or "metric"
    for index, (label, events) in enumerate(runs.items()):
        color = f"C{index % 10}"
        _line(train_axes, series(events, "train_loss"), label, color=color, alpha=0.8)
        _line(eval_axes, series(events, "eval_loss"), label, color=color, marker="o")
        if metrics[label]:
            metric_label = label if "/" not in shown else f"{label} ({metrics[label]})"
            _line(metric_axes, series(events, f"eval_{metrics[label]}"), metric_label, color=color, marker="o")
        _line(rate_axes, series(events, "learning_rate"), label, color=color)
    _finish(train_axes, "Training loss", "loss")
    _finish(eval_axes, "Validation loss", "loss", empty="no evaluations logged")
    _finish(metric_axes, f"Validation {shown}", shown, empty="no evaluations logged")
    _finish(rate_axes, "Learning rate", "learning rate")
    for axes, key in ((train_axes, "train_loss"), (eval_axes, "eval_loss"), (rate_axes, "learning_rate")):
        _log_scale_if_wide(axes, [value for events in runs.values() for _, value in series(events, key)])
        axes.set_xlabel("optimizer step")
    metric_axes.set_xlabel("optimizer step")
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def write_png(figure: Figure, path: Path) -> Path:
    path.write_bytes(png_bytes(figure))
    return path


def png_width(png: bytes) -> int:
    """A PNG's width in pixels, from its IHDR chunk (the first, right after the 8-byte signature)."""
    return struct.unpack(">I", png[16:20])[0]


# ---------------------------------------------------------------- drawing helpers


def _line(axes: Axes, points: list[tuple[int, float]], label: str, **style: Any) -> None:
    if not points:
        return
    steps = [step for step, _ in points]
    # NaN and inf leave a gap rather than breaking the axis limits; _mark_non_finite shows where.
    values = [value if math.isfinite(value) else math.nan for _, value in points]
    # A single point draws no line: give it a marker so it shows.
    marker = style.pop("marker", None)
    if len(points) == 1:
        marker = "o"
    axes.plot(steps, values, label=label, marker=marker, markersize=4, linewidth=1.5, **style)


def _finish(axes: Axes, title: str, ylabel: str, empty: str = "nothing logged") -> None:
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="best", fontsize=8)
    else:
        axes.text(0.5, 0.5, empty, transform=axes.transAxes, ha="center", va="center", color="gray")


def _mark_non_finite(axes: Axes, events: list[dict[str, Any]]) -> None:
    bad = [step for key in ("train_loss", "eval_loss") for step, value in series(events, key) if not math.isfinite(value)]
    if bad:
        axes.axvline(min(bad), color="tab:red", linewidth=2, label=f"loss NaN/inf from step {min(bad)}")


def _log_scale_if_wide(axes: Axes, values: list[float]) -> None:
    positive = [value for value in values if math.isfinite(value) and value > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        axes.set_yscale("log")
        axes.set_ylabel(f"{axes.get_ylabel()} (log scale)")


def _mark_epochs(axes: Axes, events: list[dict[str, Any]], per_epoch: float | None) -> None:
    """Faint vertical lines where each epoch ends."""
    if not per_epoch:
        return
    last_step = max((event.get("step", 0) for event in events), default=0)
    epochs = int(last_step / per_epoch)
    if epochs > MAX_EPOCH_LINES:
        return
    for epoch in range(1, epochs + 1):
        axes.axvline(epoch * per_epoch, color="gray", linewidth=0.8, alpha=0.4, linestyle=":")


def _epoch_axis(axes: Axes, per_epoch: float | None) -> None:
    if per_epoch:
        top = axes.secondary_xaxis("top", functions=(lambda step: step / per_epoch, lambda epoch: epoch * per_epoch))
        top.set_xlabel("epoch")


# ---------------------------------------------------------------- error analysis and calibration


def reliability_figure(calibration: dict[str, Any]) -> Figure:
    """The reliability diagram: in each confidence bin, how often the model was right, before and
    after calibration; on the diagonal a model is as sure as it is right."""
    figure = Figure(figsize=(6, 5), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(gridspec_kw=RELIABILITY_MARGINS)
    axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
    for when, color in (("before", "tab:red"), ("after", "tab:blue")):
        bins = calibration[when]["reliability"]
        shown = [(c, a) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n]
        if shown:
            axes.plot(*zip(*shown), marker="o", color=color, label=f"{when} (ECE {calibration[when]['ece']:.3f})")
    axes.set_title(f"Reliability on validation (temperature {calibration['temperature']:.2f})")
    axes.set_xlabel("confidence")
    axes.set_ylabel("share right")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    return figure


def confusion_figure(labels: list[str], counts: list[list[int]]) -> Figure:
    """The confusion matrix as a heat map, each row (true class) scaled to its own examples."""
    import numpy as np

    matrix = np.asarray(counts, dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(2 + 0.5 * len(labels), 14)
    figure = Figure(figsize=(size, size), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 4 else 0)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(labels) <= 12:
        for row in range(len(labels)):
            for column in range(len(labels)):
                axes.text(column, row, int(matrix[row, column]), ha="center", va="center",
                          color="white" if shares[row, column] > 0.5 else "black", fontsize=8)
    axes.set_title("Confusion matrix (shares of each true class)")
    return figure


def scores_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """Each class's (or label's) F1 as a bar, lowest first: where the model is weakest."""
    ordered = sorted(rows, key=lambda row: row["f1"])
    figure = Figure(figsize=(7, max(2.5, 0.28 * len(ordered) + 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.barh([row["label"] for row in ordered], [row["f1"] for row in ordered], color="tab:blue")
    axes.set_xlim(0, 1)
    axes.set_xlabel("F1")
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="x")
    return figure
