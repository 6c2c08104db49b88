"""The accelerate config files in configs/accelerate/: each loads, and the DDP one trains (two CPU processes, gloo).

FSDP and DeepSpeed need GPUs (on the CPU accelerate falls back to DDP), so only their files are checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "deepspeed-zero2": DistributedType.DEEPSPEED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # unknown keys would raise here
    assert config.distributed_type == EXPECTED[name]
    assert config.mixed_precision == "no"  # ftcli's training.precision decides
    assert config.num_machines == 1 and config.num_processes >= 2


def test_deepspeed_takes_batch_accumulation_and_clipping_from_ftcli():
    deepspeed = load_config_from_file(str(CONFIGS / "deepspeed-zero2.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 2
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(deepspeed)  # left "auto"


def test_fsdp_shards_per_layer_and_saves_whole_weights():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.slow
def test_ddp_config_launches_ftcli_on_two_processes(make_experiment, tmp_path):
    experiment = make_experiment(training={"max_steps": 4, "eval_every": 2, "save_every": 2})
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"), "-m", "ftcli", "train", str(experiment)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},  # gloo, also where there is a GPU
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert (run / "model" / "model.safetensors").is_file()
    train = json.loads((run / "metrics.json").read_text())["train"]
    assert train["global_step"] == 4 and train["train_samples"] == 4 * 8 * 2  # two processes, batch 8 each
