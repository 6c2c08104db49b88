"""The distill command: a student run trained on a teacher run's task and data, from the teacher's
outputs as well as the labels (config.distill), then weighed against its teacher: the gate.

    ftcli distill TEACHER_RUN --student MODEL | layers:K [--config distill.yaml] [--max-drop 0.01]

The student's config is the teacher's own (its data, task, recipe and metrics), with the student's
model, a `distill:` section naming the teacher, and what distill.yaml and --set change. Its run is
an ordinary run directory beside the teacher's; `distill.json` there holds the gate: both models on
validation (and test when configured), their sizes and their measured speed on this machine, the
drop of the first metric and whether it is within distill.max_drop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ftcli import tasks
from ftcli.commands.train import TrainedRun, train_run
from ftcli.config import Config, apply_override, read_yaml, resolve_paths, smoke, validate
from ftcli.data.prepare import prepare
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json
from ftcli.inference import evaluate_dataset, row_logits
from ftcli.metrics import higher_is_better, primary_metric
from ftcli.runs.loading import LoadedRun, load_run
from ftcli.runs.rundir import WEIGHTS_FILE, RunDir
from ftcli.runtime import Runtime
from ftcli.students import build_student, parse_student
from ftcli.training.job import TrainingEvents

log = logging.getLogger("ftcli")

SPEED_ROWS = 512  # examples timed per model and device: enough for a steady rate, seconds on a CPU


@dataclass
class DistilledRun:
    trained: TrainedRun
    gate: dict[str, Any]  # distill.json


def distill_run(
    teacher_run: str | Path,
    student: str,
    settings: Path | None = None,
    overrides: list[str] | None = None,
    max_drop: float | None = None,
    is_smoke: bool = False,
    overwrite: bool = False,
    resume: bool | Literal["auto"] = False,
    events: TrainingEvents | None = None,
) -> DistilledRun:
    """`ftcli distill`: the student's config, its model (built from the teacher for layers:K), its
    run trained, then the gate written."""
    config = student_config(teacher_run, student, settings, overrides or [], max_drop)
    config = smoke(config) if is_smoke else config
    runtime = Runtime.resolve(config.training.precision)
    trained = train_run(config, overwrite, resume, events=events, runtime=runtime)
    return DistilledRun(trained, weigh(config, trained.result.run, runtime))


def student_config(teacher_run: str | Path, student: str, settings: Path | None, overrides: list[str], max_drop: float | None) -> Config:
    """The teacher run's config with the student's model and name, distill.teacher set, and the
    settings file and overrides applied over it."""
    teacher = RunDir.open(teacher_run)
    raw = read_yaml(teacher.config_file)
    raw.pop("push_to_hub", None)  # the teacher's Hub repository is not the student's
    raw.pop("sweep", None)
    raw |= {"output_dir": str(teacher.path.parent), "name": f"{teacher.path.name}-{_slug(student)}", "model": student}
    raw["distill"] = {"teacher": str(teacher.path.resolve())}
    if settings is not None:
        _merge(raw, read_yaml(settings))
    for override in overrides:
        apply_override(raw, override)
    if max_drop is not None:
        raw["distill"]["max_drop"] = max_drop
    config = resolve_paths(validate(raw, source=str(settings or teacher.config_file)))
    if "validation" not in config.data.split_files() and not config.data.fold:
        raise FtcliError("distill weighs the student against its teacher on validation, which the data has not", "set data.validation")
    keep = parse_student(config.model)
    if keep is not None:
        config = config.model_copy(update={"model": str(student_from_teacher(teacher, keep, config.task))})
    return config


def student_from_teacher(teacher: RunDir, keep: int, task: str) -> Path:
    """layers:K: the student cut from the teacher's model, kept in the teacher's run directory
    (students/layers-K), where a resumed or repeated distillation finds it."""
    target = teacher.path / "students" / f"layers-{keep}"
    teacher.require_model()
    record = build_student(teacher.model_dir, keep, target, tasks.get(task).model_head)
    log.info("student: layers %s of the teacher's %d (%d parameters) in %s", record["layers"], record["of"], record["parameters"], target)
    return target


def _slug(student: str) -> str:
    """The student's part of its run's name: layers3, or the model's last path part."""
    keep = parse_student(student)
    return f"layers{keep}" if keep is not None else Path(student.rstrip("/")).name or "student"


