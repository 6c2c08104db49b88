"""Several processes: `ftcli train --num-processes N` re-executes itself under `accelerate launch`.

Several machines: the same command on each, with --num-machines, --machine-rank, --main-process-ip
and --main-process-port (or an accelerate config file, --accelerate-config), as accelerate launch
takes them; --num-processes counts the processes of one machine.

`accelerate launch --multi_gpu --num_processes N -m ftcli train CONFIG` works as well; both
backends then train data-parallel, the main process writing the run directory and the others
staying quiet. Without GPUs too: `--multi_gpu` picks the launcher that starts one process per
rank (gloo on the CPU), while `--cpu --num_processes N` starts a single process.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

from ftcli.errors import FtcliError


def is_main_process() -> bool:
    """Whether this is the main process, before any process group exists (launchers set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


# accelerate's own default port for machines to meet on: a free port cannot be agreed between machines.
DEFAULT_MAIN_PROCESS_PORT = 29500


@dataclass(frozen=True)
class Machines:
    """Where the processes run: ftcli train's --accelerate-config and multi-machine options, handed
    to `accelerate launch` as they are. None: not given (the config file's value, or one machine)."""

    config_file: Path | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None

    # ftcli's options that this launch consumes; the relaunched command runs without them.
    OPTIONS: ClassVar[tuple[str, ...]] = ("--num-processes", "--accelerate-config", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port")

    def wanted(self, num_processes: int | None) -> bool:
        """Whether the command must re-run itself under accelerate launch."""
        return (num_processes or 1) > 1 or (self.num_machines or 1) > 1 or self.config_file is not None


def relaunch(num_processes: int | None, argv: list[str], machines: Machines = Machines()) -> NoReturn:
    """Replace this process by `accelerate launch` running the same ftcli command on N processes
    per machine (on each of --num-machines, this one being --machine-rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FtcliError(
            "--num-processes inside a launched run", "leave --num-processes out: the launcher started the processes"
        )
    import torch  # here, not at the top: the relaunching process needs nothing else of it

    if num_processes and torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise FtcliError(
            f"--num-processes {num_processes} but this machine has {torch.cuda.device_count()} GPUs",
            "use at most one process per GPU",
        )
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_options(num_processes, machines)]
    command += ["-m", "ftcli", *_without_options(argv, Machines.OPTIONS)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def launch_options(num_processes: int | None, machines: Machines) -> list[str]:
    """accelerate launch's options. Without a config file: torchrun-style launching, one process per
    rank, on GPUs or without any on the CPU (gloo; `--cpu` would start a single process). With one,
    the file decides what the command line leaves out."""
    if machines.config_file is not None and not machines.config_file.is_file():
        raise FtcliError(f"--accelerate-config {machines.config_file} does not exist", "give an accelerate config file (accelerate config)")
    num_machines = machines.num_machines or _file_machines(machines.config_file)
    if num_machines > 1 and machines.main_process_ip is None and machines.config_file is None:
        raise FtcliError(
            f"--num-machines {num_machines} needs the address of machine rank 0",
            "pass --main-process-ip (and the same --main-process-port) on every machine",
        )
    options = [f"--config_file={machines.config_file}"] if machines.config_file else [
        "--multi_gpu",
        "--mixed_precision=no",  # ftcli sets the precision from the config, which takes precedence
        "--dynamo_backend=no",
    ]
    if num_processes is not None or machines.config_file is None:
        # Per machine here, in all to accelerate.
        options.append(f"--num_processes={(num_processes or 1) * num_machines}")
    given = {
        "num_machines": machines.num_machines if machines.config_file else num_machines,
        "machine_rank": machines.machine_rank,
        "main_process_ip": machines.main_process_ip,
        "main_process_port": machines.main_process_port,
    }
    if machines.config_file is None and machines.main_process_port is None:
        given["main_process_port"] = free_port() if num_machines == 1 else DEFAULT_MAIN_PROCESS_PORT
    return options + [f"--{name}={value}" for name, value in given.items() if value is not None]


def _file_machines(config_file: Path | None) -> int:
    """The machines an accelerate config file names (1 without a file, or when it names none)."""
    if config_file is None:
        return 1
    import yaml

    return int((yaml.safe_load(config_file.read_text()) or {}).get("num_machines", 1))


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in options:
            skip_value = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            kept.append(arg)
    return kept


def free_port() -> int:
    """A port for the processes to meet on, so that two runs on one machine do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
