"""Distillation side by side: the same student trained on the labels alone vs distilled from its
teacher, in one run.

    python -m bench.distill --config configs/goemotions-minilm.yaml --layers 3
    python -m bench.distill --config configs/mrpc-minilm.yaml --layers 3 --teacher runs/mrpc-minilm
    python -m bench.distill --config configs/goemotions-minilm.yaml --labeled 8000   # the rest as data.unlabeled
    python -m bench.distill --config configs/goemotions-minilm.yaml --speed-only --threads 2

Rows: (t) the teacher, trained from --config (or the run --teacher names); (a) the student,
layers:K of the teacher (the same weights start both student rows), trained on the labels alone
with the teacher's recipe; (b) the same student through `ftcli distill` (distill.* from --set).
With --labeled N the students see the labels of the first N training examples only, and (b) also
learns from the teacher's outputs on the remaining texts (data.unlabeled). Reported: every metric
on validation, the student's share of the teacher's first metric, (b) - (a) in points, parameters,
and examples a second through the model on this machine's CPU (at --threads) and GPU.
--speed-only times the packaged MiniLM against its layers:K cut on the config's validation texts
without training (speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ftcli import tasks
from ftcli.commands.distill import distill_run, speeds, student_from_teacher
from ftcli.commands.train import train_run
from ftcli.config import Config, load_config, resolve_paths
from ftcli.data.prepare import prepare
from ftcli.modeling import load_model, load_tokenizer, resolve_model_source
from ftcli.runs.rundir import RunDir
from ftcli.runtime import Runtime
from ftcli.students import cut_layers, kept_layers

ROOT = Path(__file__).resolve().parents[1]


def base_config(args: argparse.Namespace, workdir: Path) -> Config:
    """--config with --set, its data paths read from the project (as the shipped configs name them)."""
    config = load_config(ROOT / args.config, [*args.set, f"output_dir={workdir}"])
    return resolve_paths(config, ROOT)


def split_labels(config: Config, labeled: int, workdir: Path) -> tuple[str, str]:
    """The first `labeled` training rows as the students' labelled file, the rest as unlabeled texts."""
    lines = Path(config.data.train).read_text(encoding="utf-8").splitlines()
    kept, rest = workdir / "labeled.jsonl", workdir / "unlabeled.jsonl"
    kept.write_text("\n".join(lines[:labeled]) + "\n", encoding="utf-8")
    rest.write_text("\n".join(lines[labeled:]) + "\n", encoding="utf-8")
    return str(kept), str(rest)


def run_rows(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    config = base_config(args, workdir)
    teacher = Path(args.teacher) if args.teacher else train_run(config).result.run.path
    student_init = student_from_teacher(RunDir(teacher), args.layers, config.task)
    data: dict[str, Any] = {}
    if args.labeled:
        data["train"], unlabeled = split_labels(config, args.labeled, workdir)
    labels_only = config.model_copy(update={
        "name": f"{config.name}-layers{args.layers}-labels", "model": str(student_init),
        "data": config.data.model_copy(update=data),
    })
    alone = train_run(labels_only).result
    overrides = [f"data.{key}={value}" for key, value in data.items()] + args.distill
    if args.labeled:
        overrides.append(f"data.unlabeled={unlabeled}")
    distilled = distill_run(teacher, f"layers:{args.layers}", overrides=overrides)
    return {"config": config, "labels_only": alone.metrics["validation"], "gate": distilled.gate}


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    config, gate = result["config"], result["gate"]
    metric, teacher, student = gate["metric"], gate["models"]["teacher"], gate["models"]["student"]
    rows = [("(t) teacher", teacher["metrics"]["validation"], teacher),
            (f"(a) layers:{args.layers}, labels alone", result["labels_only"], student),
            (f"(b) layers:{args.layers}, distilled", student["metrics"]["validation"], student)]
    names = [name for name in config.metrics if name in teacher["metrics"]["validation"]]
    devices = list(teacher["examples_per_second"])
    lines = [f"| row | {' | '.join(names)} | share of (t) {metric} | parameters | "
             + " | ".join(f"examples/s {device}" for device in devices) + " |",
             "|---" * (len(names) + 3 + len(devices)) + "|"]
    for label, scores, side in rows:
        share = scores[metric] / teacher["metrics"]["validation"][metric]
        lines.append(f"| {label} | {' | '.join(f'{scores[name]:.4f}' for name in names)} | {share:.1%} | "
                     f"{side['parameters'] / 1e6:.1f}M | " + " | ".join(f"{side['examples_per_second'][d]:.0f}" for d in devices) + " |")
    gain = (student["metrics"]["validation"][metric] - result["labels_only"][metric]) * 100
    speedup = ", ".join(f"{rate:.2f}x on {device}" for device, rate in gate["speedup"].items())
    lines.append(f"\n(b) - (a): {gain:+.2f} points of {metric}; gate {'passed' if gate['passed'] else 'failed'} "
                 f"(drop {gate['drop']:.4f}, max {gate['max_drop']}); the student predicts {speedup}")
    return "\n".join(lines)


def speed_only(args: argparse.Namespace, workdir: Path) -> str:
    """The packaged model and its layers:K cut, timed on the config's validation texts."""
    config = base_config(args, workdir)
    source = resolve_model_source(config.model)
    tokenizer = load_tokenizer(source)
    prepared = prepare(config.data, tokenizer, config.task)
    task = tasks.get(config.task)
    teacher, student = (load_model(source, prepared.label_names, problem_type=task.problem_type, head=task.model_head) for _ in range(2))
    cut_layers(student, kept_layers(student.config.num_hidden_layers, args.layers))
    runtime = Runtime(torch.device("cpu"), None)
    rates = {name: speeds(SimpleNamespace(model=model.eval(), tokenizer=tokenizer), prepared.splits["validation"], config.training.eval_batch_size, runtime)
             for name, model in (("teacher", teacher), ("student", student))}
    return "\n".join(
        f"{device}: teacher {rates['teacher'][device]:.0f} examples/s, layers:{args.layers} student "
        f"{rates['student'][device]:.0f} ({rates['student'][device] / rates['teacher'][device]:.2f}x)"
        for device in rates["teacher"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/goemotions-minilm.yaml", help="the teacher's experiment, from the project")
    parser.add_argument("--layers", type=int, default=3, help="K: the student keeps K of the teacher's layers")
    parser.add_argument("--teacher", default=None, help="a trained run to distill from, instead of training --config")
    parser.add_argument("--labeled", type=int, default=None, help="students see only the first N training labels")
    parser.add_argument("--set", action="append", default=[], help="key=value over --config (every row)")
    parser.add_argument("--distill", action="append", default=[], help="key=value for row (b) only, e.g. distill.alpha=0.9")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every row (torch.set_num_threads)")
    parser.add_argument("--speed-only", action="store_true", help="time the model and its cut only; no training")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.speed_only:
            table = speed_only(args, workdir)
        else:
            result = run_rows(args, workdir)
            table = render(result, args)
            (workdir / "bench-distill.json").write_text(json.dumps({"gate": result["gate"], "labels_only": result["labels_only"]}, indent=2))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
