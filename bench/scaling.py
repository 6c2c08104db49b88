"""Data-parallel scaling: the same ftcli run on 1 and on N processes (GPUs), both backends.

    python -m bench.scaling --processes 1 2 --rows loop trainer loop:compile=cuda_graphs --batch-size 32

A row is a backend, optionally with training settings of its own, written as for
bench.train_speed (`loop:compile=cuda_graphs;batch_size=32`).

Each run is the real command (`python -m ftcli train CONFIG --num-processes N`), so the numbers
include what a user gets: launch, tokenization on the main process, training, evaluation through
gather_for_metrics. Reports training throughput, the speed-up over one process, and the last
in-training validation accuracy next to the final single-process evaluation of the saved model:
equal values show that every validation example counted once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.train_speed import LABELS, MRPC, key_values, make_model_dir, parse_row, yaml_values


def run(config_path: Path, row: str, processes: int, run_dir: Path) -> dict:
    backend, settings = parse_row(row)
    command = [sys.executable, "-m", "ftcli", "train", str(config_path), "--backend", backend,
               "--set", f"name={run_dir.name}", "--num-processes", str(processes)]
    command += [argument for key, value in settings.items() for argument in ("--set", f"training.{key}={value}")]
    # One process gets one GPU: unlaunched, HF Trainer would spread it over all of them (nn.DataParallel).
    environment = os.environ | ({"CUDA_VISIBLE_DEVICES": "0"} if processes == 1 else {})
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-20000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [event for event in events if "eval_accuracy" in event][-1]
    return {
        "row": row,
        "processes": processes,
        "wall_seconds": wall,
        "train_seconds": metrics["train"]["train_seconds"],
        "samples_per_second": metrics["train"]["train_samples_per_second"],
        "last_eval_accuracy": last_eval["eval_accuracy"],
        "final_eval_accuracy": metrics["validation"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=["loop", "trainer", "loop:compile=cuda_graphs"])
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", choices=["minilm", "bert-base-random"], default="bert-base-random")
    parser.add_argument("--minilm-dir", default=None)
    parser.add_argument("--data-dir", type=Path, default=MRPC)
    parser.add_argument("--set", action="append", default=[], help="extra training.KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="ftcli-scaling-") as tmp:
        workdir = Path(tmp)
        experiment = {
            "name": "scaling",
            "output_dir": str(workdir / "runs"),
            "model": make_model_dir(args.model, workdir, args.minilm_dir),
            "data": {
                "train": str(args.data_dir / "train.jsonl"),
                "validation": str(args.data_dir / "validation.jsonl"),
                "text_fields": ["sentence1", "sentence2"],
                "label_names": LABELS,
            },
            "training": {"epochs": args.epochs, "batch_size": args.batch_size, "logging_steps": 50}
            | {key.removeprefix("training."): value for key, value in yaml_values(key_values(args.set)).items()},
        }
        config_path = workdir / "scaling.yaml"
        config_path.write_text(yaml.safe_dump(experiment))
        for index, row in enumerate(args.rows):
            for processes in args.processes:
                result = run(config_path, row, processes, workdir / "runs" / f"row{index}-{processes}")
                print(json.dumps(result), flush=True)
                results.append(result)

    print("\n| row | processes | wall s | train s | train samples/s | scaling vs 1 | last eval acc | final eval acc |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        one = next(r for r in results if r["row"] == result["row"] and r["processes"] == args.processes[0])
        print(
            f"| {result['row']} | {result['processes']} | {result['wall_seconds']:.1f} | {result['train_seconds']:.1f} "
            f"| {result['samples_per_second']:.1f} | {result['samples_per_second'] / one['samples_per_second']:.2f}x "
            f"| {result['last_eval_accuracy']:.4f} | {result['final_eval_accuracy']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
