"""Learning-curve figures render headless into real PNGs, whatever the events hold."""

from __future__ import annotations

import math
import struct

from test_diagnosis import decaying, events_for

from ftcli.reporting.curves import DPI, comparison_figure, png_bytes, run_figure, write_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, the first after the magic bytes."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_run_figure_is_a_readable_png(tmp_path):
    events = events_for(decaying(60), [0.3, 0.21, 0.2, 0.195, 0.196, 0.195], [0.85, 0.9, 0.91, 0.91, 0.91, 0.91])
    figure = run_figure(events, "tiny: converged", best_step=200)
    path = write_png(figure, tmp_path / "curves.png")
    data = path.read_bytes()
    assert png_size(data) == (12 * DPI, 8 * DPI)
    assert len(data) > 30_000  # four panels of lines and text, not a blank canvas

    loss, metrics, rate, norm = figure.axes[:4]
    assert figure.get_suptitle() == "tiny: converged"
    assert [axes.get_title() for axes in (loss, metrics, rate, norm)] == [
        "Loss",
        "Validation metrics",
        "Learning rate",
        "Gradient norm (before clipping)",
    ]
    assert rate.get_xlabel() == "optimizer step" and loss.get_ylabel() == "loss"
    legend = [text.get_text() for text in loss.get_legend().get_texts()]
    assert legend == ["training", "validation", "lowest validation loss (step 200)"]
    assert [text.get_text() for text in metrics.get_legend().get_texts()] == ["accuracy"]
    assert [child.get_xlabel() for child in loss.child_axes] == ["epoch"]  # the secondary epoch axis on top


def test_wide_loss_range_switches_to_log_scale():
    events = events_for(decaying(60, start=0.7, floor=0.0005, rate=5), [0.05, 0.002, 0.001])
    loss_axes = run_figure(events, "long").axes[0]
    assert loss_axes.get_yscale() == "log"
    assert run_figure(events_for(decaying(60)), "short").axes[0].get_yscale() == "linear"


def test_nan_losses_and_missing_evaluations_still_draw():
    events = events_for(decaying(20) + [math.nan, math.inf] * 5)
    figure = run_figure(events, "broken")
    data = png_bytes(figure)
    assert data.startswith(PNG_MAGIC)
    loss_legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "loss NaN/inf from step 105" in loss_legend
    assert figure.axes[1].texts[0].get_text() == "no evaluations logged"


def test_a_single_event_draws():
    assert png_bytes(run_figure([{"step": 1, "epoch": 0.1, "train_loss": 0.7}], "one log")).startswith(PNG_MAGIC)


def test_comparison_figure_has_one_line_per_run():
    runs = {
        "low-lr": events_for(decaying(60, rate=30), [0.5, 0.4, 0.35], [0.7, 0.8, 0.82], start_lr=1e-6),
        "high-lr": events_for(decaying(60, rate=5), [0.3, 0.25, 0.3], [0.85, 0.88, 0.86], start_lr=1e-3),
    }
    figure = comparison_figure(runs)
    assert png_size(png_bytes(figure)) == (12 * DPI, 8 * DPI)
    train, evaluation, metric, rate = figure.axes[:4]
    for axes in (train, evaluation, metric, rate):
        assert [text.get_text() for text in axes.get_legend().get_texts()] == ["low-lr", "high-lr"]
    assert metric.get_title() == "Validation accuracy"
    assert rate.get_yscale() == "log"  # learning rates 1000x apart
