"""Everything ftcli shows on the terminal: progress, tables, errors. Logic lives elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ftcli import tasks
from ftcli.reporting.formatting import format_number, format_short, format_value

if TYPE_CHECKING:
    from ftcli.commands.audit import AuditResult
    from ftcli.commands.evaluate import Evaluation
    from ftcli.commands.sweep import SweepResult
    from ftcli.commands.train import TrainedRun
    from ftcli.config import Config
    from ftcli.reporting.diagnosis import Diagnosis
    from ftcli.reporting.report import Report, RunReport
    from ftcli.runtime import Runtime
    from ftcli.training.job import TrainOutcome

# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
_WIDTH = None if sys.stdout.isatty() else 120
console = Console(highlight=False, width=_WIDTH)
error_console = Console(stderr=True, highlight=False, width=_WIDTH)


def print_error(message: str) -> None:
    # Escaped: a message may hold brackets that are not markup, e.g. pip install 'ftcli[export]'.
    error_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def metrics_table(title: str, rows: dict[str, dict[str, Any]]) -> Table:
    """One row per split (or run), one column per metric."""
    columns: list[str] = []
    for values in rows.values():
        columns += [key for key in values if key not in columns]
    table = Table(title=title, title_justify="left")
    table.add_column("split")
    for column in columns:
        table.add_column(column, justify="right")
    for split, values in rows.items():
        table.add_row(split, *(format_value(values.get(column, "")) for column in columns))
    return table


# Beyond this many classes the confusion matrix stays in the JSON file: a terminal cannot show it.
CONFUSION_MAX_LABELS = 12


def evaluation_view(title: str, split: str, evaluation: Evaluation) -> Group:
    """ftcli evaluate's output, short: the metrics and the decision thresholds; calibration before
    and after; per class (or label, or entity type) scores; the most confused pairs, the surest
    mistakes, a tagger's entity errors and the highest-loss examples (or regression's residuals);
    then where everything was written."""
    parts: list = [metrics_table(title, {split: evaluation.metrics})]
    if tasks.get(evaluation.task).threshold_is_second_class and evaluation.thresholds:
        parts.append(f"decision threshold {evaluation.thresholds[0]:.2f} on the probability of '{escape(evaluation.labels[1])}'")
    if evaluation.calibration:
        parts.append(calibration_table(evaluation.calibration))
    analysis = evaluation.analysis
    if evaluation.confusion is not None:
        parts += [per_class_table(analysis["per_class"], tasks.get(evaluation.task).class_noun), confusion_table(evaluation.labels, evaluation.confusion)]
    if evaluation.per_label is not None:
        parts.append(per_label_table(evaluation.labels, evaluation.per_label, evaluation.thresholds))
    if "residuals" in analysis:
        parts.append(residual_table(analysis["residuals"]))
    for key, title_text in (("confused_pairs", "most confused"), ("confident_mistakes", "surest mistakes"), *ENTITY_ERRORS, ("highest_loss", "highest loss")):
        if analysis.get(key):
            parts.append(examples_table(title_text, analysis[key][:SHOWN_EXAMPLES], TAGGED_LIMIT if key == "worst_sentences" else TEXT_LIMIT))
    parts.append(f"written to {escape(str(evaluation.written))} and {escape(str(evaluation.predictions))}")
    return Group(*parts)


SHOWN_EXAMPLES = 5  # of each list; eval_<split>.json and report.html hold them all
TEXT_LIMIT, TAGGED_LIMIT = 70, 240  # characters of a text shown; a sentence tagged word by word needs more
# A tagger's entity errors (token_classification's analysis): how many of each kind, an example of
# each, and the sentences with the most, their words tagged gold→predicted.
ENTITY_ERRORS = (
    ("entity_errors", "entity errors by kind"),
    ("error_examples", "entity errors, an example of each kind"),
    ("worst_sentences", "sentences with the most entity errors, each word with its gold→predicted tags"),
)


def calibration_table(calibration: dict[str, Any]) -> Table:
    table = Table(title=f"calibration (temperature {calibration['temperature']:.3f})", title_justify="left")
    for column in ("", "ece", "brier", "log_loss"):
        table.add_column(column, justify="left" if not column else "right")
    for when in ("before", "after"):
        table.add_row(when, *(format_value(calibration[when][key]) for key in ("ece", "brier", "log_loss")))
    return table


def per_class_table(rows: list[dict[str, Any]], noun: str = "class") -> Table:
    table = Table(title=f"per {noun}", title_justify="left")
    for column in ("label", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for row in rows:
        table.add_row(escape(row["label"]), *(format_value(row[key]) for key in ("precision", "recall", "f1")), str(row["support"]))
    return table


def residual_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="residuals by true value (prediction - target)", title_justify="left")
    for column in ("range", "examples", "mean residual", "mae"):
        table.add_column(column, justify="left" if column == "range" else "right")
    for row in rows:
        table.add_row(f"{row['from']:.3g} to {row['to']:.3g}", str(row["count"]), format_value(row["mean_residual"]), format_value(row["mae"]))
    return table


def examples_table(title: str, rows: list[dict[str, Any]], limit: int = TEXT_LIMIT) -> Table:
    """A few rows of one of the analysis's lists, each column what its entries hold (texts cut at `limit` characters)."""
    table = Table(title=title, title_justify="left")
    columns = [key for key in rows[0] if key != "index"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("text", "true", "gold", "predicted", "label", "kind") else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(_short_text(row[column], limit)) if isinstance(row[column], str) else format_value(row[column]) for column in columns))
    return table


