"""What computes a padded batch's logits for the server: the run's PyTorch model, or its ONNX
export through onnxruntime. Both take int64 token tensors (input_ids, attention_mask and, where
the model has them, token_type_ids) and give fp32 logits on the host, so the batcher and the
routes never know which one runs. On a GPU, serving/graphs.py replays the torch engine's forward
pass as CUDA graphs.

The ONNX modules are imported only where an ONNX engine is made, so that the torch engine (and the
graphed one) needs only torch and transformers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from ftcli.errors import FtcliError
from ftcli.extras import require
from ftcli.runs.rundir import INT8_FILE, ONNX_FILE, RunDir
from ftcli.runtime import Runtime

ENGINES = ("torch", "onnx")


class Engine(Protocol):
    name: str
    device: torch.device
    file: str  # what it computes with: model/ or an ONNX file
    cuda_graphs: bool  # whether its forward passes replay CUDA graphs (/v1/info)

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """fp32 logits of one padded batch, one row per example, on the host."""


def cpu_threads(workers: int) -> int:
    """Threads of each server process's engine: the cores divided among the worker processes, so
    that processes do not oversubscribe the cores (the batcher runs one forward pass at a time
    per process, and a batch's matrix products are what use the threads)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class TorchEngine:
    """The run's model in inference mode, in the run's precision (bf16 autocast on a GPU and on
    CPUs that compute bf16 natively)."""

    name = "torch"
    cuda_graphs = False

    def __init__(self, model: PreTrainedModel, runtime: Runtime, file: str, threads: int) -> None:
        if runtime.device.type == "cpu":
            torch.set_num_threads(threads)
        self.runtime, self.device, self.file = runtime, runtime.device, file
        self.model = model.to(runtime.device).eval()

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        inputs = {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}
        return self.forward(inputs).cpu().numpy()

    def forward(self, inputs: dict[str, torch.Tensor], cache: bool = True) -> torch.Tensor:
        """fp32 logits on the device of token tensors already there (cache: the autocast cache,
        off in a captured forward)."""
        with torch.inference_mode(), self.runtime.attention_kernels(), self.runtime.autocast(cache):
            return self.model(**inputs).logits.float()


class OnnxEngine:
    """An ONNX export on onnxruntime: CUDA where onnxruntime-gpu and a GPU are there, else the CPU."""

    name = "onnx"
    cuda_graphs = False

    def __init__(self, onnx_file: Path, threads: int) -> None:
        from ftcli.onnx_predict import open_session

        require("onnxruntime", "export", "ftcli serve --engine onnx")
        self.session = open_session(onnx_file, threads, cuda=torch.cuda.is_available())
        self.inputs = [node.name for node in self.session.get_inputs()]
        self.device = torch.device("cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")
        self.file = str(onnx_file)

    def logits(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        feed = {name: batch[name].numpy() for name in self.inputs}
        return np.asarray(self.session.run(["logits"], feed)[0], dtype=np.float32)


def onnx_file_of(run: RunDir, quantized: bool) -> Path:
    """The export to serve; missing, stale or damaged, a user error that says which export command
    writes it. The whole file is hashed: once per start, beside seconds of loading the run."""
    from ftcli.onnx_predict import check_export_files, stale_export

    path = run.export_dir / (INT8_FILE if quantized else ONNX_FILE)
    if not path.is_file():
        command = f"ftcli export {run.path} --format onnx" + (" --quantize int8" if quantized else "")
        reason = " (an int8 model is kept only when its metric holds; see export/report.json)" if quantized else ""
        raise FtcliError(f"{path} does not exist{reason}", f"run `{command}` first, or serve with --engine torch")
    stale = stale_export(run)
    if stale is not None:
        raise stale
    check_export_files(run, path.name, whole=True, others=False)  # the tokenizer is model/'s
    return path
