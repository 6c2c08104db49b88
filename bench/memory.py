"""Peak GPU memory and step time of a decoder LLM classifier with LoRA: HF Trainer + peft vs ftcli.

    python -m bench.memory --out bench-memory.md   # on a GPU: Qwen2.5-0.5B's shape, LoRA and QLoRA (4-bit)
    python -m bench.memory --tiny                  # a tiny Qwen2 for 3 steps (the CPU check that it runs)

The model is Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 key-value heads, MLP 4864,
vocabulary 151,936, tied embeddings) with random weights, saved in bf16 as the real checkpoint
ships, with a byte-level BPE tokenizer trained here that has no pad token (as Qwen2's): memory and
speed do not depend on the values, and nothing comes from the Hub. The task is sequence
classification with 2 labels, on random texts of more than 256 tokens cut to exactly 256, batch 8.
Every row trains LoRA r 8, alpha 16, dropout 0.05 on every projection of attention and MLP (ftcli's
default for decoders), the head trained in full, bf16 autocast over fp32 weights, AdamW at 2e-4 with
a linear schedule, gradient checkpointing as ftcli's default has it (auto: on for a decoder on
CUDA, so on in the GPU rows and off in the CPU rows; or as --gradient-checkpointing says), no
evaluation, no checkpoint before the last step:
  (a) hf-trainer     the peft documentation's recipe: AutoModelForSequenceClassification, pad =
                     end-of-text token, get_peft_model(LoraConfig(task_type=SEQ_CLS)), Trainer
  (b) ftcli          ftcli.training.recipe.train with its default backend (loop)
  (c), (d)           the same with the base model in 4 bits (QLoRA: NF4, double quantization, bf16
                     compute; prepare_model_for_kbit_training in row (c)); CUDA and bitsandbytes only
Each row runs in a fresh process, so the allocator starts empty. Peak memory is
torch.cuda.max_memory_allocated at the end of the last step (the process's peak resident set on a
CPU): the model, its activations and the optimizer, not what ftcli does after training (saving and
merging). Step time is the mean of the steps after the warm-up ones (the first steps allocate,
pick kernels and capture graphs). Ratios are ftcli's over HF's in the same precision; the issue's
targets: memory <= 1.00x, step time <= 0.50x.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftcli.training.job import NoEvents

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
LABELS = ["no", "yes"]
# Qwen2.5-0.5B's config.json, but for the token ids (the tokenizer is this benchmark's own).
QWEN2_05B = {
    "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
        "max_position_embeddings": 512}
# What a peft user writes for a Llama or Qwen2 classifier, and what ftcli's default adapts (lora.default_target_modules).
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4
ROWS = {"hf": "(a) hf-trainer + peft", "ftcli": "(b) ftcli", "hf-4bit": "(c) hf-trainer + peft, 4-bit", "ftcli-4bit": "(d) ftcli, 4-bit"}


@dataclass
class Row:
    name: str
    peak_bytes: int = 0
    step_seconds: float = 0.0
    notes: dict = field(default_factory=dict)
    failed: str = ""


# ---------------------------------------------------------------- the model and the data


def random_texts(count: int, words: int, seed: int = 0) -> list[str]:
    """Texts of `words` words drawn from 400 made-up words: more than one token each, whatever the BPE merges."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(400)]
    return [" ".join(rng.choice(vocabulary, size=words)) for _ in range(count)]


def make_model_dir(target: Path, tiny: bool, texts: list[str]) -> Path:
    """A Qwen2 causal LM (as the Hub's checkpoints are) with random weights in bf16, and its tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts[:64], vocab_size=1000, special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS)  # no pad token, as Qwen2's
    shape = TINY | {"vocab_size": len(tokenizer)} if tiny else QWEN2_05B
    eos = tokenizer.eos_token_id
    config = Qwen2Config(**shape, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def write_data(work: Path, rows: int) -> list[str]:
    """train.jsonl: `rows` random texts of 300 words (over 256 tokens) with random labels."""
    texts = random_texts(rows, 300)
    labels = np.random.default_rng(1).integers(0, 2, size=rows)
    lines = [json.dumps({"text": text, "label": LABELS[label]}) for text, label in zip(texts, labels)]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    return texts


# ---------------------------------------------------------------- measuring


class StepClock(NoEvents):
    """ftcli's training events (and, through `callback`, HF Trainer's): the time at the end of the
    last warm-up step and of the last step, and the peak memory then. The two synchronizations
    are the only ones it adds."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.marks: dict[int, float] = {}
        self.peak_bytes = 0

    def step(self, step: int, samples: int) -> None:
        if step not in (self.warmup, self.steps):
            return
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.marks[step] = time.perf_counter()
        if step == self.steps:
            self.peak_bytes = peak_bytes(self.device)

    @property
    def step_seconds(self) -> float:
        return (self.marks[self.steps] - self.marks[self.warmup]) / (self.steps - self.warmup)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step(state.global_step, 0)

        return Clock()


