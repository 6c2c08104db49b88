"""Why training stops before its last step: a signal (Ctrl-C, a scheduler's SIGTERM) or a loss
that became nan or inf. Both backends ask these at the same points, and both save or refuse to
save the same way."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce

from ftcli.errors import FtcliError, TrainingInterrupted
from ftcli.runs.rundir import RunDir


class StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the backend to
    save a checkpoint at the next optimizer step (with several processes, within AGREE_EVERY
    steps) and stop, rather than lose the steps since the last one. A second signal gets the
    previous handler: Ctrl-C twice still aborts at once."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self._previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _handle(self, number: int, frame) -> None:
        self.signal_number = number
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    # With several processes, optimizer steps between two agreements on a signal.
    AGREE_EVERY = 16

    def requested(self, optimizer_step: int) -> int:
        """The signal that asked to stop at this optimizer step, or 0. With several processes all
        must stop at the same step, and a signal may reach some of them only: they agree (a small
        all-reduce that waits for the GPU) every AGREE_EVERY steps, not at every step, so that the
        host can run ahead of the GPU in between."""
        processes = PartialState()
        if processes.num_processes == 1:
            return self.signal_number
        if optimizer_step % self.AGREE_EVERY:
            return 0
        flag = torch.tensor([self.signal_number], device=processes.device)
        self.signal_number = int(reduce(flag, "max"))
        return self.signal_number

    def interrupted(self, run: RunDir, optimizer_step: int) -> TrainingInterrupted:
        saved = run.checkpoint_dir(optimizer_step).name
        return TrainingInterrupted(
            f"interrupted at step {optimizer_step}: {saved} saved; continue with ftcli train {run.path} --resume",
            self.signal_number,
        )


class LossWatch:
    """The first optimizer step whose training loss was nan or inf, remembered on the device: a
    host sync every step would slow training, so the backends ask `check` only before they log,
    evaluate or save (a diverged model must not overwrite the last good checkpoint)."""

    NONE = torch.iinfo(torch.long).max

    def __init__(self, device: torch.device) -> None:
        self.first_bad_step = torch.full((1,), self.NONE, dtype=torch.long, device=device)
        self.first_bad_loss = torch.zeros((1,), device=device)

    def observe(self, loss: torch.Tensor, optimizer_step: int) -> None:
        """Record `loss`, of a micro-batch of `optimizer_step` (counted from 1)."""
        loss = loss.detach().float().reshape(1)
        first = ~torch.isfinite(loss) & (self.first_bad_step == self.NONE)
        self.first_bad_loss = torch.where(first, loss, self.first_bad_loss)
        self.first_bad_step = torch.where(first, optimizer_step, self.first_bad_step)

    def check(self, accelerator: Accelerator, run: RunDir, settle_saves: Callable[[], None] | None = None) -> None:
        """Raise if any process saw a bad loss. Every process calls this at the same step.
        settle_saves: finishes checkpoints still being written, so the error names the last one."""
        steps, losses = accelerator.gather((self.first_bad_step, self.first_bad_loss))
        first = int(steps.argmin())
        if int(steps[first]) == self.NONE:
            return
        if settle_saves is not None:
            settle_saves()
        checkpoints = run.list_checkpoints()
        last_good = f"the last good checkpoint is {checkpoints[-1].name}" if checkpoints else "no checkpoint was saved"
        raise FtcliError(
            f"loss became {float(losses[first])} at step {int(steps[first])}; {last_good}",
            "lower training.learning_rate, keep training.max_grad_norm set, or train in training.precision=fp32",
        )
