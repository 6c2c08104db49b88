"""training.save_every_minutes: a checkpoint once M minutes of training have passed since the last
one, for machines that may be taken away (spot instances) between two save_every steps.

The decision must not depend on which process asks: every process has to take part in the same
saves, or a collective inside one would wait forever and a resumed run would not find every
process's RNG state. With several processes the main process's clock decides and the decision is
broadcast, every StopSignals.AGREE_EVERY optimizer steps rather than at every step, so that the
host can still run ahead of the GPU in between. Saving changes no training number, so a run that
saved by the clock trains exactly as one that did not.
"""

from __future__ import annotations

import time

import torch
from accelerate import PartialState
from accelerate.utils import broadcast

from ftcli.training.stopping import StopSignals

# The clock the timer reads; tests replace it to make time pass without sleeping.
clock = time.monotonic


class SaveTimer:
    """Whether save_every_minutes has passed since training started or last saved."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else minutes * 60
        self.last_save = clock()

    def restart(self) -> None:
        """A checkpoint was just saved (for any reason): the next one is due M minutes from now."""
        self.last_save = clock()

    def due(self, optimizer_step: int) -> bool:
        """Whether to save at this optimizer step. Every process calls this at every optimizer step."""
        if self.seconds is None:
            return False
        processes = PartialState()
        elapsed = clock() - self.last_save >= self.seconds
        if processes.num_processes == 1:
            return elapsed
        if optimizer_step % StopSignals.AGREE_EVERY:
            return False
        flag = torch.tensor([int(elapsed)], device=processes.device)
        return bool(int(broadcast(flag, from_process=0)))