def peak_bytes(device: str) -> int:
    """The process's peak: GPU memory its tensors held, or on a CPU its resident set (VmHWM)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


# ---------------------------------------------------------------- the rows, each in its own process


def ftcli_config(args: argparse.Namespace, quantize: bool) -> Any:
    """The settings of every row, as ftcli's config; the HF rows read gradient checkpointing from it (ftcli's default)."""
    from ftcli.config import validate

    return validate({
        "name": args.row, "output_dir": str(args.work / "runs"), "model": str(args.model_dir),
        "data": {"train": str(args.work / "train.jsonl"), "text_fields": ["text"], "label_field": "label",
                 "label_names": LABELS, "max_length": args.length},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": LEARNING_RATE,
                     "precision": "bf16" if args.device == "cuda" else "fp32", "eval_every": args.steps,
                     "save_every": args.steps, "logging_steps": args.steps}
        | ({} if args.gradient_checkpointing == "default" else {"gradient_checkpointing": args.gradient_checkpointing == "on"}),
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05} | ({"quantize": "4bit"} if quantize else {}),
    })


def run_ftcli(args: argparse.Namespace, quantize: bool) -> Row:
    from ftcli.training.recipe import train

    config = ftcli_config(args, quantize)
    clock = StepClock(args.warmup, args.steps, args.device)
    result = train(config, events=clock)
    extra = result.outcome.extra
    recorded = json.loads((result.run.path / "metrics.json").read_text())["train"].get("peak_gpu_memory_bytes")
    env = json.loads((result.run.path / "env.json").read_text())
    notes = {"steps": extra.get("steps"), "gradient checkpointing": env["gradient_checkpointing"]}
    if recorded is not None:  # what the run itself recorded: training alone, counted from the backend's start
        notes["metrics.json peak GiB"] = round(recorded / 2**30, 3)
    return Row(ROWS[args.row], clock.peak_bytes, clock.step_seconds, notes)


def gradient_checkpointing(args: argparse.Namespace, quantize: bool) -> bool:
    """Whether the HF rows recompute activations: as ftcli resolves the setting (its default auto: on
    for a decoder on CUDA) for this model on this device, so that both sides run alike."""
    from transformers import AutoConfig

    from ftcli.modeling import resolve_gradient_checkpointing

    setting = ftcli_config(args, quantize).training.gradient_checkpointing
    return resolve_gradient_checkpointing(setting, AutoConfig.from_pretrained(args.model_dir), torch.device(args.device))[0]


def hf_model(args: argparse.Namespace, quantize: bool, checkpointing: bool, pad_id: int) -> Any:
    """The peft documentation's model: the classifier (its body in 4 bits for QLoRA) with LoRA adapters."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["score"],
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=len(LABELS), **kwargs)
    model.config.pad_token_id = pad_id  # or batches of more than one fail
    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS)
    return get_peft_model(model, lora)  # SEQ_CLS: the head (score) is trained in full


def run_hf(args: argparse.Namespace, quantize: bool) -> Row:
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    checkpointing = gradient_checkpointing(args, quantize)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in (args.work / "train.jsonl").read_text().splitlines()]
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=args.length)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": LABELS.index(row["label"])}
        for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows)
    ]
    assert {len(example["input_ids"]) for example in dataset} == {args.length}, "a text shorter than data.max_length"
    training_args = TrainingArguments(
        str(args.work / "hf"), max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=LEARNING_RATE,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", save_strategy="no", logging_steps=args.steps,
        report_to="none", disable_tqdm=True, **checkpointing_arguments(TrainingArguments, checkpointing),
    )
    clock = StepClock(args.warmup, args.steps, args.device)
    model = hf_model(args, quantize, checkpointing, tokenizer.pad_token_id)
    trainer = Trainer(model, training_args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[clock.callback()])
    trainer.train()
    return Row(ROWS[args.row], clock.peak_bytes, clock.step_seconds, {"gradient checkpointing": checkpointing})


def quiet() -> None:
    """No progress bars (saving, loading, tokenizing) nor transformers' advice, here and in the rows' processes."""
    from transformers.utils import logging as transformers_logging

    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    # transformers 5 renames gradient_ to activation_checkpointing, and peft still reads the old name.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def checkpointing_arguments(arguments: type, on: bool) -> dict[str, Any]:
    """TrainingArguments' gradient checkpointing, by its name in this transformers (activation_ since 5.2x)."""
    name = "activation_checkpointing" if "activation_checkpointing" in arguments.__dataclass_fields__ else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False}} if on else {}


