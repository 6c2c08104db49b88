"""The loop backend's checkpoints: written in the background while training goes on, and read back.

The layout, publishing, manifests and pruning are shared with the trainer backend
(ftcli.runs.checkpoints); what is the loop's own is the writer thread, its page-locked host
memory, and the state it saves (LoopState as training_state.json).
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.serialization
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from ftcli.data.batching import round_up
from ftcli.errors import FtcliError
from ftcli.fileio import atomic_write_json, damaged_file, tree_bytes
from ftcli.runs.checkpoints import (
    LOOP_STATE_FILE,
    clear_staging,
    disk_full_is_a_user_error,
    refuse_without_room,
    load_torch_file,
    load_weights,
    resume_hint,
    prune,
    publish,
    rng_state,
    set_rng_state,
    staging_dir,
)
from ftcli.runs.rundir import RunDir


class CheckpointWriter:
    """Saves the loop backend's checkpoints while training goes on.

    A save takes a snapshot of the weights, the optimizer and the schedule into host memory (on a
    GPU an asynchronous copy into pinned memory, ordered on the stream before the next step can
    change them), and a background thread writes it out, then hashes, fsyncs, publishes and
    prunes: bert-base with its AdamW moments is 1.3 GB, seconds that would otherwise stop
    training. The next save waits only until the snapshot is written out of host memory, not for
    the fsync (1.6 s of 3.6 s on the H200 host, measured), so one checkpoint reaches the disk
    while the next is written. Checkpoints are published in the order they were saved. A failed
    save's error (a full disk) is raised by the next `save` or by `close`.
    """

    def __init__(self, run: RunDir, accelerator: Accelerator, keep: int) -> None:
        self.run, self.accelerator, self.keep = run, accelerator, keep
        self._saves: dict[Path, threading.Thread] = {}  # oldest first; each waits for the one before to publish
        self._snapshot_written = threading.Event()
        self._snapshot_written.set()
        self._errors: list[tuple[Path, BaseException]] = []
        self.newest: Path | None = None  # the last checkpoint saved (or still being written)
        self._written_bytes: int | None = None  # its size, known once written, perhaps before it is published
        self._host: dict[str, HostBuffers] = {}  # by part of the state: see _host_for

    def reserve(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> None:
        """Allocate the host memory of the snapshots now, before training, rather than with training
        stopped at the first save; pinning on a side thread slowed the training steps beside it
        more than it costs here (measured)."""
        if self.accelerator.is_main_process:
            for part, value in self._state(model, optimizer, scheduler).items():
                self._host_for(part).allocate(value)

    def _host_for(self, part: str) -> HostBuffers:
        """Each part of the state (weights, optimizer, schedule, scaler) has host memory of its own:
        torch.save writes the whole storage of a tensor it is given, so with one block for all of
        them, views of it carried every part into each file (optimizer.pt held the weights too:
        260 MiB for MiniLM, whose AdamW moments take 173 MiB: measured on a GPU)."""
        return self._host.setdefault(part, HostBuffers())

    def _state(self, model, optimizer, scheduler) -> dict[str, Any]:
        return {
            "model": self.accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
        }

    def save(
        self,
        final: Path,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: dict[str, Any],
        best: str | None,
    ) -> None:
        """Start saving a resumable checkpoint. Every process calls this: each writes its own RNG
        states at once, the main one hands the weights and optimizer (the same on all) to its thread."""
        self._snapshot_written.wait()
        if self._errors:
            self.wait()  # raises, once every checkpoint before it is published
        accelerator = self.accelerator
        with disk_full_is_a_user_error(self.run, final, self._state_bytes):
            try:
                refuse_without_room(self.run, final, accelerator, self._written_bytes)
                staging = staging_dir(final)
                if accelerator.is_main_process:
                    shutil.rmtree(staging, ignore_errors=True)
                    staging.mkdir(parents=True)
                accelerator.wait_for_everyone()
                torch.save(rng_state(), staging / f"rng_state_{accelerator.process_index}.pt")
                accelerator.wait_for_everyone()  # every RNG file is written before the main process publishes
            except BaseException:
                self._join()  # the error names the intact checkpoints: those in flight are published first
                raise
        self.newest = final
        if not accelerator.is_main_process:
            return
        state_now = self._state(model, optimizer, scheduler)
        snapshot = {part: self._host_for(part).copy(value) for part, value in state_now.items()}
        copied = torch.cuda.Event() if torch.cuda.is_available() else None
        if copied is not None:
            copied.record()
        self._snapshot_written.clear()
        previous = next(reversed(self._saves.values()), None)
        self._saves[final] = threading.Thread(
            target=self._write,
            args=(staging, final, accelerator.unwrap_model(model), tokenizer, snapshot, copied, dict(state), best, previous),
            name=f"ftcli-save-{final.name}",
        )
        self._saves[final].start()

    def _write(self, staging, final, model, tokenizer, snapshot, copied, state, best, previous) -> None:
        try:
            try:
                if copied is not None:
                    copied.synchronize()
                model.save_pretrained(staging, state_dict=snapshot["model"])
                tokenizer.save_pretrained(staging)
                save_without_crc(snapshot["optimizer"], staging / "optimizer.pt")
                save_without_crc(snapshot["scheduler"], staging / "scheduler.pt")
                if snapshot["scaler"] is not None:
                    save_without_crc(snapshot["scaler"], staging / "scaler.pt")
                atomic_write_json(staging / LOOP_STATE_FILE, state)
                self._written_bytes = tree_bytes(staging)
            finally:
                self._snapshot_written.set()  # the next save may snapshot into the host memory
                if previous is not None:
                    previous.join()  # published in the order saved
            publish(staging, final)
            prune(self.run, self.keep, best)
        except BaseException as error:  # raised on the training thread by wait()
            self._errors.append((final, error))

    def wait(self) -> None:
        """Block until every save in flight is published; raise what went wrong with the first that failed."""
        self._join()
        self._raise_error()

    def _join(self) -> None:
        if self._saves:
            next(reversed(self._saves.values())).join()  # which waited for each before it
            self._saves.clear()

    def wait_for(self, final: Path) -> None:
        """Block until the checkpoint `final` is published, on every process (to read it back)."""
        if final in self._saves:
            self._saves[final].join()
        self.accelerator.wait_for_everyone()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._errors:
            self._join()  # a save started while this one failed may still be writing
            (final, error), *_ = self._errors
            self._errors.clear()
            try:
                with disk_full_is_a_user_error(self.run, final, self._state_bytes):
                    raise error
            finally:
                clear_staging(self.run)  # that save's half-written folder too: nothing is in flight

    def _state_bytes(self) -> int | None:
        """About what a checkpoint takes on disk: the snapshot's bytes (weights, optimizer, schedule)."""
        return sum(host.nbytes for host in self._host.values()) or None

    def close(self) -> None:
        """Wait for the last save; afterwards every process finds every checkpoint published."""
        self.wait()
        for host in self._host.values():
            host.release()
        if self.accelerator.is_main_process:
            clear_staging(self.run)
        self.accelerator.wait_for_everyone()


