"""The export command: a run's model as ONNX, checked against PyTorch before it is kept.

    RUN/export/
      model.onnx     inputs input_ids, attention_mask [, token_type_ids]: int64 (batch, sequence); output logits
      config.json    the model's config, with its label names and problem_type
      tokenizer files
      thresholds.json  multi_label: each label's decision threshold
      model.int8.onnx  with --quantize int8, when its metric holds (below)
      report.json    the parity check, the files' sizes, the weights of model/ it was exported from
                     (size and mtime: ftcli predict uses the export only while they are current),
                     each file's size and digests (files: predict and serve refuse a damaged one)
                     and, with --quantize, both models' metric

With --quantize int8, onnxruntime's dynamic quantization (int8 weights, activations quantized on
the fly) of the fp32 graph is scored beside it on the validation split (else test) with the run's
first metric; it is kept only when the metric drops by at most max_drop (absolute, 0.005 by
default), and otherwise deleted with both numbers in report.json: fp32 is always written.

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

from datasets import Dataset

from ftcli.data.batching import collate, column
from ftcli.data.padding import length_sorted_batches
from ftcli.data.prepare import prepare
from ftcli import tasks
from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.fileio import atomic_write_json, writing
from ftcli.inference import by_document, score
from ftcli.metrics import MetricSuite, higher_is_better, primary_metric
from ftcli.onnx_predict import file_stamps
from ftcli.runs.loading import LoadedRun, load_run
from ftcli.runs.rundir import CALIBRATION_FILE, EXPORT_REPORT_FILE, INT8_FILE, ONNX_FILE, THRESHOLDS_FILE, RunDir

FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)
MAX_DROP = 0.005  # the largest absolute drop of the first metric an int8 model may cost
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order of the graph's inputs, as in optimum
PARITY_EXAMPLES = 8
PARITY_ATOL = 1e-4  # fp32 kernels of two runtimes differ in summation order, by about 1e-6
# ONNX keeps a model in one protobuf file up to 2 GB; larger weights go to a model.onnx.data file.
SINGLE_FILE_BYTES = 2**31 - 2**27


@dataclass
class QuantizeCheck:
    """The int8 model against the fp32 one, on a labeled split with the run's first metric."""

    metric: str
    split: str
    fp32: float
    int8: float
    drop: float  # how much worse int8 scores (negative: better)
    max_drop: float
    kept: bool
    file: Path  # where it is (kept) or would have been
    fp32_bytes: int
    int8_bytes: int


@dataclass
class ExportResult:
    folder: Path
    onnx_file: Path
    max_difference: float  # largest |logit difference| between onnxruntime and PyTorch
    examples: int
    split: str  # where the examples came from
    atol: float
    quantized: QuantizeCheck | None = None


