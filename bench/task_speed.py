"""Side by side on the other tasks: HF Trainer with the same recipe (problem_type set) vs ftcli.

    python -m bench.task_speed --task stsb        # regression: STS-B, 3 epochs, batch 16, lr 5e-5
    python -m bench.task_speed --task goemotions  # multi-label: GoEmotions' 28 labels, 3 epochs, batch 32
    python -m bench.task_speed --task wnut17      # named entities: WNUT-17, 3 epochs, batch 8, lr 5e-5, weight decay 0.01
    python -m bench.task_speed --task stsb --train-samples 512 --epochs 1   # a CPU-sized run

One process, one run, the same model (MiniLM), data and recipe in every row; each row's ratio is
to row (a), HF Trainer as its documentation writes a regression or multi-label run:
datasets.map tokenize, DataCollatorWithPadding, TrainingArguments(eval_strategy="epoch") and
every other default; WNUT-17's row (a) is the course's token-classification recipe
(AutoModelForTokenClassification, the first sub-token labelled, DataCollatorForTokenClassification,
weight decay 0.01), scored at the entity level in strict IOB2 as ftcli scores it. GoEmotions rows report macro and micro F1 at threshold 0.5 and with
per-label thresholds tuned on validation (ftcli's tune_thresholds, applied to row (a)'s
probabilities too), so the thresholds' effect is apart from the training's. Rows after (a) are
ftcli backends with optional settings: `loop`, `loop:class_weights=balanced`, `trainer`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench.train_speed import _sync, make_model_dir, parse_row, peak_memory, timed_train, yaml_values

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# task: (folder, ftcli task, text columns, label column, epochs, batch size)
TASKS = {
    "stsb": ("stsb", "regression", ["sentence1", "sentence2"], "score", 3, 16),
    "goemotions": ("goemotions", "multi_label", ["text"], "labels", 3, 32),
    "wnut17": ("wnut17", "token_classification", ["tokens"], "ner_tags", 3, 8),
}
# The recipe's settings beyond epochs and batch size, the same in every row.
RECIPES = {"wnut17": {"learning_rate": 5e-5, "weight_decay": 0.01}}
# Every tag (O, then each type's B- and I-), as configs/wnut17-minilm.yaml gives them.
WNUT17_TAGS = ["O"] + [f"{edge}-{kind}" for kind in
                       ("corporation", "creative-work", "group", "location", "person", "product") for edge in "BI"]


@dataclass
class TaskRow:
    name: str
    total_seconds: float = 0.0
    train_seconds: float = 0.0
    train_samples: int = 0
    peak_memory_mb: float = 0.0
    metrics: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def files_for(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    folder = args.data_dir / TASKS[args.task][0]
    if args.task == "wnut17":
        return conll_files(folder, args.train_samples, workdir)
    files = {"validation": str(folder / "validation.jsonl")}
    lines = (folder / "train.jsonl").read_text().splitlines()
    if args.train_samples:
        (workdir / "train.jsonl").write_text("\n".join(lines[: args.train_samples]) + "\n")
        files["train"] = str(workdir / "train.jsonl")
    else:
        files["train"] = str(folder / "train.jsonl")
    return files


def conll_files(folder: Path, train_samples: int | None, workdir: Path) -> dict[str, str]:
    """WNUT-17's CoNLL files; the first N training sentences when asked."""
    from ftcli.formats import read_records

    files = {"train": str(folder / "train.conll"), "validation": str(folder / "dev.conll")}
    if train_samples:
        sentences = read_records(files["train"])[:train_samples]
        lines = ["\n".join(f"{word}\t{tag}" for word, tag in zip(row["tokens"], row["ner_tags"])) for row in sentences]
        (workdir / "train.conll").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
        files["train"] = str(workdir / "train.conll")
    return files


# GoEmotions' labels in the dataset's own order (its README), as configs/goemotions-minilm.yaml gives them.
GOEMOTIONS_LABELS = (
    "admiration amusement anger annoyance approval caring confusion curiosity desire disappointment disapproval "
    "disgust embarrassment excitement fear gratitude grief joy love nervousness optimism pride realization relief "
    "remorse sadness surprise neutral"
).split()


# ---------------------------------------------------------------- (a) HF Trainer


def run_hf_trainer(args: argparse.Namespace, model_dir: str, files: dict[str, str], workdir: Path) -> TaskRow:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    _, task, text_fields, label_field, _, _ = TASKS[args.task]
    if task == "token_classification":
        return run_hf_token_trainer(args, model_dir, files, workdir)
    names = GOEMOTIONS_LABELS if task == "multi_label" else None
    row = TaskRow("(a) hf-trainer")
    started = time.perf_counter()
    with peak_memory(args.device, row):
        raw = load_dataset("json", data_files=files, cache_dir=str(workdir / "hf-datasets"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def tokenize_function(example):
            encoded = tokenizer(*(example[column] for column in text_fields), truncation=True)
            if names is None:
                encoded["labels"] = [float(value) for value in example[label_field]]
            else:
                encoded["labels"] = [[float(name in labels) for name in names] for labels in example[label_field]]
            return encoded

        tokenized = raw.map(tokenize_function, batched=True, remove_columns=raw["train"].column_names)
        training_args = TrainingArguments(
            str(workdir / "test-trainer"), eval_strategy="epoch", num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size, report_to="none", disable_tqdm=True, save_strategy="no",
        )
        problem = {"regression": "regression", "multi_label": "multi_label_classification"}[task]
        # dtype: a checkpoint loads in the dtype it is stored in, and the carried MiniLM copy is fp16.
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(names or [0]), problem_type=problem, dtype=torch.float32
        )
        trainer = Trainer(
            model, training_args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        )
        prediction = timed_trainer(args, trainer, row)
    row.total_seconds = time.perf_counter() - started
    row.train_samples = len(tokenized["train"]) * args.epochs
    row.metrics = task_metrics(task, prediction.predictions, prediction.label_ids)
    return row


def timed_trainer(args: argparse.Namespace, trainer: Any, row: TaskRow) -> Any:
    """Row (a)'s training, timed into row, then its raw outputs on validation."""
    train_started = time.perf_counter()
    trainer.train()
    _sync(args.device)
    row.train_seconds = time.perf_counter() - train_started
    return trainer.predict(trainer.eval_dataset)


def run_hf_token_trainer(args: argparse.Namespace, model_dir: str, files: dict[str, str], workdir: Path) -> TaskRow:
    """The course's token-classification recipe: words tokenized with is_split_into_words, each
    word's first sub-token labelled (-100 elsewhere), DataCollatorForTokenClassification."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, Trainer, TrainingArguments

    from ftcli.formats import read_records

    ids = {tag: index for index, tag in enumerate(WNUT17_TAGS)}
    row = TaskRow("(a) hf-trainer")
    started = time.perf_counter()
    with peak_memory(args.device, row):
        raw = DatasetDict({split: Dataset.from_list(read_records(path)) for split, path in files.items()})
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def tokenize_and_align_labels(examples):
            encoded = tokenizer(examples["tokens"], truncation=True, is_split_into_words=True)
            encoded["labels"] = []
            for index, tags in enumerate(examples["ner_tags"]):
                previous, labels = None, []
                for word in encoded.word_ids(index):
                    labels.append(-100 if word is None or word == previous else ids[tags[word]])
                    previous = word
                encoded["labels"].append(labels)
            return encoded

        tokenized = raw.map(tokenize_and_align_labels, batched=True, remove_columns=raw["train"].column_names)
        training_args = TrainingArguments(
            str(workdir / "test-trainer"), eval_strategy="epoch", num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            report_to="none", disable_tqdm=True, save_strategy="no", **RECIPES[args.task],
        )
        model = AutoModelForTokenClassification.from_pretrained(
            model_dir, num_labels=len(WNUT17_TAGS), id2label=dict(enumerate(WNUT17_TAGS)), label2id=ids, dtype=torch.float32
        )
        trainer = Trainer(
            model, training_args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
            data_collator=DataCollatorForTokenClassification(tokenizer), processing_class=tokenizer,
        )
        prediction = timed_trainer(args, trainer, row)
    row.total_seconds = time.perf_counter() - started
    row.train_samples = len(tokenized["train"]) * args.epochs
    row.metrics = entity_metrics(prediction.predictions.argmax(-1), prediction.label_ids)
    return row


def entity_metrics(decisions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Entity-level scores in strict IOB2 (ftcli's, equal to seqeval's strict mode) and token accuracy."""
    from ftcli import tasks

    task = tasks.get("token_classification")
    return {name: task.metric(name, decisions, labels, len(WNUT17_TAGS), names=WNUT17_TAGS) for name in ("f1", "precision", "recall", "accuracy")}


def task_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's validation metrics from raw outputs, ftcli's definitions in both rows."""
    from ftcli.metrics import compute_builtin
    from ftcli.objective import tune_thresholds

    if task == "regression":
        values = outputs.reshape(-1)
        return {name: compute_builtin(name, values, labels) for name in ("spearman", "pearson", "mse")}
    scores = 1 / (1 + np.exp(-outputs))
    tuned = scores >= tune_thresholds(scores, labels)
    at_half = scores >= 0.5
    return {
        "macro_f1@0.5": compute_builtin("f1_macro", at_half.astype(int), labels),
        "micro_f1@0.5": compute_builtin("f1_micro", at_half.astype(int), labels),
        "macro_f1_tuned": compute_builtin("f1_macro", tuned.astype(int), labels),
        "micro_f1_tuned": compute_builtin("f1_micro", tuned.astype(int), labels),
    }


# ---------------------------------------------------------------- ftcli rows


def run_ftcli(args: argparse.Namespace, spec: str, model_dir: str, files: dict[str, str], workdir: Path, letter: str) -> TaskRow:
    from ftcli.config import validate
    from ftcli.inference import row_logits
    from ftcli.runs.loading import load_run
    from ftcli.runtime import Runtime

    _, task, text_fields, label_field, _, _ = TASKS[args.task]
    backend, settings = parse_row(spec)
    config = validate({
        "name": f"bench-{letter}", "task": task, "backend": backend, "output_dir": str(workdir / "runs"), "model": model_dir,
        "data": {**files, "text_fields": text_fields, "label_field": label_field, "max_length": 128}
        | ({"label_names": GOEMOTIONS_LABELS} if task == "multi_label" else {})
        | ({"label_names": WNUT17_TAGS} if task == "token_classification" else {}),
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 5e-5, "eval_every": "epoch",
                     "save_every": "epoch", "logging_steps": 50, **RECIPES.get(args.task, {}), **yaml_values(settings)},
    })
    row = TaskRow(f"({letter}) ftcli-{spec}")
    result = timed_train(config, args.device, workdir / f"cache-{letter}", row)
    outcome = result.outcome
    evaluations = [event for event in result.run.read_events() if "eval_loss" in event]
    row.notes = {
        "steps": outcome.extra.get("steps"), "best_checkpoint": outcome.best_checkpoint,
        "evaluations": [{key: round(value, 4) for key, value in event.items()} for event in evaluations],
    }
    if task == "token_classification":  # ftcli's own validation scores of the kept model: the same definitions
        validation = json.loads((config.run_dir / "metrics.json").read_text())["validation"]
        row.metrics = {name: validation[name] for name in ("f1", "precision", "recall", "accuracy")}
        return row
    # The same measurement as row (a): the kept model's raw outputs on validation.
    loaded = load_run(config.run_dir)
    validation = result.prepared.splits["validation"]
    runtime = Runtime.resolve(config.training.precision)
    outputs = row_logits(loaded.model.to(runtime.device), validation, 64, loaded.tokenizer.pad_token_id, runtime).numpy()
    row.metrics = task_metrics(task, outputs, np.asarray(validation["labels"]))
    return row


def render(rows: list[TaskRow], header: str) -> str:
    names = list(rows[0].metrics)
    base = rows[0]
    lines = [header, "", "| row | total s | train s | samples/s | " + " | ".join(names) + " | train speed-up | total speed-up |",
             "|---" * (len(names) + 6) + "|"]
    for row in rows:
        scores = " | ".join(f"{row.metrics.get(name, float('nan')):.4f}" for name in names)
        lines.append(
            f"| {row.name} | {row.total_seconds:.1f} | {row.train_seconds:.1f} | {row.train_samples / row.train_seconds:.1f} "
            f"| {scores} | {base.train_seconds / row.train_seconds:.2f}x | {base.total_seconds / row.total_seconds:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-samples", type=int, default=None, help="first N training examples (default: all)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rows", default="hf,loop", help="hf first, then ftcli backends with optional settings")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--minilm-dir", default=None, help="MiniLM folder when the package is not installed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    _, _, _, _, epochs, batch_size = TASKS[args.task]
    args.epochs, args.batch_size = args.epochs or epochs, args.batch_size or batch_size
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = make_model_dir("minilm", workdir, args.minilm_dir)
        files = files_for(args, workdir)
        for letter, spec in zip("abcdefgh", args.rows.split(",")):
            torch.manual_seed(0)
            row = run_hf_trainer(args, model_dir, files, workdir) if spec == "hf" else run_ftcli(args, spec, model_dir, files, workdir, letter)
            print(json.dumps(row.__dict__, default=str), flush=True)
            rows.append(row)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    header = (
        f"### {time.strftime('%Y-%m-%d')} · {device} · torch {torch.__version__} · {args.task} · MiniLM · "
        f"train {args.train_samples or 'all'} · {args.epochs} epoch(s) · batch {args.batch_size}"
    )
    print(render(rows, header))
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=2, default=str))


if __name__ == "__main__":
    main()
