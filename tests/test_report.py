"""`ftcli report` and the files training writes at its end: curves.png, diagnosis.json, report.html."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import invoke
from test_curves import PNG_MAGIC, png_size
from test_diagnosis import decaying, events_for


VERDICTS = {"converged", "still_improving", "overfitting", "overconfidence", "underfitting", "unstable", "inconclusive"}


def assert_run_report_files(run: Path) -> dict:
    """curves.png is a real picture and diagnosis.json a verdict with evidence and remedies."""
    png = (run / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and png_size(png) == (1200, 800) and len(png) > 30_000
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert diagnosis["verdict"] in VERDICTS
    assert diagnosis["findings"][0]["verdict"] == diagnosis["verdict"]
    assert {"summary", "evidence", "remedies"} <= set(diagnosis["findings"][0])
    return diagnosis


def assert_self_contained(page: str) -> None:
    """Nothing the page shows comes from the network."""
    assert "http://" not in page and "https://" not in page
    for reference in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert reference.startswith("data:image/png;base64,"), reference
    assert "<link" not in page and "<script" not in page


def write_run(folder: Path, name: str, train: list[float], evals: list[float], metrics: dict | None = None) -> Path:
    """A run directory as training leaves it, from synthetic curves: enough for report."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "training": {"learning_rate": 5e-5, "epochs": 6}}))
    events = events_for(train, evals, [0.8] * len(evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_train_writes_curves_and_diagnosis_and_report_renders_html(make_experiment, tmp_path):
    experiment = make_experiment(report_to=["tensorboard"])
    trained = invoke("train", str(experiment))
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "tiny"
    assert "diagnosis: " in trained.output and "curves: " in trained.output
    diagnosis = assert_run_report_files(run)
    assert diagnosis["verdict"] in ("converged", "still_improving"), diagnosis  # the task is learnable
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"] == {"majority_class": "negative", "majority_rate": 0.5, "num_labels": 2}
    assert not [key for key in metrics["train"] if key.startswith("peak_gpu")]  # a CPU run reports no GPU memory
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    (run / "curves.png").unlink()
    reported = invoke("report", str(run), "--html")
    assert reported.exit_code == 0, reported.output
    assert (run / "curves.png").is_file()
    for expected in ("best", "last eval", "saved model", "accuracy", "train_loss", "samples/s", "diagnosis: "):
        assert expected in reported.output
    assert "peak GPU memory" not in reported.output
    page = (run / "report.html").read_text()
    assert f"html report: {run / 'report.html'}" in reported.output.replace("\n", "")
    assert_self_contained(page)
    assert page.count('<img alt="learning curves of tiny" src="data:image/png;base64,') == 1
    assert '<table class="metrics">' in page and "<th>saved model</th>" in page and "<td>accuracy</td>" in page
    assert "learning_rate: 0.005" in page and "report_to:" in page  # the resolved config
    assert f'class="verdict {diagnosis["verdict"]}"' in page and '<table class="evidence">' in page


def test_a_gpu_run_keeps_its_training_peak_memory_and_report_shows_it(make_experiment, tmp_path, monkeypatch):
    """The recipe resets the GPU's peak counter before the backend trains and reads it after (the
    helpers themselves: test_runtime); faked here, as this machine has no GPU."""
    from ftcli.training import recipe

    calls: list[str] = []
    peak = {"peak_gpu_memory_bytes": 3 * 2**29, "peak_gpu_memory_reserved_bytes": 2**31}
    train = recipe.run_backend
    monkeypatch.setattr(recipe, "reset_peak_memory", lambda device: calls.append("reset"))
    monkeypatch.setattr(recipe, "run_backend", lambda backend, job: calls.append("train") or train(backend, job))
    monkeypatch.setattr(recipe, "peak_memory", lambda device: calls.append("read") or peak)
    trained = invoke("train", str(make_experiment(training={"epochs": 1})))
    assert trained.exit_code == 0, trained.output
    assert calls == ["reset", "train", "read"]
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["train"].items() >= peak.items()
    reported = invoke("report", str(run))
    assert reported.exit_code == 0, reported.output
    assert "peak GPU memory 1.50 GiB" in reported.output


def test_report_compares_several_runs_side_by_side(tmp_path):
    runs = tmp_path / "runs"
    overfit = write_run(runs, "overfit", decaying(60, floor=0.01), [0.45, 0.33, 0.30, 0.34, 0.40, 0.47])
    healthy = write_run(
        runs,
        "healthy",
        decaying(60),
        [0.3, 0.21, 0.2, 0.195, 0.196, 0.195],
        metrics={"train": {"global_step": 300, "epoch": 6.0, "train_seconds": 125.0, "train_samples_per_second": 19.2,
                           "achieved_flops_per_second": 1.254e12}},
    )
    result = invoke("report", str(overfit), str(healthy), "--html")
    assert result.exit_code == 0, result.output
    output = result.output.replace("\n", "")
    assert f"comparison: {runs / 'comparison.png'}" in output and f"html report: {runs / 'report.html'}" in output
    assert "wall time 2m 05s" in output and "throughput 19.2 samples/s" in output and "achieved 1.25 TFLOP/s" in output
    assert "unfinished" in output  # the run without metrics.json
    assert png_size((runs / "comparison.png").read_bytes()) == (1200, 800)
    assert json.loads((overfit / "diagnosis.json").read_text())["verdict"] == "overfitting"
    assert json.loads((healthy / "diagnosis.json").read_text())["verdict"] == "converged"

    page = (runs / "report.html").read_text()
    assert_self_contained(page)
    assert page.count("<img ") == 3  # the comparison and each run's curves
    assert page.count('<section class="run">') == 2 and "--columns: 2" in page
    assert '<table class="summary">' in page and "<td>overfitting</td>" in page and "<td>converged</td>" in page


def test_runs_with_the_same_name_are_labelled_by_path(tmp_path):
    first = write_run(tmp_path / "a", "tiny", decaying(60), [0.3, 0.21, 0.2])
    second = write_run(tmp_path / "b", "tiny", decaying(60), [0.3, 0.21, 0.2])
    result = invoke("report", str(first), str(second), "--out", str(tmp_path / "shared"))
    assert result.exit_code == 0, result.output
    titles = [line.strip() for line in result.output.splitlines() if line.strip().endswith("/tiny")]
    assert titles == ["a/tiny", "b/tiny"]
    assert (tmp_path / "shared" / "comparison.png").is_file()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "is not an ftcli run directory"),
        (lambda tmp: write_run(tmp, "empty", [], []), "has no logged events"),
    ],
)
def test_report_errors_are_one_line(tmp_path, make, message):
    result = invoke("report", str(make(tmp_path)))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_report_on_a_trainer_backend_run(make_experiment, tmp_path):
    experiment = make_experiment(backend="trainer", training={"epochs": 2})
    assert invoke("train", str(experiment)).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    for file in ("curves.png", "diagnosis.json"):
        (run / file).unlink()
    reported = invoke("report", str(run), "--html")
    assert reported.exit_code == 0, reported.output
    assert_run_report_files(run)
    assert_self_contained((run / "report.html").read_text())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any({"train_loss", "learning_rate", "grad_norm"} <= set(event) for event in events)
    assert any({"eval_loss", "eval_accuracy", "eval_f1"} <= set(event) for event in events)
    shutil.rmtree(run)