def export_run(
    run_path: str | Path, format: str = "onnx", examples: int = PARITY_EXAMPLES, atol: float = PARITY_ATOL,
    quantize: str | None = None, max_drop: float = MAX_DROP,
) -> ExportResult:
    """Export the run's model/ into RUN/export/, kept only if its logits match PyTorch's within atol;
    with quantize="int8" also an int8 model, kept only if its metric drops by at most max_drop."""
    if format not in FORMATS:
        raise FtcliError(f"unknown export format '{format}'", f"use one of: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FtcliError(f"unknown quantization '{quantize}'", f"use one of: {', '.join(QUANTIZATIONS)}")
    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module, "export", "ftcli export")
    weights = RunDir.open(run_path).weights_stamp()  # before loading: weights changed meanwhile make the export stale
    loaded = load_run(run_path)  # on the CPU, where onnxruntime runs here: compare like with like
    run, config, tokenizer = loaded.run, loaded.config, loaded.tokenizer
    tasks.require_support(config.task, "export", f"predict with PyTorch: ftcli predict {run.path} --text ...")
    prepared = prepare(config.data, tokenizer, config.task)
    split = next(name for name in ("validation", "test", "train") if name in prepared.splits)
    scored = next((name for name in ("validation", "test") if name in prepared.splits), None)
    if quantize and scored is None:
        raise FtcliError("--quantize scores the int8 model on a labeled split, and this run has none", "add data.validation")
    rows = prepared.splits[split].select(range(min(examples + 2, len(prepared.splits[split])))).to_list()
    if len(rows) < 3:
        raise FtcliError(f"the {split} split has {len(rows)} examples; the export check needs at least 3", "add data")

    staging = run.export_dir.with_name(f".{run.export_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with writing(run.export_dir):  # a full disk, also behind the exporter's own error
        try:
            difference = _export_checked(loaded, rows, staging / ONNX_FILE, atol)
            check = None
            if quantize:
                check = quantize_checked(staging / ONNX_FILE, prepared.splits[scored], scored, loaded, max_drop)
            result = ExportResult(run.export_dir, run.export_dir / ONNX_FILE, difference, len(rows) - 2, split, atol, check)
            atomic_write_json(staging / EXPORT_REPORT_FILE, _report(result, staging, weights))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    shutil.rmtree(run.export_dir, ignore_errors=True)
    staging.rename(run.export_dir)
    if check is not None:
        check.file = run.export_dir / INT8_FILE
    return result


def _export_checked(loaded: LoadedRun, rows: list[dict], onnx_file: Path, atol: float) -> float:
    """Write the graph and what serves it beside it; the largest logit difference to PyTorch."""
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    trace_batch = _inputs(collate(rows[:2], tokenizer.pad_token_id))
    check_batch = _inputs(collate(rows[2:], tokenizer.pad_token_id))
    export_onnx(model, trace_batch, onnx_file)
    difference = max_logit_difference(model, onnx_file, check_batch)
    if not difference <= atol:  # `not <=` also catches NaN
        raise FtcliError(
            f"the ONNX model's logits differ from PyTorch's by up to {difference:.3g} (tolerance {atol:g}); "
            "nothing was exported",
            "report it with the model's name: an operator of this architecture exports inexactly",
        )
    model.config.save_pretrained(onnx_file.parent)
    tokenizer.save_pretrained(onnx_file.parent)
    for decided in (THRESHOLDS_FILE, CALIBRATION_FILE):  # the decisions the model is scored with
        if (loaded.weights / decided).is_file():
            shutil.copy2(loaded.weights / decided, onnx_file.parent / decided)
    return difference


def quantize_checked(onnx_file: Path, dataset: Dataset, split: str, loaded: LoadedRun, max_drop: float) -> QuantizeCheck:
    """Quantize the fp32 graph to int8 beside it and score both; the int8 file is deleted unless
    its metric is within max_drop of fp32's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_file = onnx_file.with_name(INT8_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its advice to pre-process the graph first: scored below
        quantize_dynamic(
            onnx_file, int8_file, weight_type=QuantType.QInt8,
            use_external_data_format=onnx_file.with_name(onnx_file.name + ".data").exists(),
        )
    metric = primary_metric(loaded.config.metrics)
    fp32, int8 = (onnx_metric(path, dataset, loaded, metric) for path in (onnx_file, int8_file))
    drop = fp32 - int8 if higher_is_better(metric) else int8 - fp32
    kept = bool(drop <= max_drop)  # NaN is not kept
    sizes = (onnx_file.stat().st_size, int8_file.stat().st_size)
    if not kept:
        int8_file.unlink()
    return QuantizeCheck(metric, split, fp32, int8, float(drop), max_drop, kept, int8_file, *sizes)


def onnx_metric(onnx_file: Path, dataset: Dataset, loaded: LoadedRun, metric: str) -> float:
    """One metric of an ONNX model on a labeled split, scored as ftcli evaluate scores (per
    document for windows)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    config, objective, model_config = loaded.config, loaded.objective, loaded.model.config
    # The label names, as evaluate gives them: token_classification's entity metrics read the tags.
    suite = MetricSuite(config.metrics, [model_config.id2label[index] for index in range(model_config.num_labels)], config.task)
    rows = dataset.to_list()

    def batches():
        for indices in length_sorted_batches(column(dataset, "length"), config.training.eval_batch_size):
            batch = collate([rows[index] for index in indices], loaded.tokenizer.pad_token_id)
            logits = torch.from_numpy(session.run(["logits"], {name: batch[name].numpy() for name in names})[0])
            yield (logits, batch["labels"], batch["doc"]) if "doc" in batch else (logits, batch["labels"])

    return float(score(by_document(batches(), objective), suite, objective)[metric])


def _report(result: ExportResult, staging: Path, weights: dict | None) -> dict:
    """report.json: the parity check, every model file's size, the weights exported, the
    quantization's verdict and every file's stamp (external data and tokenizer files included)."""
    check = result.quantized
    return {
        "format": "onnx",
        "weights": weights,
        "parity": {
            "split": result.split, "examples": result.examples, "max_difference": result.max_difference,
            "atol": result.atol, "passed": True,
        },
        "sizes": {path.name: path.stat().st_size for path in sorted(staging.glob("model*.onnx*"))},
        "quantization": None if check is None else {
            "method": "int8: onnxruntime.quantization.quantize_dynamic, QInt8 weights",
            "metric": check.metric, "split": check.split, "fp32": check.fp32, "int8": check.int8,
            "drop": check.drop, "max_drop": check.max_drop, "kept": check.kept,
            "file": INT8_FILE if check.kept else None, "fp32_bytes": check.fp32_bytes, "int8_bytes": check.int8_bytes,
        },
        "files": file_stamps(staging),
    }


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