def _short_text(value: str, limit: int = TEXT_LIMIT) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def confusion_table(labels: list[str], counts: list[list[int]]) -> Table | str:
    """Counts with a row per true label and a column per predicted one."""
    if len(labels) > CONFUSION_MAX_LABELS:
        return f"confusion matrix: {len(labels)} classes, in the JSON file"
    table = Table(title="confusion matrix", title_justify="left")
    table.add_column("true \\ predicted")
    for label in labels:
        table.add_column(escape(str(label)), justify="right")
    for label, row in zip(labels, counts):
        table.add_row(escape(str(label)), *(str(count) for count in row))
    return table


def per_label_table(labels: list[str], scores: dict[str, list[float]], thresholds: list[float] | None) -> Table:
    """One row per label: precision, recall, F1, support (positives), and its decision threshold."""
    thresholds = thresholds or [None] * len(labels)
    tuned = len(set(thresholds)) > 1
    table = Table(title="per label" + (" (thresholds tuned on validation)" if tuned else ""), title_justify="left")
    for column in ("label", "precision", "recall", "f1", "support", "threshold"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for index, label in enumerate(labels):
        values = (scores["precision"][index], scores["recall"][index], scores["f1"][index])
        threshold = "-" if thresholds[index] is None else f"{thresholds[index]:.2f}"
        table.add_row(escape(label), *(format_value(value) for value in values), str(int(scores["support"][index])), threshold)
    return table


def train_header(config: Config, runtime: Runtime) -> str:
    return (
        f"run [bold]{escape(str(config.run_dir))}[/]  backend {config.backend}  model {escape(config.model)}"
        f"  on {runtime.device.type} in {runtime.precision}"
    )


def result_view(outcome: TrainOutcome, metrics: dict[str, dict[str, float]]) -> Group:
    """How the run trained and the kept model's metrics: shown as soon as it is scored."""
    graphs = ""
    if outcome.extra.get("steps") == "cuda_graphs":
        fused = " with fused kernels" if outcome.extra.get("fused_modules") else ""
        graphs = f", replayed as CUDA graphs{fused} (captured in {outcome.extra['capture_seconds']:.1f} s)"
    parts: list = [
        f"trained {outcome.global_step} steps ({outcome.epoch:.2f} epochs) in {outcome.train_seconds:.1f} s{graphs}"
        + (" (stopped early)" if outcome.stopped_early else "")
    ]
    if metrics:
        parts.append(metrics_table("final metrics", metrics))
    return Group(*parts)


def trained_view(trained: TrainedRun) -> Group:
    """ftcli train's last lines, after the result (result_view): the diagnosis and where things are."""
    result = trained.result
    parts: list = []
    if trained.diagnosis:
        parts += [diagnosis_view(trained.diagnosis), f"curves: {result.run.curves_png}"]
    if trained.pushed_to:
        parts.append(f"pushed to the Hub: {trained.pushed_to}")
    parts.append(f"run directory: {result.run.path}")
    return Group(*parts)


def gate_view(gate: dict[str, Any]) -> Group:
    """ftcli distill's gate: teacher and student side by side (scores, size, speed), and the verdict."""
    from ftcli.reporting.report import gate_table, gate_verdict

    header, rows = gate_table(gate)
    table = Table(title="the student beside its teacher", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*row)
    word, why = gate_verdict(gate)
    line = Text.assemble("gate ", (word, "bold green" if gate["passed"] else "bold red"), f": {why}")
    return Group(table, line)


def sweep_table(result: SweepResult) -> Table:
    """Trials best first (pruned and failed ones after the completed), one column per searched key."""
    from ftcli.commands.sweep import ranked_rows

    table = Table(title=f"sweep {result.folder}", title_justify="left")
    columns = list(dict.fromkeys(key for row in result.rows for key in row if key != "run_dir"))
    for column in columns:
        table.add_column(column, justify="left" if column == "state" else "right")
    for row in ranked_rows(result):
        style = "bold green" if result.best and row["trial"] == result.best["trial"] else None
        table.add_row(*(escape(format_short(row.get(column))) for column in columns), style=style)
    return table


AUDIT_ISSUES_PRINTED = 10  # the terminal shows the likeliest; label_issues.csv and report.html have more


def audit_view(result: AuditResult) -> Group:
    """The cross-validated metrics, the likeliest label issues and where the files are."""
    metrics = Table(title=f"cross-validation: {len(result.folds)} folds of {result.examples} training examples", title_justify="left")
    for column in ("metric", "mean", "std", "per fold"):
        metrics.add_column(column, justify="left" if column == "metric" else "right")
    for name, values in result.metrics.items():
        metrics.add_row(name, format_number(values["mean"]), format_number(values["std"]), " ".join(format_number(v) for v in values["folds"]))
    issues = Table(title=f"label issues: {len(result.issues)} probably wrong, the likeliest first", title_justify="left")
    shown = result.issues[:AUDIT_ISSUES_PRINTED]
    named = ("index", "fold", "given", "suggested", "quality")
    texts = [key for key in (shown[0] if shown else {}) if key not in named]
    columns = ["index", *texts, "given", "suggested", "quality"]
    for column in columns:
        issues.add_column(column, justify="left" if column in texts else "right", overflow="fold")
    for issue in shown:
        issues.add_row(*(escape(issue[column] if isinstance(issue[column], str) else format_short(issue[column])) for column in columns))
    trained = f"{result.trained} fold{'s' if result.trained != 1 else ''} trained now, {len(result.folds) - result.trained} kept"
    files = f"{result.folder}: label_issues.csv, out_of_fold.jsonl, cross_validation.json, report.html ({trained})"
    return Group(metrics, issues, Text(files))


class TrainingProgress:
    """A rich progress bar over optimizer steps showing loss, learning rate and throughput (the
    training events of ftcli.training.job.TrainingEvents); with show_result, the trained model's
    metrics once it is scored (ftcli train; a sweep's or an audit's trials say a line each instead)."""

    def __init__(self, show_result: bool = False) -> None:
        self.show_result = show_result
        self._progress: Progress | None = None
        self._task = None
        self._started = 0.0
        self._samples = 0
        self._fields = {"loss": "-", "lr": "-", "speed": "-"}

    def start(self, total_steps: int, initial_step: int = 0) -> None:
        # A sweep starts the same display once per trial.
        self._started, self._samples = time.perf_counter(), 0
        self._fields = {"loss": "-", "lr": "-", "speed": "-"}
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=initial_step, **self._fields)

    def step(self, step: int, samples: int) -> None:
        self._samples += samples
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._fields["speed"] = f"{self._samples / elapsed:,.1f}"
        self._progress.update(self._task, completed=step, **self._fields)

    def log(self, event: dict[str, Any]) -> None:
        if "train_loss" in event:
            self._fields["loss"] = f"{event['train_loss']:.4f}"
        if "learning_rate" in event:
            self._fields["lr"] = f"{event['learning_rate']:.2e}"
        if self._progress is None:
            return
        self._progress.update(self._task, **self._fields)
        if "train_loss" in event and not self._progress.console.is_terminal:
            # Piped output (CI logs, tee) gets no live bar: one plain line per logging step instead.
            total = self._progress.tasks[0].total
            self._progress.console.print(
                f"step {event['step']}/{total:.0f}  epoch {event.get('epoch', 0):.2f}  loss {self._fields['loss']}"
                f"  lr {self._fields['lr']}  {self._fields['speed']} samples/s"
            )
        evaluated = {key[5:]: value for key, value in event.items() if key.startswith("eval_")}
        if evaluated:
            shown = "  ".join(f"{key} {format_value(value)}" for key, value in evaluated.items())
            self._progress.console.print(f"step {event['step']} (epoch {event.get('epoch', 0):.2f}): {shown}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def scored(self, outcome: TrainOutcome, metrics: dict[str, dict[str, float]]) -> None:
        if self.show_result:
            console.print(result_view(outcome, metrics))


def prepare_summary(prepared) -> Table:
    """Splits, sizes, labels (counts per class; for many labels the most common; for regression
    the targets' spread; none for the unlabeled split), token lengths and truncation of a Prepared dataset."""
    source = "cache hit" if prepared.cache_hit else "tokenized and cached"
    table = Table(title=f"data {prepared.fingerprint} ({source}: {prepared.cache_dir})", title_justify="left")
    label_columns, label_values = _label_summary(prepared)
    windowed = any(summary.windows is not None for summary in prepared.summary.values())
    last = ("split into windows", "windows") if windowed else ("truncated",)
    for column in ("split", "examples", *label_columns, "tokens p50", "p95", "max", *last):
        table.add_column(escape(column), justify="left" if column == "split" else "right")
    for split, summary in prepared.summary.items():
        ends = (str(summary.windowed), str(summary.windows)) if windowed else (str(summary.truncated),)
        table.add_row(
            split,
            str(summary.size),
            *(label_values(summary) if summary.labelled else ["-"] * len(label_columns)),
            f"{summary.length_p50:.0f}",
            f"{summary.length_p95:.0f}",
            str(summary.length_max),
            *ends,
        )
    return table


def _label_summary(prepared) -> tuple[list[str], Any]:
    names = prepared.label_names
    if next(iter(prepared.summary.values())).label_stats is not None:  # regression
        columns = ["mean", "std", "min", "max"]
        return [f"{names[0]} {column}" for column in columns], lambda summary: [f"{summary.label_stats[c]:.3g}" for c in columns]
    if len(names) <= CONFUSION_MAX_LABELS:
        return list(names), lambda summary: [str(summary.label_counts.get(name, 0)) for name in names]

    def most_common(summary) -> list[str]:
        name = max(summary.label_counts, key=summary.label_counts.get)
        return [f"{sum(summary.label_counts.values()) / max(summary.size, 1):.2f}", f"{escape(name)} {summary.label_counts[name]}"]

    return [f"labels/example ({len(names)} labels)", "most common"], most_common


VERDICT_STYLES = {
    "converged": "green",
    "still_improving": "cyan",
    "inconclusive": "dim",
    "overfitting": "yellow",
    "underfitting": "yellow",
    "overconfidence": "magenta",
    "weak_spots": "yellow",
    "unstable": "red",
}


def diagnosis_view(diagnosis: Diagnosis) -> Group:
    """The headline verdict, then each finding with its evidence and what to try."""
    headline = (_verdict(diagnosis.verdict), f"bold {VERDICT_STYLES[diagnosis.verdict]}")
    lines = [Text.assemble(("diagnosis: ", "bold"), headline)]
    for finding in diagnosis.findings:
        lines.append(Text(finding.summary, style=VERDICT_STYLES[finding.verdict]))
        evidence = "  ".join(f"{key}={_evidence(value)}" for key, value in finding.evidence.items() if value is not None)
        lines.append(Text(f"  evidence: {evidence}", style="dim"))
        lines += [Text(f"  - {remedy}") for remedy in finding.remedies]
    return Group(*lines)


def run_table(report: RunReport) -> Table:
    """A run's validation metrics: best, where, last evaluation, and the kept model's."""
    from ftcli.reporting.report import metric_rows

    table = Table(title=report.label, title_justify="left", title_style="bold")
    for column in ("metric", "best", "at step", "last eval", "saved model"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in metric_rows(report):
        table.add_row(row.name, *map(format_number, (row.best, row.best_step, row.last, row.saved)))
    return table


def report_view(report: Report) -> Group:
    """ftcli report's output: per run a table, the diagnosis and curves.png; then the shared files."""
    from ftcli.reporting.report import run_stats

    parts: list = []
    for run in report.runs:
        stats = "  ".join(f"{key} {value}" for key, value in {"run": run.run.path, **run_stats(run)}.items())
        parts += [run_table(run), Text(stats), diagnosis_view(run.diagnosis), Text(f"curves: {run.run.curves_png}")]
        parts += [gate_view(run.gate), Text("")] if run.gate is not None else [Text("")]
    if report.comparison_png:
        parts.append(Text(f"comparison: {report.comparison_png}"))
    if report.html:
        parts.append(Text(f"html report: {report.html}"))
    return Group(*parts)


def _verdict(verdict: str) -> str:
    return verdict.replace("_", " ")


def _evidence(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else format_value(value)
