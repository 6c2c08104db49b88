"""The Runtime: the device, the precision as it computes there, and the processes, resolved once."""

from __future__ import annotations

import pytest
import torch

from ftcli import runtime
from ftcli.runtime import Runtime

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    def set_to(value: bool) -> None:
        monkeypatch.setattr(runtime, "native_bf16", lambda device: value)
        monkeypatch.setattr(runtime, "cpu_bf16_gain", lambda: 1.6)  # measured faster: see test_precision

    return set_to


def test_resolve_picks_the_cpu_here_with_one_process():
    resolved = Runtime.resolve("fp32")
    assert resolved.device == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    assert (resolved.process_index, resolved.num_processes, resolved.is_main) == (0, 1, True)
    launched = Runtime.resolve("fp32", distributed=True)  # no launcher: one process of its own
    assert (launched.process_index, launched.num_processes, launched.is_main) == (0, 1, True)


@pytest.mark.parametrize(
    ("setting", "native", "expected"),
    [("auto", True, "bf16"), ("auto", False, "fp32"), ("bf16", False, "bf16"), ("fp32", True, "fp32"), ("fp16", True, "fp32")],
)
def test_precision_as_the_cpu_computes_it(monkeypatch, native_bf16, setting, expected, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    native_bf16(native)
    resolved = Runtime.resolve(setting)
    assert resolved.precision == expected
    assert resolved.autocast_dtype == {"bf16": torch.bfloat16, "fp32": None}[expected]


def test_autocast_computes_in_the_resolved_dtype_and_fp32_stays_fp32():
    layer = torch.nn.Linear(4, 2)
    inputs = torch.randn(3, 4)
    with Runtime(CPU, torch.bfloat16).autocast():
        assert layer(inputs).dtype == torch.bfloat16
    with Runtime(CPU, None).autocast():
        assert layer(inputs).dtype == torch.float32


def test_a_later_process_is_not_the_main_one():
    assert not Runtime(CPU, None, process_index=1, num_processes=2).is_main
    with Runtime(CPU, None).attention_kernels():  # nothing to choose on the CPU
        pass


def test_peak_gpu_memory_is_counted_from_the_reset_on_cuda_and_absent_on_the_cpu(monkeypatch):
    # A fake allocator: the reset sets the peak back to what is held now, as PyTorch's does.
    allocator = {"held": 5 * 2**20, "peak": 9 * 2**30}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(peak=allocator["held"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: allocator["peak"] + 2**20)
    cuda = torch.device("cuda")
    runtime.reset_peak_memory(cuda)
    assert runtime.peak_memory(cuda) == {"peak_gpu_memory_bytes": 5 * 2**20, "peak_gpu_memory_reserved_bytes": 6 * 2**20}
    allocator["peak"] = 7 * 2**30
    runtime.reset_peak_memory(CPU)  # a CPU run touches no GPU counter, and reports none
    assert allocator["peak"] == 7 * 2**30 and runtime.peak_memory(CPU) == {}