def run_row(args: argparse.Namespace) -> None:
    """One row in this process (the parent's --row): its Row as a JSON line starting with ROW."""
    os.environ["FTCLI_CACHE"] = str(args.work / f"cache-{args.row}")
    run = run_hf if args.row.startswith("hf") else run_ftcli
    row = run(args, quantize=args.row.endswith("4bit"))
    print("ROW " + json.dumps(asdict(row)), flush=True)


def row_in_subprocess(args: argparse.Namespace, name: str) -> Row:
    """A row in a fresh Python process, its stderr passed through; a failure is the row's verdict, not the benchmark's end."""
    command = [sys.executable, "-m", "bench.memory", "--row", name, "--work", str(args.work), "--model-dir", str(args.model_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--length", str(args.length), "--device", args.device, "--gradient-checkpointing", args.gradient_checkpointing]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    reported = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not reported:
        return Row(ROWS[name], failed=f"exit code {done.returncode} (its error is above)")
    return Row(**json.loads(reported[-1].removeprefix("ROW ")))


# ---------------------------------------------------------------- the table


def ratio_cell(value: float, base: float, target: float) -> str:
    ratio = value / base
    return f"{ratio:.2f}x ({'met' if ratio <= target else 'missed'}: target <= {target:.2f}x)"


def render(rows: dict[str, Row], header: str, device: str, skipped: list[str]) -> str:
    """The markdown: each ftcli row's ratios to the HF row of the same precision."""
    memory = "peak GPU memory GiB" if device == "cuda" else "peak resident set GiB"
    lines = [header, "", f"| row | {memory} | mean step ms | memory vs HF | step time vs HF | notes |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if row.failed:
            lines.append(f"| {row.name} | - | - | - | - | failed: {row.failed} |")
            continue
        base = rows.get(name.replace("ftcli", "hf"))
        if name.startswith("hf"):
            ratios = ["1.00x", "1.00x"]
        elif base is None or base.failed:
            ratios = ["-", "-"]
        else:
            ratios = [ratio_cell(row.peak_bytes, base.peak_bytes, 1.0), ratio_cell(row.step_seconds, base.step_seconds, 0.5)]
        notes = ", ".join(f"{key} {value}" for key, value in row.notes.items())
        lines.append(f"| {row.name} | {row.peak_bytes / 2**30:.3f} | {row.step_seconds * 1000:.1f} | {ratios[0]} | {ratios[1]} | {notes} |")
    return "\n".join(lines + [""] + skipped) + "\n"


def header_line(args: argparse.Namespace) -> str:
    import peft
    import transformers

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    shape = "tiny Qwen2" if args.tiny else "Qwen2.5-0.5B's shape"
    return (
        f"### {time.strftime('%Y-%m-%d')} · {device} · torch {torch.__version__} · transformers {transformers.__version__} · "
        f"peft {peft.__version__} · {shape} (random weights), LoRA r 8 · batch {args.batch_size} x {args.length} tokens · "
        f"{args.steps} steps, {args.warmup} of them warm-up · {'bf16' if args.device == 'cuda' else 'fp32'}"
    )


def four_bit_skipped(args: argparse.Namespace) -> str | None:
    """Why the 4-bit rows cannot run here, or None."""
    if args.tiny:
        return "4-bit rows skipped: --tiny runs without quantization"
    if args.device != "cuda":
        return "4-bit rows skipped: bitsandbytes quantizes on CUDA only, and this runs on the CPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit rows skipped: bitsandbytes is not installed (pip install 'ftcli[qlora]')"
    return None


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2, 3 steps, no 4-bit: the check that it runs")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 30; --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the step time (default 5; --tiny 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="tokens per text")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {', '.join(ROWS)}")
    parser.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="default",
                        help="in every row; default: as ftcli's default has it")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # a row's own process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet()
    args.steps = args.steps or (3 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    if args.row:
        run_row(args)
        return ""
    return compare(args)


def compare(args: argparse.Namespace) -> str:
    """Every row in its own process, on one model folder and one data file; the markdown printed (and written to --out)."""
    names = [name for name in args.rows.split(",") if name]
    skipped = four_bit_skipped(args)
    if skipped and any(name.endswith("4bit") for name in names):
        names = [name for name in names if not name.endswith("4bit")]
        print(skipped, flush=True)
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-memory-") as tmp:
        args.work = Path(tmp)
        texts = write_data(args.work, args.steps * args.batch_size)
        args.model_dir = make_model_dir(args.work / "model", args.tiny, texts)
        for name in names:
            rows[name] = row_in_subprocess(args, name)
            print(json.dumps(asdict(rows[name])), flush=True)
    table = render(rows, header_line(args), args.device, [skipped] if skipped else [])
    print(table)
    if args.out:
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