def _merge(raw: dict[str, Any], changes: dict[str, Any]) -> None:
    """changes over raw, section by section (a section given replaces only the keys it names)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = value


def weigh(config: Config, run: RunDir, runtime: Runtime) -> dict[str, Any]:
    """The gate: teacher and student scored on the same splits and timed on this machine's devices;
    passed when the first metric dropped by at most distill.max_drop on validation. distill.json."""
    splits = [split for split in ("validation", "test") if split in config.data.split_files()] or ["validation"]
    sides = {name: describe(config, load_run(path, device=runtime.device), splits, runtime)
             for name, path in (("teacher", config.distill.teacher), ("student", run.path))}
    metric = primary_metric(config.metrics)
    before, after = (sides[name]["metrics"][splits[0]][metric] for name in ("teacher", "student"))
    drop = before - after if higher_is_better(metric) else after - before
    gate = {
        "teacher": config.distill.teacher, "student": str(run.path), "metric": metric, "split": splits[0],
        "drop": drop, "max_drop": config.distill.max_drop, "passed": bool(drop <= config.distill.max_drop),
        "temperature": config.distill.temperature, "alpha": config.distill.alpha,
        "speedup": {device: sides["student"]["examples_per_second"][device] / rate
                    for device, rate in sides["teacher"]["examples_per_second"].items()},
        "smaller": sides["teacher"]["parameters"] / sides["student"]["parameters"],
        "models": sides,
    }
    atomic_write_json(run.gate_file, gate)
    if not gate["passed"]:
        log.warning("the student failed the gate: %s dropped by %.4f on %s (distill.max_drop %s)", metric, drop, splits[0], config.distill.max_drop)
    return gate


def describe(config: Config, loaded: LoadedRun, splits: list[str], runtime: Runtime) -> dict[str, Any]:
    """One model's side of the gate: its scores, size and speed."""
    prepared = prepare(config.data, loaded.tokenizer, config.task)
    batch, pad = config.training.eval_batch_size, loaded.tokenizer.pad_token_id
    scores = {
        split: evaluate_dataset(loaded.model, prepared.splits[split], config.metrics, batch, pad, runtime, loaded.objective)
        for split in splits
    }
    weights = loaded.weights / WEIGHTS_FILE
    return {
        "run": str(loaded.run.path), "metrics": scores,
        "parameters": sum(parameter.numel() for parameter in loaded.model.parameters()),
        "bytes": weights.stat().st_size if weights.is_file() else None,
        "examples_per_second": speeds(loaded, prepared.splits[splits[0]], batch, runtime),
    }


def speeds(loaded: LoadedRun, dataset: Any, batch_size: int, runtime: Runtime) -> dict[str, float]:
    """Examples a second through the model's forward passes (prediction's work, as ftcli predict
    batches it) on this machine's CPU and, where there is one, its GPU."""
    sample = dataset.select(range(min(SPEED_ROWS, len(dataset))))
    found = {}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        on = runtime if runtime.device.type == device else Runtime(torch.device(device), None)
        model = loaded.model.to(on.device)
        row_logits(model, sample.select(range(min(batch_size, len(sample)))), batch_size, loaded.tokenizer.pad_token_id, on)  # warm-up
        start = time.perf_counter()
        row_logits(model, sample, batch_size, loaded.tokenizer.pad_token_id, on)  # ends on the host: every kernel waited for
        found[device] = len(sample) / (time.perf_counter() - start)
    return found

