"""Several processes: `ftcli train --num-processes N` re-executes itself under `accelerate launch`.

`accelerate launch --multi_gpu --num_processes N -m ftcli train CONFIG` works as well; both
backends then train data-parallel, the main process writing the run directory and the others
staying quiet. Without GPUs too: `--multi_gpu` picks the launcher that starts one process per
rank (gloo on the CPU), while `--cpu --num_processes N` starts a single process.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NoReturn

import torch

from ftcli.errors import FtcliError


def is_main_process() -> bool:
    """Whether this is the main process, before any process group exists (launchers set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(num_processes: int, argv: list[str]) -> NoReturn:
    """Replace this process by `accelerate launch` running the same ftcli command on N processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FtcliError(
            "--num-processes inside a launched run", "leave --num-processes out: the launcher started the processes"
        )
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise FtcliError(
            f"--num-processes {num_processes} but this machine has {torch.cuda.device_count()} GPUs",
            "use at most one process per GPU",
        )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # torchrun-style launching, one process per rank: on GPUs, or without any on the CPU (gloo).
        # `--cpu` would start a single process.
        "--multi_gpu",
        f"--num_processes={num_processes}",
        "--num_machines=1",
        "--mixed_precision=no",  # ftcli sets the precision from the config, which takes precedence
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        "-m",
        "ftcli",
        *_without_option(argv, "--num-processes"),
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def _without_option(argv: list[str], option: str) -> list[str]:
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == option:
            skip_value = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def free_port() -> int:
    """A port for the processes to meet on, so that two runs on one machine do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
