"""The benchmarks run end to end at a tiny size, so that a GPU run later finds them working."""

from __future__ import annotations

import re

import pytest

from bench import memory


@pytest.mark.slow  # three processes (the benchmark's rows each run in a fresh one): about 50 s on 2 cores
def test_memory_benchmark_runs_tiny_on_the_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "memory.md"
    table = memory.main(["--tiny", "--out", str(out), "--gradient-checkpointing", "on"])
    assert out.read_text() == table
    rows = {line.split(" | ")[0]: line.split(" | ") for line in table.splitlines() if line.startswith("| (")}
    assert list(rows) == ["| (a) hf-trainer + peft", "| (b) ftcli"]
    for cells in rows.values():
        assert float(cells[1]) > 0 and float(cells[2]) > 0  # peak memory GiB and mean step ms, measured
        assert "gradient checkpointing True" in cells[5]
    assert re.match(r"\d+\.\d\dx \((met|missed): target <= 1\.00x\)", rows["| (b) ftcli"][3])
    assert "batch 8 x 256 tokens" in table and "4-bit rows skipped" in table


def test_memory_table_compares_each_ftcli_row_with_hf_in_the_same_precision():
    rows = {
        "hf": memory.Row(memory.ROWS["hf"], peak_bytes=4 * 2**30, step_seconds=0.2),
        "ftcli": memory.Row(memory.ROWS["ftcli"], peak_bytes=3 * 2**30, step_seconds=0.12, notes={"steps": "cuda_graphs"}),
        "hf-4bit": memory.Row(memory.ROWS["hf-4bit"], failed="exit code 1"),
        "ftcli-4bit": memory.Row(memory.ROWS["ftcli-4bit"], peak_bytes=2**30, step_seconds=0.3),
    }
    lines = memory.render(rows, "### header", "cuda", []).splitlines()
    assert "peak GPU memory GiB" in lines[2]
    assert lines[5] == "| (b) ftcli | 3.000 | 120.0 | 0.75x (met: target <= 1.00x) | 0.60x (missed: target <= 0.50x) | steps cuda_graphs |"
    assert lines[6].endswith("failed: exit code 1 |")
    assert lines[7].split(" | ")[3:5] == ["-", "-"]  # its HF row failed: nothing to compare with


@pytest.mark.parametrize(("device", "setting", "on"), [("cuda", "default", True), ("cpu", "default", False), ("cuda", "off", False)])
def test_memory_rows_resolve_ftcli_default_checkpointing_as_ftcli_does(tmp_path, device, setting, on):
    """ftcli's default is auto (on for a decoder on CUDA): the HF rows must not read the word 'auto' as on."""
    from argparse import Namespace

    model_dir = memory.make_model_dir(tmp_path / "model", True, memory.random_texts(64, 20))
    args = Namespace(row="hf", work=tmp_path, model_dir=model_dir, length=256, steps=3, batch_size=8, device=device,
                     gradient_checkpointing=setting)
    assert memory.gradient_checkpointing(args, quantize=False) is on


def test_startup_stamps_the_first_line_and_the_first_logged_step(tmp_path):
    """bench.startup reads a process's output as it comes: the first line's moment, then the first
    training step's (ftcli's `step 1/N` or HF Trainer's progress bar past 0), not the header's."""
    import sys

    from bench import startup

    script = (
        "import sys, time\n"
        "print('run tiny  backend loop  on cpu in fp32'); time.sleep(0.4)\n"
        "sys.stderr.write('train:   0%|     | 0/3 [00:00<?]\\r'); sys.stderr.flush(); time.sleep(0.4)\n"
        "print('step 1/3  epoch 0.33  loss 0.69'); time.sleep(0.2)\n"
    )
    moments = startup.run_once([sys.executable, "-c", script], {})
    # 0.8 s of sleeps lie between the header and the step line: the bar at 0/3 (0.4 s) is no step.
    assert 0 < moments["first_line"] < moments["first_line"] + 0.7 < moments["first_step"] < moments["total"]
    assert startup.STEP.search(" 33%|███▎      | 1/3 [00:01<00:02]") and not startup.STEP.search("  0%|          | 0/3 [")
    with pytest.raises(SystemExit, match="failed"):
        startup.run_once([sys.executable, "-c", "raise SystemExit(3)"], {})
