"""The experiment schema: defaults, validation with readable errors, overrides and the smoke shrink.

Every default lives here, each field's description doubles as the config reference. Loading
reports every problem at once, each naming its key and the fix; unknown keys suggest the
closest known one.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from collections.abc import Hashable
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftcli.errors import FtcliError
from ftcli.formats import CONLL_HINT, CONLL_SUFFIXES, FORMATS, READERS, SUFFIXES
from ftcli.metrics import BUILTIN_METRICS, METRICS, metric_problem
from ftcli import tasks

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
# ftcli.training.backends maps each to its class.
BACKEND_NAMES = ("loop", "trainer")
# data.unlabeled's split: texts a distilled student learns from its teacher's outputs on, never scored.
UNLABELED = "unlabeled"
# File systems allow 255 bytes a name; this leaves room for the suffixes ftcli adds to run names.
MAX_NAME_LENGTH = 200


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FoldConfig(_Strict):
    """One fold of a K-fold cross-validation of the training split (written by `ftcli audit`)."""

    folds: int = Field(
        ge=2,
        le=100,
        description="Cross-validation, as `ftcli audit` writes it: the training split is cut into this many folds "
        "(stratified by class for single_label); the run trains on all but fold `index` and validates on it "
        "(data.validation is then unused).",
    )
    index: int = Field(ge=0, description="The fold held out as validation, 0..folds-1.")
    seed: int = Field(0, description="Shuffles the examples before they are cut into folds.")

    @model_validator(mode="after")
    def _index_in_range(self) -> FoldConfig:
        if self.index >= self.folds:
            raise ValueError(f"data.fold.index={self.index} must be below data.fold.folds={self.folds}")
        return self


class DataConfig(_Strict):
    train: str | None = Field(None, description=f"Training file ({FORMATS}).")
    validation: str | None = Field(None, description="Validation file, evaluated during training.")
    test: str | None = Field(None, description="Test file, for `ftcli evaluate --split test`.")
    hub: str | None = Field(None, description="Hub dataset id (e.g. glue) instead of local files.")
    subset: str | None = Field(None, description="Hub dataset configuration (e.g. mrpc).")
    text_fields: list[str] = Field(
        ["text"], min_length=1, max_length=2, description="One text column, or two for sentence pairs."
    )
    label_field: str = Field(
        "label",
        description="The label column: class names or ids (single_label); a list of names or ids, or one string "
        "joined by data.label_separator (multi_label); a number (regression).",
    )
    label_fields: list[str] | None = Field(
        None, min_length=2, description="multi_label: several 0/1 columns, one per label (instead of data.label_field)."
    )
    label_separator: str = Field(
        ",", min_length=1, description="multi_label: what joins several labels in one csv/tsv field (or string)."
    )
    label_names: list[str] | None = Field(
        None,
        min_length=2,
        description="Class (or label) names in id order; inferred when absent: the training labels, sorted.",
    )
    label_range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="regression: [low, high]; every target is checked to lie within."
    )
    clip_predictions: bool = Field(False, description="regression: clip predictions to data.label_range.")
    max_length: int = Field(128, ge=2, le=8192, description="Tokens per example; longer ones are truncated (or windowed).")
    long_text: Literal["truncate", "window"] = Field(
        "truncate",
        description="A text longer than max_length: truncate it, or split it into overlapping windows that each "
        "train with its document's label and whose predictions are averaged back into one per document (pairs: "
        "the first text is windowed, the second kept whole).",
    )
    stride: int = Field(32, ge=0, description="long_text window: tokens each window shares with the one before.")
    tag_scheme: Literal["auto", "iob1", "iob2", "bioes"] = Field(
        "auto",
        description="token_classification: the entity tags' scheme, read into IOB2 for training; auto: BIOES when E-/S- "
        "occur, IOB1 when an I- opens an entity, else IOB2.",
    )
    label_all_subwords: bool = Field(
        False,
        description="token_classification: tag every piece of a word (B- made I- after the first), not only its first.",
    )
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training examples.")
    fold: FoldConfig | None = Field(None, description="Cross-validation: one fold of the training split held out.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use only the first N examples of validation and test.")
    unlabeled: str | None = Field(
        None,
        description="distill: a file of texts without labels (the data's format and text fields; a tagger's words may also be "
        "one text, cut as ftcli predict cuts it, or CoNLL lines of a word alone), which the student learns from the teacher's "
        "outputs on, beside the training split. Labels in it are never read; max_*_samples do not cut it.",
    )
    format: Literal["auto", "conll"] = Field(
        "auto",
        description="How data files are read. auto: by suffix (a .conll file as CoNLL, a .tsv file as a table with a "
        "header); conll: .conll, .tsv and .txt files as CoNLL (a word and its tag per line, apart by a TAB, a blank line "
        "between sentences), other files by suffix. token_classification's default is conll.",
    )
    quoting: Literal["auto", "quoted", "none"] = Field(
        "auto",
        description="csv/tsv quoting. quoted: fields may be wrapped in quotes (as pandas writes them); none: quotes are "
        "plain text and every line is a row (GLUE's tsv files); auto: quoted when the file reads as well-formed quoted "
        "fields, else none, and an error when a quote would join lines into one row.",
    )

    @field_validator("train", "validation", "test", "unlabeled")
    @classmethod
    def _known_suffix(cls, path: str | None) -> str | None:
        if path is not None and not path.lower().endswith(SUFFIXES + CONLL_SUFFIXES):
            raise ValueError(f"unsupported file type '{Path(path).suffix}'; use {FORMATS}")
        return path

    @model_validator(mode="after")
    def _readable_as_configured(self) -> DataConfig:
        """A file that only data.format: conll reads (.txt) is refused at once, not when read."""
        for split, path in self.split_files().items():
            if self.format != "conll" and Path(path).suffix.lower() not in READERS:
                raise ValueError(f"data.{split} {path}: a {Path(path).suffix} file is read as CoNLL only: {CONLL_HINT}")
        return self

    @field_validator("label_names")
    @classmethod
    def _unique_names(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("label names must be unique")
        return names

    @model_validator(mode="after")
    def _label_is_not_a_text(self) -> DataConfig:
        for key, columns in (("data.label_field", [self.label_field]), ("data.label_fields", self.label_fields or [])):
            for column in columns:
                if column in self.text_fields:
                    raise ValueError(
                        f"{key} '{column}' is also one of data.text_fields: name the columns that hold the labels "
                        f"in {key}, and only the texts in data.text_fields"
                    )
        if self.label_range is not None and not self.label_range[0] < self.label_range[1]:
            raise ValueError(f"data.label_range {self.label_range} must be [low, high] with low < high")
        if self.long_text == "window" and self.stride >= self.max_length // 2:
            raise ValueError(
                f"data.stride={self.stride} must be below half of data.max_length={self.max_length}, or the windows "
                "barely advance"
            )
        if self.label_fields and self.label_names:
            raise ValueError("data.label_fields names the labels already: drop data.label_names")
        if self.clip_predictions and self.label_range is None:
            raise ValueError("data.clip_predictions needs data.label_range: [low, high]")
        return self

    @property
    def label_columns(self) -> list[str]:
        """The columns that hold labels: label_fields (multi_label's 0/1 columns) or label_field."""
        return list(self.label_fields or [self.label_field])

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        local = any((self.train, self.validation, self.test))
        if self.hub and local:
            raise ValueError("give either data.hub or local files (data.train, ...), not both")
        if not self.hub and not self.train:
            raise ValueError("no training data: set data.train to a file, or data.hub (with data.subset)")
        if self.subset and not self.hub:
            raise ValueError("data.subset needs data.hub")
        return self

    def split_files(self) -> dict[str, str]:
        """The local files by split name, in train/validation/test/unlabeled order (with data.hub,
        the unlabeled file alone)."""
        files = {"train": self.train, "validation": self.validation, "test": self.test, UNLABELED: self.unlabeled}
        return {split: path for split, path in files.items() if path}


class TrainingConfig(_Strict):
    epochs: float | None = Field(3, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step, per process, before accumulation.")
    eval_batch_size: int = Field(64, ge=1, description="Examples per evaluation or prediction batch.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up.")
    scheduler: Literal[SCHEDULERS] = Field("linear", description="Learning-rate schedule after warm-up.")  # type: ignore[valid-type]
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this global norm; null disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision. auto: bf16 on GPUs that support it, and on CPUs with AVX-512 BF16 or AMX "
        "where a training step measured at least 1.3x as fast as in fp32 (timed once per machine, cached; the "
        "choice and its reason go into env.json), else fp32. fp16 needs a GPU (fp32 on the CPU).",
    )
    eval_every: Literal["epoch"] | int = Field("epoch", description="Evaluate each epoch, or every N optimizer steps.")
    save_every: Literal["epoch"] | int = Field(
        "epoch",
        description="Checkpoint each epoch, or every N optimizer steps. N need not be a multiple of eval_every: "
        "checkpoints between evaluations are resume points, and then every evaluation is checkpointed too, so "
        "that the best model is always an evaluated checkpoint.",
    )
    save_every_minutes: float | None = Field(
        None,
        gt=0,
        description="Also checkpoint once this many minutes of training have passed since the last checkpoint "
        "(preemptible machines); null: only by save_every.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept; the best one is never deleted.")
    logging_steps: int = Field(10, ge=1, description="Log train loss and learning rate every N optimizer steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without improvement of the first metric."
    )
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="Recompute activations during the backward pass: far less memory, about a third slower. auto: on "
        "for a decoder LLM (Llama, Qwen, Mistral, Gemma, Phi) on a CUDA GPU, where activations dominate memory, else "
        "off (env.json says which and why).",
    )
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw (PyTorch), or adamw_8bit: bitsandbytes' AdamW with 8-bit state (CUDA only)."
    )
    seed: int = Field(42, ge=0, description="Seed for weights of the new head, shuffling and dropout.")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None,
        description="single_label: weight each training example's loss by its class, balanced (examples / (classes "
        "x the class's examples), as scikit-learn) or one weight per class; multi_label: each label's positive "
        "weight, balanced (negatives / positives in training) or one per label. Evaluation loss stays unweighted.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="single_label and token_classification: cross-entropy label smoothing.")
    loss: Literal["cross_entropy", "bce", "mse", "huber"] | None = Field(
        None,
        description="The training loss; null: the task's own (cross_entropy, bce, mse). regression may take huber.",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length (shuffled mega-batches, sorted inside): far less padding."
    )
    pad_to_multiple_of: Literal["auto"] | int | None = Field(
        "auto", description="Round each batch's length up to a multiple (tensor-core friendly); auto: 8 on a GPU, none on the CPU."
    )
    data_on_device: Literal["auto"] | bool = Field(
        "auto", description="Keep the tokenized training set on the GPU (loop backend); auto: when it takes under 1 GiB, or always with compile=cuda_graphs."
    )
    compile: Literal["auto", "cuda_graphs", "none"] = Field(
        "auto",
        description="loop backend: cuda_graphs replays each training step as a CUDA graph, one per length bucket "
        "(much less launch overhead at small batches; one GPU process, no accumulation, adamw). auto: cuda_graphs "
        "where it can work and the training set fits on the GPU, else eager steps, also when the model's step "
        "cannot be captured. none: eager steps.",
    )
    fused_kernels: Literal["auto"] | bool = Field(
        "auto",
        description="loop backend with CUDA graphs: BERT-family layers run their bias-GELU and "
        "bias-dropout-residual-LayerNorm chains as fused Triton kernels (steps 5-6% faster on an H200; dropout "
        "draws its own masks; compiling costs 4-7 s on a machine's first run, 0.5 s from Triton's cache after). "
        "auto: for runs of 2,000 steps or more. false: PyTorch's kernels.",
    )

    @field_validator("class_weights", mode="before")
    @classmethod
    def _balanced_or_positive_weights(cls, value: Any) -> Any:
        if value is None or value == "balanced":
            return value
        weights = value if isinstance(value, list) else []
        if weights and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
            return value
        raise ValueError(f"{value!r} is neither 'balanced' nor a list of positive weights, one per label")

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive_multiple(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} must be 'auto', null or >= 1")
        return value

    @property
    def saves_at_evaluations(self) -> bool:
        """Whether every evaluation is checkpointed too: when save_every steps do not fall on every
        evaluation, the best model must still be a checkpoint that was scored. A multiple (or both
        'epoch') keeps the checkpoints of save_every alone, as before."""
        return isinstance(self.eval_every, int) and isinstance(self.save_every, int) and bool(self.save_every % self.eval_every)

    def resolved_pad_multiple(self, device_type: str) -> int | None:
        if self.pad_to_multiple_of == "auto":
            return 8 if device_type == "cuda" else None
        return self.pad_to_multiple_of

    @field_validator("eval_every", "save_every", mode="before")
    @classmethod
    def _epoch_or_steps(cls, value: Any) -> Any:
        if value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"{value!r} is neither 'epoch' nor a step count >= 1")

    @model_validator(mode="after")
    def _length_and_schedule(self) -> TrainingConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set training.epochs or training.max_steps")
        if isinstance(self.eval_every, int) != isinstance(self.save_every, int):
            raise ValueError("eval_every and save_every must both be 'epoch' or both step counts")
        if self.compile == "cuda_graphs" and self.data_on_device is False:
            raise ValueError("compile=cuda_graphs reads its batches from the training set on the GPU: drop data_on_device: false")
        return self


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="Rank of the low-rank update of each adapted layer.")
    alpha: int = Field(16, ge=1, description="The update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the input of each adapter.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Layers to adapt, by name or name suffix (e.g. [query, value]); null: every Linear layer of the body "
        "for a decoder (its attention and MLP projections) or where peft has no choice (ModernBERT), else peft's (BERT's query and value).",
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None,
        description="QLoRA: hold the frozen base model in 4-bit (NF4) or 8-bit with bitsandbytes (CUDA only; "
        "pip install 'ftcli[qlora]'); the adapters and the head stay in full precision. null: no quantization.",
    )