def save_without_crc(value: Any, path: Path) -> None:
    """torch.save less the zip format's CRC32 of every record: 0.4 s of the 0.9-1.0 s that writing
    bert-base's 880 MB AdamW state took (measured on the H200 host). The manifest's digests check
    the file instead, and torch.load reads it as before."""
    with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        torch.save(value, path)


class HostBuffers:
    """Host memory for snapshots of a (nested) state dict, reused by every save of the same
    structure. GPU tensors are copied into page-locked memory without waiting (the copy is ordered
    on the stream before later steps); tensors that share storage (tied weights) stay shared, so
    save_pretrained still recognises them.

    The memory is one block, page-locked with cudaHostRegister: 0.15 s for bert-base with AdamW
    (1.3 GB) on the H200 host, where pinned allocations tensor by tensor took 1.3 s (measured)."""

    ALIGNMENT = 64  # bytes: every dtype's view of the block starts aligned

    def __init__(self) -> None:
        self._layout: list[tuple] | None = None
        self._buffers: list[torch.Tensor] = []
        self._block: torch.Tensor | None = None
        self._unregister: weakref.finalize | None = None

    def allocate(self, state: Any) -> None:
        self.release()
        tensors = _unique_tensors(state)
        sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
        starts = [0, *itertools.accumulate(round_up(size, self.ALIGNMENT) for size in sizes)]
        # Zeroed, which faults the pages in now rather than in the first save's copy with training
        # stopped (on the CPU: a 57 MB model's first copy took 120 ms, the next ones 15, measured);
        # page-locking then only locks them.
        self._block = torch.zeros(starts[-1], dtype=torch.uint8)
        if any(tensor.is_cuda for tensor in tensors):
            self._page_lock(self._block)
        self._buffers = [
            self._block[start : start + size].view(tensor.dtype).view(tensor.shape)
            for tensor, start, size in zip(tensors, starts, sizes)
        ]
        self._layout = [_shape(tensor) for tensor in tensors]

    def _page_lock(self, block: torch.Tensor) -> None:
        """Without it the copies still work, but wait for the GPU and run at pageable speed."""
        cudart = torch.cuda.cudart()
        if cudart.cudaHostRegister(block.data_ptr(), block.numel(), 0) == cudart.cudaError.success:
            # Unlocked before the memory is freed, also when the writer is dropped without release().
            self._unregister = weakref.finalize(self, cudart.cudaHostUnregister, block.data_ptr())

    @property
    def nbytes(self) -> int:
        return 0 if self._block is None else self._block.numel()

    def release(self) -> None:
        """Give the memory back (no snapshot of it may still be in use)."""
        if self._unregister is not None:
            self._unregister()
        self._layout, self._buffers, self._block, self._unregister = None, [], None, None

    def copy(self, state: Any) -> Any:
        """A copy of `state` with every tensor in host memory."""
        tensors = _unique_tensors(state)
        # Compared by shape, not address: a schedule with a tensor learning rate makes new small
        # tensors at every step, and re-pinning 1.3 GB for them cost the first save 1.5 s (measured).
        if [_shape(tensor) for tensor in tensors] != self._layout:
            self.allocate(state)
        for buffer, tensor in zip(self._buffers, tensors):
            buffer.copy_(tensor.detach(), non_blocking=True)
        copies = {_identity(tensor): buffer for tensor, buffer in zip(tensors, self._buffers)}
        return _map_tensors(state, lambda tensor: copies[_identity(tensor)])


