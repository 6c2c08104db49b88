"""A training run's achieved FLOP/s beside this machine's measured matmul peak (fp32 and bf16), so
that the distance to the limit is a number (MFU: model FLOPs utilization).

    python -m bench.flops                                                          # the peaks alone
    python -m bench.flops configs/mrpc-minilm.yaml --set training.max_steps=20     # train it, then compare
    python -m bench.flops --run runs/mrpc-minilm                                   # a run trained on this machine

The peak: square matmuls on this machine's device (ftcli's: the GPU if there is one), in each dtype
and with the threads training uses, 8192 on a GPU and 2048 on a CPU (256 for bf16 on a CPU without
native bf16, which emulates it hundreds of times slower than fp32); one warm-up, then as many as fit
in --seconds (0.5 by default, at least two), each waited for. FLOP/s = 2 n^3 x matmuls / seconds.
About 2 s on a 2-core CPU, well under one on a GPU.
The run's achieved FLOP/s is metrics.json's (ftcli/training/flops.py: model FLOPs of the padded
tokens fed, over train_seconds, which include the evaluations and checkpoint saves made during
training); MFU is it over the peak of the precision the run computed in (fp16 against bf16's).
A config trains into a temporary output_dir unless --set output_dir=... says where; the load
average is printed before and after, as a shared machine's numbers need it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ftcli.reporting.formatting import format_flops
from ftcli.runtime import native_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _operands(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)  # private: the global RNG, which training draws from, is untouched
    a, b = (torch.rand(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    return a, b, torch.empty(size, size, dtype=dtype, device=device)


def matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """8192 on a GPU, 2048 on a CPU; 256 for bf16 on a CPU without native bf16, which emulates it
    (measured on a 2-core AMD EPYC: 0.4 GFLOP/s at 1024, a 2048 matmul took 116 s)."""
    if device.type == "cuda":
        return 8192
    return 2048 if dtype != torch.bfloat16 or native_bf16(device) else 256


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, size: int | None = None) -> tuple[float, int]:
    """Achieved FLOP/s of square matmuls in `dtype` on `device` (of `size`, else matmul_size's), and
    the size: one warm-up, then matmuls until `seconds` pass (at least two), each waited for."""
    size = size or matmul_size(device, dtype)
    a, b, out = _operands(size, dtype, device)
    torch.matmul(a, b, out=out)  # the warm-up: kernels chosen, memory allocated
    _sync(device)
    count, started, elapsed = 0, time.perf_counter(), 0.0
    while elapsed < seconds or count < 2:
        torch.matmul(a, b, out=out)
        _sync(device)
        count += 1
        elapsed = time.perf_counter() - started
    return 2 * size**3 * count / elapsed, size


def measured_peaks(device: torch.device, seconds: float, size: int | None = None) -> dict[str, tuple[float, int]]:
    return {name: matmul_peak(device, dtype, seconds, size) for name, dtype in DTYPES.items()}


def train_config(path: str, overrides: list[str], workdir: Path) -> Path:
    """Train the config (shortened by its overrides) as `ftcli train` does; its run directory."""
    from ftcli.commands.train import train_run
    from ftcli.config import load_config

    config = load_config(path, [f"output_dir={workdir}", *overrides])
    return train_run(config).result.run.path


def run_row(run: Path, peaks: dict[str, tuple[float, int]]) -> list[str]:
    """A run's cells: precision, model FLOPs, train seconds, achieved FLOP/s and MFU against its precision's peak."""
    train = json.loads((run / "metrics.json").read_text())["train"]
    precision = json.loads((run / "env.json").read_text()).get("precision", "fp32")
    if "achieved_flops_per_second" not in train:
        raise SystemExit(f"{run}/metrics.json has no achieved_flops_per_second: trained before ftcli counted model FLOPs")
    peak = peaks["fp32" if precision == "fp32" else "bf16"][0]
    achieved = train["achieved_flops_per_second"]
    return [
        run.name, precision, format_flops(train["model_flops"]), f"{train['train_seconds']:.1f}",
        f"{format_flops(achieved)}/s", f"{achieved / peak:.1%} of {precision if precision == 'fp32' else 'bf16'}",
    ]


def render(device: torch.device, peaks: dict[str, tuple[float, int]], rows: list[list[str]], loads: list[str]) -> str:
    lines = [
        f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; load average {' -> '.join(loads)}",
        "",
        "| matmul peak | fp32 | bf16 |",
        "|---|---|---|",
        "| FLOP/s | " + " | ".join(f"{format_flops(peaks[name][0])}/s (n={peaks[name][1]})" for name in DTYPES) + " |",
    ]
    if rows:
        lines += ["", "| run | precision | model FLOPs | train s | achieved | MFU |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="an experiment YAML to train (shortened with --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as ftcli train --set")
    parser.add_argument("--run", action="append", default=[], help="a run directory trained on this machine (repeatable)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed matmuls per dtype")
    parser.add_argument("--size", type=int, help="the matmuls' size (default: matmul_size's)")
    parser.add_argument("--out", help="write the table here too")
    args = parser.parse_args(argv)
    loads = [_load()]
    runs = [Path(run) for run in args.run]
    with tempfile.TemporaryDirectory(prefix="bench-flops-") as workdir:
        if args.config:
            runs.append(train_config(args.config, args.overrides, Path(workdir) / "runs"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where ftcli trains (Runtime.resolve)
        peaks = measured_peaks(device, args.seconds, args.size)
        rows = [run_row(run, peaks) for run in runs]
    loads.append(_load())
    table = render(device, peaks, rows, loads)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