class DistillConfig(_Strict):
    teacher: str = Field(..., description="The teacher: a trained ftcli run directory of the same task and labels.")
    temperature: float = Field(2.0, gt=0, description="T: both models' logits are divided by it in the distillation loss.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the distillation loss (the teacher's outputs); 1 - alpha weighs the task loss on the labels."
    )
    max_drop: float = Field(
        0.01, ge=0, description="The gate: the student passes when its first metric is at most this far below the teacher's."
    )


class SweepRange(_Strict):
    low: float | int = Field(..., description="Smallest value tried.")
    high: float | int = Field(..., description="Largest value tried.")
    log: bool = Field(False, description="Sample on a log scale (for learning rates).")

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, not {self.low}")
        return self


class Config(_Strict):
    name: str = Field(..., description="Run name; the run directory is output_dir/name.")
    backend: Literal[BACKEND_NAMES] = Field(  # type: ignore[valid-type]
        "loop", description="loop (ftcli's own, the faster: CUDA graphs on a GPU) or trainer (HF Trainer)."
    )
    output_dir: str = Field("runs", description="Folder that holds run directories.")
    model: str = Field("minilm", description="`minilm` (packaged, offline), a Hub id, or a local model directory.")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub; only for models you trust.")
    data: DataConfig
    task: Literal[tasks.TASKS] = Field(  # type: ignore[valid-type]
        tasks.DEFAULT,
        description=tasks.described() + ".",
    )
    training: TrainingConfig = TrainingConfig()
    metrics: list[str] = Field(
        None,  # filled from the task when left out (its default_metrics)
        min_length=1,
        description="The first one picks the best model. Default: "
        + "; ".join(f"{name} {', '.join(task.default_metrics)}" for name, task in tasks.REGISTRY.items())
        + ". Built in: "
        + ", ".join(BUILTIN_METRICS),
    )
    thresholds: Literal["tuned"] | float = Field(
        "tuned",
        description="multi_label: the probability above which a label is predicted; tuned: per label, maximising "
        "its F1 on validation after training (0.5 without a validation split).",
    )
    decision_threshold: Literal["tuned"] | float = Field(
        0.5,
        description="single_label with two classes: the probability of the second class above which it is "
        "predicted; tuned: the one that maximises the first metric on validation after training.",
    )
    calibration: Literal["temperature", "none"] = Field(
        "temperature",
        description="Classification: after training, fit one temperature on validation that makes the probabilities "
        "calibrated, folded into the model's last layer (predicted labels unchanged); none: keep them as trained.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="Also log events to these trackers (each an optional install); metrics.jsonl is always written."
    )
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters and the classifier head instead of every weight (needs ftcli[lora])."
    )
    distill: DistillConfig | None = Field(
        None, description="Train this run as a smaller student of a teacher run (`ftcli distill` writes it)."
    )
    sweep: dict[str, SweepRange | list[bool | int | float | str]] | None = Field(
        None,
        description="Search space of `ftcli sweep`: a dotted key to {low, high, log} or to a list of choices.",
    )
    push_to_hub: str | None = Field(
        None, description="After training, upload model/ and a model card to this private Hub repo (user/name)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a folder)")
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"{len(name)} characters is too long for a folder name; use at most {MAX_NAME_LENGTH} "
                "(file systems allow 255, and ftcli appends -smoke, -sweep or -trial-N)"
            )
        return name

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        """Metrics left out (or null) are the task's defaults, and so are the data options it sets
        (token_classification: the columns of words and tags)."""
        if not isinstance(raw, dict):
            return raw
        task = tasks.REGISTRY.get(raw.get("task", tasks.DEFAULT), tasks.get(tasks.DEFAULT))
        if raw.get("metrics") is None:
            raw = raw | {"metrics": list(task.default_metrics)}
        if task.data_defaults and isinstance(raw.get("data"), dict):
            # A default may depend on the options given (token_classification's stride on max_length).
            defaults = {key: value(raw["data"]) if callable(value) else value for key, value in task.data_defaults.items()}
            raw = raw | {"data": defaults | raw["data"]}
        return raw

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        for name in names:
            if name in BUILTIN_METRICS or "/" in name or Path(name).exists():
                continue
            close = difflib.get_close_matches(name, BUILTIN_METRICS, n=1, cutoff=0.7)
            if close:
                raise ValueError(f"unknown metric '{name}'; did you mean '{close[0]}'?")
        return names

    @field_validator("thresholds", "decision_threshold")
    @classmethod
    def _probability(cls, value: Any) -> Any:
        if not isinstance(value, str) and not 0 < value < 1:
            raise ValueError(f"{value} must be 'tuned' or a probability between 0 and 1")
        return value

    @model_validator(mode="after")
    def _fits_the_task(self) -> Config:
        """Options of one task set under another, each named with the fix."""
        problems = [problem for name in self.metrics if name in METRICS and (problem := metric_problem(name, self.task))]
        problems += tasks.option_problems(self.task, self) + self._needs_validation()
        if self.data.unlabeled and self.distill is None:
            problems.append("data.unlabeled is read only by a distilled student; drop it, or distill from a teacher (distill.teacher)")
        losses = tasks.get(self.task).losses
        if self.training.loss is not None and self.training.loss not in losses:
            problems.append(f"training.loss {self.training.loss} does not train task {self.task}; use {' or '.join(losses)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def loss(self) -> str:
        """The training loss: training.loss, or the task's own."""
        return self.training.loss or tasks.get(self.task).losses[0]

    @field_validator("sweep", mode="before")
    @classmethod
    def _search_space(cls, space: Any) -> Any:
        if space is None:
            return None
        if not isinstance(space, dict) or not space:
            raise ValueError("give a mapping of dotted keys to {low, high, log} or to a list of choices")
        problems = [problem for key, values in space.items() for problem in _sweep_problems(key, values)]
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, repo_id: str | None) -> str | None:
        if repo_id is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", repo_id):
            raise ValueError(f"'{repo_id}' is not a Hub repo id; write user/name")
        return repo_id

    def _needs_validation(self) -> list[str]:
        """Options that act on the validation split, set where there is none to act on (local files
        without data.validation, and no cross-validation fold): they would be ignored without a word."""
        data = self.data
        if data.validation or data.hub or data.fold:
            return []
        fix = "add data.validation, or drop"
        problems = []
        if self.training.early_stopping_patience:
            problems.append(f"training.early_stopping_patience counts evaluations on validation, and there is none: {fix} it")
        if self.decision_threshold == "tuned":
            problems.append(f"decision_threshold: tuned is tuned on validation, and there is none: {fix} it")
        return problems

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _sweep_problems(key: Any, values: Any) -> list[str]:
    """What is wrong with one entry of the search space (schema checks of the values come later)."""
    sweepable = _leaf_keys(Config, exclude={"name", "sweep", "push_to_hub"})
    if key not in sweepable:
        close = difflib.get_close_matches(str(key), sweepable, n=1, cutoff=0.6)
        return [f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")]
    if isinstance(values, list):
        if not values:
            return [f"{key}: the list of choices is empty"]
        if not all(isinstance(value, (bool, int, float, str)) for value in values):
            return [f"{key}: choices must be numbers, strings or booleans"]
        return []
    if isinstance(values, dict):
        if isinstance(values.get("low"), bool) or isinstance(values.get("high"), bool):
            return [f"{key}: low and high must be numbers"]
        try:
            SweepRange.model_validate(values)
        except ValidationError as error:
            return [f"{key}: {problem}" for problem in _range_problems(error)]
        return []
    return [f"{key}: give {{low, high, log}} or a list of choices, not {values!r}"]


def _range_problems(error: ValidationError) -> list[str]:
    """One problem per key of a range (pydantic reports a bad number once per member of int | float)."""
    by_key: dict[str | None, str] = {}
    for problem in error.errors():
        key = next((part for part in problem["loc"] if isinstance(part, str)), None)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = f"unknown key '{key}' (use low, high, log)"
        elif problem["type"] == "missing":
            message = f"{key} is required"
        elif key is not None:
            message = f"{key}: {message.lower()}"
        by_key.setdefault(key, message)
    return list(by_key.values())


def _leaf_keys(model: type[BaseModel], exclude: set[str] = frozenset(), prefix: str = "") -> list[str]:
    """Every dotted key that holds a value (not a section), in schema order."""
    keys = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        section = _section_model(field.annotation)
        keys += _leaf_keys(section, prefix=f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return keys


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a section field, also of an optional one (`LoraConfig | None`)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment, apply `key=value` overrides and validate everything at once. A run
    directory's config places the run where the directory is now (a run copied or moved to another
    disk continues there), whatever output_dir it was trained under; an override may still move it."""
    raw = read_yaml(path)
    if Path(path).is_dir():
        where = Path(path).resolve()
        raw["output_dir"], raw["name"] = str(where.parent), where.name
    for override in overrides or []:
        apply_override(raw, override)
    return validate(raw, source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise FtcliError(f"config file {path} does not exist", "check the path")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKey as error:
        raise FtcliError(f"{path}: {error}", "keep one of them: the second would silently replace the first") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise FtcliError(f"{path}: YAML syntax error{where}: {error.problem}", "fix the YAML") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise FtcliError(f"{path}: not a readable YAML file ({error})", "save it as UTF-8 YAML") from None
    if raw is None:
        raise FtcliError(f"{path} is empty", "write an experiment into it; see configs/ for examples")
    if not isinstance(raw, dict):
        raise FtcliError(f"{path} must hold a mapping of keys, not a {type(raw).__name__}", "see configs/ for examples")
    return raw


class DuplicateKey(ValueError):
    """A mapping in the YAML gives the same key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the
    last value silently, so a forgotten first `name:` would quietly train something else."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own error follows: found unhashable key
            line = key_node.start_mark.line + 1
            if key in lines:
                raise DuplicateKey(f"key '{key}' appears twice in one mapping (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as a YAML scalar."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise FtcliError(f"override '{override}' is not KEY=VALUE", "write e.g. --set training.learning_rate=3e-5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            dotted = ".".join(parents[: depth + 1])
            raise FtcliError(f"override '{override}': {dotted} is not a section", f"{dotted} holds a single value")
        node = child
    node[leaf] = value


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(problem) for problem in error.errors()]
        raise FtcliError(f"{source}: " + "; ".join(dict.fromkeys(problems))) from None


def _describe(problem: dict[str, Any]) -> str:
    location = [part for part in problem["loc"] if isinstance(part, str)]
    # pydantic names union members in the location (e.g. 'int', 'literal[...]'); hide them.
    location = [part for part in location if not re.match(r"^(int|str|float|literal\[|list\[|function-)", part)]
    key = ".".join(location) or "config"
    kind = problem["type"]
    if kind == "extra_forbidden":
        parent = _section_fields(location[:-1])
        close = difflib.get_close_matches(location[-1], parent, n=1, cutoff=0.5)
        suggestion = f"did you mean '{'.'.join(location[:-1] + [close[0]])}'?" if close else f"known keys: {', '.join(parent)}"
        return f"unknown key '{key}'; {suggestion}"
    if kind == "missing":
        return f"{key} is required"
    message = problem["msg"].removeprefix("Value error, ")
    given = problem.get("input")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key} must be a section of keys, not a {type(given).__name__} ({given!r})"
    if kind.startswith(("greater_than", "less_than")) or kind in ("int_parsing", "float_parsing", "bool_parsing"):
        return f"{key}={given!r}: {message.lower()}"
    # Checks across a whole section name their keys themselves.
    return message if key in ("config", "data", "training") else f"{key}: {message}"


def _section_fields(path: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        section = _section_model(model.model_fields[part].annotation) if part in model.model_fields else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML, in schema order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def resolve_paths(config: Config, base: Path | None = None) -> Config:
    """Make local data paths absolute so a run directory's config works from any folder."""
    base = base or Path.cwd()
    updates = {
        split: str((base / path).resolve()) for split, path in config.data.split_files().items()
    }
    resolved = {"data": config.data.model_copy(update=updates)}
    if config.distill is not None:
        resolved["distill"] = config.distill.model_copy(update={"teacher": str((base / config.distill.teacher).resolve())})
    return config.model_copy(update=resolved)


def smoke(config: Config) -> Config:
    """Shrink any experiment to a few steps on a few examples, so CI checks the whole path in seconds."""
    length = 64
    # The stride stays below half of the shorter max_length, as validation asks of windows (the
    # saved config.yaml is read again by evaluate and predict).
    data = config.data.model_copy(
        update={"max_train_samples": 32, "max_eval_samples": 32, "max_length": length, "stride": min(config.data.stride, length // 2 - 1)}
    )
    training = config.training.model_copy(
        update={
            "max_steps": 4,
            "batch_size": min(config.training.batch_size, 4),
            "eval_batch_size": 16,
            "grad_accum": 1,
            "eval_every": 2,
            "save_every": 2,
            "logging_steps": 1,
            "early_stopping_patience": None,
        }
    )
    return config.model_copy(update={"name": f"{config.name}-smoke", "data": data, "training": training})


def reference_markdown() -> str:
    """The config reference as a markdown table, from the schema's defaults and descriptions."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, spec in model.model_fields.items():
            section = next(
                (kind for kind in (spec.annotation, *get_args(spec.annotation))
                 if isinstance(kind, type) and issubclass(kind, BaseModel)),
                None,
            )
            if section is not None:
                walk(section, f"{prefix}{name}.")
                continue
            default = "required" if spec.is_required() else f"`{json.dumps(spec.default)}`"
            lines.append(f"| `{prefix}{name}` | {default} | {spec.description} |")

    walk(Config, "")
    return "\n".join(lines)