def _shape(tensor: torch.Tensor) -> tuple:
    return (tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device)


def _identity(tensor: torch.Tensor) -> tuple:
    """Tensors with the same identity are one tensor (tied weights): they share one snapshot."""
    return (tensor.data_ptr(), *_shape(tensor))


def _unique_tensors(state: Any) -> list[torch.Tensor]:
    found: dict[tuple, torch.Tensor] = {}
    _map_tensors(state, lambda tensor: found.setdefault(_identity(tensor), tensor))
    return list(found.values())


def _map_tensors(value: Any, function: Callable[[torch.Tensor], Any]) -> Any:
    if torch.is_tensor(value):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule, scaler and this process's RNG states; return the loop's state."""
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FtcliError(
            f"{path} holds no RNG state for process {accelerator.process_index}",
            "resume with as many processes as the run was started with",
        )
    with damaged_file(path, resume_hint(path)):  # a checkpoint without a manifest, or damaged since it was checked
        load_weights(accelerator.unwrap_model(model), path)
        load_optimizer_state(optimizer, load_torch_file(path / "optimizer.pt"))
        scheduler.load_state_dict(load_torch_file(path / "scheduler.pt"))
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(load_torch_file(path / "scaler.pt"))
        set_rng_state(load_torch_file(rng_file))
        return json.loads((path / LOOP_STATE_FILE).read_text())


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict, except that a tensor learning rate (a CUDA-graph run's) keeps its
    own tensor on the GPU and takes the saved value. load_state_dict would put the saved CPU copy in
    its place, where the graphs captured after cannot follow the schedule: a resumed graphed run
    then ended differently from the uninterrupted one (measured on an H200)."""
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, rate in zip(optimizer.param_groups, rates):
        if torch.is_tensor(rate):
            rate.copy_(torch.as_tensor(group["lr"]))
            group["lr"] = rate
