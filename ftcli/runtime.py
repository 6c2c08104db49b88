"""Where a command computes: the device, the precision and the processes, resolved once per command
and handed down, so that every layer agrees on them."""

from __future__ import annotations

import json
import platform
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ftcli.fileio import atomic_write_json, cache_home

PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    process_index: int = 0
    num_processes: int = 1
    precision_reason: str = ""  # why auto chose what it chose (env.json)

    @classmethod
    def resolve(cls, precision: str = "auto", distributed: bool = False) -> Runtime:
        """The best device, `precision` (training.precision) as it computes there, and with
        `distributed` the processes of a launch (Accelerate's PartialState, set up here)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype, reason = resolve_precision(precision, device)
        if not distributed:
            return cls(device, dtype, precision_reason=reason)
        from accelerate import PartialState

        processes = PartialState(cpu=device.type == "cpu")
        return cls(device, dtype, processes.process_index, processes.num_processes, reason)

    @property
    def precision(self) -> str:
        """What the run computes in: bf16, fp16 or fp32."""
        return PRECISION_NAMES[self.autocast_dtype]

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def autocast(self, cache: bool = True) -> AbstractContextManager:
        """The run's precision. cache=False for a forward captured as a CUDA graph: the cache would
        keep casts made during capture (the arithmetic is the same either way)."""
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None, cache_enabled=cache
        )

    def attention_kernels(self) -> AbstractContextManager:
        return attention_kernels(self.device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32."""
    return resolve_precision(precision, device)[0]


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for a precision setting (None: plain fp32) and, for auto, why. auto is
    bf16 on a GPU that supports it, and on a CPU that computes bf16 natively where it also measured
    faster enough to pay for the lost precision; fp16 runs in fp32 on the CPU, so a GPU config
    still runs there."""
    if precision == "auto":
        if not native_bf16(device):
            return None, f"auto: fp32, this {device.type} has no native bf16"
        if device.type == "cuda":
            return torch.bfloat16, "auto: bf16, native on this GPU"
        gain = cpu_bf16_gain()
        verdict = "bf16" if gain >= BF16_MIN_GAIN else "fp32"
        return (torch.bfloat16 if verdict == "bf16" else None), (
            f"auto: {verdict}, a training step measured {gain:.2f}x as fast in bf16 as in fp32 on this CPU "
            f"(bf16 from {BF16_MIN_GAIN}x)"
        )
    if precision == "fp16" and device.type != "cuda":
        return None, ""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision), ""


# bf16 on a CPU costs precision (probabilities off by ~1e-4): worth it only when it saves real time.
# Hosts with the same flags differ: a MiniLM step measured 1.75x on one, 1.1x on another.
BF16_MIN_GAIN = 1.3
PRECISION_CACHE = "cpu_precision.json"


def cpu_bf16_gain() -> float:
    """How much faster a transformer layer's training step runs under bf16 autocast than in fp32
    on this CPU: measured once per CPU model, torch version and thread count, then cached."""
    key = f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_home() / PRECISION_CACHE
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError):
        measured = {}
    if key not in measured:
        measured[key] = round(measure_bf16_gain(), 3)
        try:
            atomic_write_json(path, measured)  # two processes measuring at once never leave half a file
        except OSError:
            pass  # a read-only home measures again next time
    return float(measured[key])


def measure_bf16_gain(repeats: int = 9) -> float:
    """The median over `repeats` of fp32 time / bf16 time of one training step (forward and
    backward) of a one-layer MiniLM-shaped BERT classifier (hidden 384, 12 heads, batch 8 x 64
    tokens), under a second on 2 cores. The two precisions take turns, so that a load that comes
    and goes slows both alike. BERT's own layer, not torch's TransformerEncoderLayer: on a host where
    the MiniLM demo trained 1.52x as fast in bf16, torch's layer measured 1.25-1.34x, BERT's 1.40-1.47x."""
    from transformers import BertConfig, BertForSequenceClassification

    shape = BertConfig(
        vocab_size=1024, hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=1536, num_labels=1
    )
    with torch.random.fork_rng(devices=[]):  # the global RNG, which runs draw from, stays untouched
        torch.manual_seed(0)
        model = BertForSequenceClassification(shape).train()
        tokens = torch.randint(0, shape.vocab_size, (8, 64))

    def seconds(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=tokens).logits.float().sum().backward()  # dropout draws, on a forked RNG
        return time.perf_counter() - start

    seconds(False), seconds(True)  # warm-up: first calls pick kernels and allocate
    ratios = sorted(seconds(False) / seconds(True) for _ in range(repeats))
    return ratios[len(ratios) // 2]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """A GPU that supports bf16, or a CPU with AVX-512 BF16 or AMX instructions. Other CPUs emulate
    bf16 more slowly than they compute fp32. On a Zen 4 CPU (2 cores, MiniLM, measured) bf16
    training steps were 1.75x as fast as fp32 and evaluation 2.8x."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def attention_kernels(device: torch.device) -> AbstractContextManager:
    """On CUDA, PyTorch's own attention kernels rather than cuDNN's: cuDNN builds an execution plan
    for every new input shape, up to 0.4 s each on an H200, and evaluation and dynamic padding bring
    dozens of shapes (measured: a final evaluation of 408 pairs took 5.0 s instead of 0.1 s).
    PyTorch's kernels run a graphed training step as fast."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def first_cause(error: BaseException) -> str:
    """The first line of the error that started a chain: a failed CUDA graph capture raises again on
    leaving the capture, and that second error says less."""
    while error.__context__ is not None:
        error = error.__context__
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def end_failed_capture(device: torch.device) -> None:
    """A CUDA graph capture that CUDA invalidated ends without telling PyTorch's CUDA generator,
    which then refuses to draw dropout masks outside a capture ("Offset increment outside graph
    capture", seen on an H200). A capture that ends normally tells it."""
    scratch = torch.zeros(1, device=device)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        scratch.add_(1)


def reset_peak_memory(device: torch.device) -> None:
    """Count peak GPU memory (peak_memory) from here: a run's own, not an earlier one's in this process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int]:
    """metrics.json's train keys for the most GPU memory held since reset_peak_memory: by tensors
    (peak_gpu_memory_bytes, what the model, its activations and the optimizer needed) and by PyTorch's
    caching allocator (peak_gpu_memory_reserved_bytes, nearer what nvidia-smi shows). On a CPU no keys:
    a process's resident memory is no training's own (tokenizing, libraries), so none is reported."""
    if device.type != "cuda":
        return {}
    return {
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device),
        "peak_gpu_memory_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }
