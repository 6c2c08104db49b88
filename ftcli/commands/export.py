"""The export command: a run's model as ONNX, checked against PyTorch before it is kept.

    RUN/export/
      model.onnx     inputs input_ids, attention_mask [, token_type_ids]: int64 (batch, sequence); output logits
      config.json    the model's config, with its label names and problem_type
      tokenizer files
      thresholds.json  multi_label: each label's decision threshold

The graph is traced on two examples and checked on a batch of other size and length, so the
check also proves the dynamic axes. It is written into a staging folder that takes export/'s place
only when onnxruntime's logits match PyTorch's: a failed check leaves the run as it was.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from ftcli.data.batching import collate
from ftcli.data.prepare import prepare
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.runs.loading import load_run
from ftcli.runs.rundir import CALIBRATION_FILE, THRESHOLDS_FILE

FORMATS = ("onnx",)
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order of the graph's inputs, as in optimum
PARITY_EXAMPLES = 8
PARITY_ATOL = 1e-4  # fp32 kernels of two runtimes differ in summation order, by about 1e-6
# ONNX keeps a model in one protobuf file up to 2 GB; larger weights go to a model.onnx.data file.
SINGLE_FILE_BYTES = 2**31 - 2**27


@dataclass
class ExportResult:
    folder: Path
    onnx_file: Path
    max_difference: float  # largest |logit difference| between onnxruntime and PyTorch
    examples: int
    split: str  # where the examples came from
    atol: float


def export_run(
    run_path: str | Path, format: str = "onnx", examples: int = PARITY_EXAMPLES, atol: float = PARITY_ATOL
) -> ExportResult:
    """Export the run's model/ into RUN/export/, kept only if its logits match PyTorch's within atol."""
    if format not in FORMATS:
        raise FtcliError(f"unknown export format '{format}'", f"use one of: {', '.join(FORMATS)}")
    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module, "export", "ftcli export")
    loaded = load_run(run_path)  # on the CPU, where onnxruntime runs here: compare like with like
    run, config, model, tokenizer = loaded.run, loaded.config, loaded.model.eval(), loaded.tokenizer
    prepared = prepare(config.data, tokenizer, config.task)
    split = next(name for name in ("validation", "test", "train") if name in prepared.splits)
    rows = prepared.splits[split].select(range(min(examples + 2, len(prepared.splits[split])))).to_list()
    if len(rows) < 3:
        raise FtcliError(f"the {split} split has {len(rows)} examples; the export check needs at least 3", "add data")
    trace_batch = _inputs(collate(rows[:2], tokenizer.pad_token_id))
    check_batch = _inputs(collate(rows[2:], tokenizer.pad_token_id))

    staging = run.export_dir.with_name(f".{run.export_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        onnx_file = staging / "model.onnx"
        export_onnx(model, trace_batch, onnx_file)
        difference = max_logit_difference(model, onnx_file, check_batch)
        if not difference <= atol:  # `not <=` also catches NaN
            raise FtcliError(
                f"the ONNX model's logits differ from PyTorch's by up to {difference:.3g} (tolerance {atol:g}); "
                "nothing was exported",
                "report it with the model's name: an operator of this architecture exports inexactly",
            )
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for decided in (THRESHOLDS_FILE, CALIBRATION_FILE):  # the decisions the model is scored with
            if (loaded.weights / decided).is_file():
                shutil.copy2(loaded.weights / decided, staging / decided)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run.export_dir, ignore_errors=True)
    staging.rename(run.export_dir)
    return ExportResult(run.export_dir, run.export_dir / onnx_file.name, difference, len(rows) - 2, split, atol)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: batch[name] for name in ONNX_INPUTS if name in batch}


class _Logits(torch.nn.Module):
    """The classifier as the ONNX graph sees it: token tensors in, logits out."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def export_onnx(model: PreTrainedModel, example: dict[str, torch.Tensor], target: Path) -> None:
    """Trace the model with torch.export and write it as ONNX, batch and sequence length left free."""
    dynamic = {name: {0: "batch", 1: "sequence"} for name in example}
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # The exporter reports every step and every operator library it skips; ftcli reports the outcome.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Logits(model),
                (),
                str(target),
                kwargs=example,
                input_names=list(example),
                output_names=["logits"],
                dynamic_shapes=dynamic,
                external_data=parameter_bytes > SINGLE_FILE_BYTES,
                dynamo=True,
                verbose=False,
            )
    except Exception as error:  # torch.export refuses some models' Python code; say which, briefly
        raise FtcliError(
            f"{type(model).__name__} could not be exported to ONNX: {str(error).splitlines()[0]}",
            "this architecture is not traceable by torch.export; serve model/ with transformers instead",
        ) from None
    finally:
        exporter_log.setLevel(level)


def max_logit_difference(model: PreTrainedModel, onnx_file: Path, batch: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between onnxruntime's logits and PyTorch's on one batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(["logits"], {name: tensor.numpy() for name, tensor in batch.items()})[0]
    with torch.inference_mode():
        torch_logits = model(**batch).logits.float().numpy()
    return float(np.abs(onnx_logits - torch_logits).max())
