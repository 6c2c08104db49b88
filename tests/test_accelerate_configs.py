"""The accelerate config files in configs/accelerate/: each loads; the DDP one trains ftcli on two
CPU processes (gloo) in tests/test_distributed.py, which launches its trainer-backend runs with it.

FSDP and DeepSpeed need GPUs (on the CPU accelerate falls back to DDP), so only their files are checked here.
"""

from __future__ import annotations

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