def test_report_html_shows_every_figure_at_one_scale(tmp_path):
    """The reliability diagram, the F1 bars and the confusion matrix are drawn at the learning curves'
    scale (their share of the column is their width over the curves'), not stretched to the column."""
    run = write_run(tmp_path, "calibrated", decaying(60), [0.3, 0.21, 0.2])
    bins = {"confidence": [0.55, 0.75, 0.95], "accuracy": [0.5, 0.7, 0.8], "count": [10, 20, 30]}
    scores = {"ece": 0.115, "brier": 0.29, "log_loss": 0.52, "reliability": bins}
    (run / "model").mkdir()
    (run / "model" / "calibration.json").write_text(json.dumps({"temperature": 1.6, "before": scores, "after": scores | {"ece": 0.05}}))
    per_class = [{"label": name, "precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 10} for name in ("neg", "pos")]
    record = {"split": "validation", "errors": {"per_class": per_class}, "confusion_matrix": {"labels": ["neg", "pos"], "counts": [[7, 3], [2, 8]]}}
    (run / "eval_validation.json").write_text(json.dumps(record))
    assert invoke("report", str(run), "--html").exit_code == 0
    page = (run / "report.html").read_text()

    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]*)" style="width: ([0-9.]+)%">', page)
    assert len(images) == page.count("<img ") == 4  # curves, reliability, F1 per class, confusion matrix
    shown = {alt: (png_size(base64.b64decode(data))[0], float(share)) for alt, data, share in images}
    assert shown["learning curves of calibrated"] == (1200, 100.0)
    for pixels, share in shown.values():
        assert share == pytest.approx(100 * min(pixels, 1200) / 1200, abs=0.05)  # one scale for every figure
    # The reliability diagram is as wide as one of the curves' four panels, not the whole column.
    assert shown["reliability diagram before and after calibration"] == (600, 50.0)
    style = page.split("<style>")[1].split("</style>")[0]
    assert re.search(r"\nimg \{ max-width: 100%;", style) and not re.search(r"\bwidth: 100%", style.replace("max-width", ""))
