"""ftcli train's launch options, as handed to `accelerate launch` (the launches themselves are in
tests/test_distributed.py)."""

from __future__ import annotations

import pytest

from ftcli.errors import FtcliError
from ftcli.launch import DEFAULT_MAIN_PROCESS_PORT, Machines, _without_options, launch_options


def test_several_machines_pass_through_and_processes_count_per_machine():
    machines = Machines(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=1234)
    options = launch_options(4, machines)
    assert options[0] == "--multi_gpu" and "--mixed_precision=no" in options
    assert {"--num_processes=8", "--num_machines=2", "--machine_rank=1", "--main_process_ip=10.0.0.1", "--main_process_port=1234"} <= set(options)
    assert f"--main_process_port={DEFAULT_MAIN_PROCESS_PORT}" in launch_options(1, Machines(num_machines=2, main_process_ip="h"))
    with pytest.raises(FtcliError, match="--main-process-ip"):
        launch_options(1, Machines(num_machines=2))


def test_an_accelerate_config_file_decides_what_the_command_line_leaves_out(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 16\n")
    assert launch_options(None, Machines(config_file=config)) == [f"--config_file={config}"]
    assert launch_options(8, Machines(config_file=config, machine_rank=1)) == [
        f"--config_file={config}", "--num_processes=16", "--machine_rank=1"
    ]
    assert Machines(config_file=config).wanted(None) and not Machines().wanted(1) and Machines().wanted(2)
    with pytest.raises(FtcliError, match="does not exist"):
        launch_options(None, Machines(config_file=tmp_path / "missing.yaml"))


def test_the_relaunched_command_runs_without_the_launch_options():
    argv = ["train", "x.yaml", "--num-processes", "2", "--machine-rank=1", "--main-process-ip", "h", "--set", "a=b"]
    assert _without_options(argv, Machines.OPTIONS) == ["train", "x.yaml", "--set", "a=b"]
