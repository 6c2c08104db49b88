"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint of the loop backend:

    checkpoints/checkpoint-<step>/
      model.safetensors, config.json, tokenizer files   weights, loadable by evaluate and predict
      optimizer.pt, scheduler.pt [, scaler.pt]          AdamW moments, learning-rate schedule, fp16 scale
      rng_state_<process>.pt                            python, numpy, torch and CUDA generators
      training_state.json                               step, epoch, position in it, best score, ...
      manifest.json                                     size and digest of every other file

Both backends write a checkpoint into checkpoints/.partial/checkpoint-<step>/ and rename it into
place when it is complete, so a kill while saving leaves the previous checkpoints as they were and
never a half checkpoint that --resume would pick. The manifest, written last, lets --resume tell a
checkpoint damaged since (a bad disk, a copy cut short) and fall back to an older one. Everything is
read back with torch.load(weights_only=True): loading a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.utils.serialization
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftcli.data import file_sha256, round_up
from ftcli.errors import FtcliError
from ftcli.lora import is_adapter, load_adapter_weights
from ftcli.rundir import RunDir, atomic_write_json

LOOP_STATE_FILE = "training_state.json"
TRAINER_STATE_FILE = "trainer_state.json"  # what HF Trainer writes into its checkpoints
STATE_FILES = {"loop": LOOP_STATE_FILE, "trainer": TRAINER_STATE_FILE}
MANIFEST_FILE = "manifest.json"
DIGEST_PIECE = 16 << 20  # bytes hashed apart, in parallel

log = logging.getLogger("ftcli")


# ---------------------------------------------------------------- writing whole or not at all


def staging_dir(final: Path) -> Path:
    """Where the checkpoint that will become `final` is written first."""
    return final.parent / ".partial" / final.name


def publish(staging: Path, final: Path) -> None:
    """Record every file's hash, then make the completely written checkpoint visible under its
    final name, in one rename."""
    # The data reaches the disk before the name does.
    atomic_write_json(staging / MANIFEST_FILE, _file_digests(staging, sync=True))
    os.replace(staging, final)


@contextmanager
def disk_full_is_a_user_error(run: RunDir, final: Path) -> Iterator[None]:
    """A full disk (or quota) while saving `final`: drop its staging folder and say which checkpoint
    to resume from, rather than end in a traceback."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write as a RuntimeError that quotes the OS's message.
        disk_full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            os.strerror(code) in str(error) for code in (errno.ENOSPC, errno.EDQUOT)
        )
        if not disk_full:
            raise
        shutil.rmtree(staging_dir(final), ignore_errors=True)
        intact = [path.name for path in run.list_checkpoints() if path != final]
        raise FtcliError(
            f"no space left on device while saving {final.name}; "
            + (f"{intact[-1]} is intact" if intact else "no checkpoint was saved before it"),
            f"free space, then ftcli train {run.path} --resume" if intact else "free space and train again",
        ) from None


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a published checkpoint, or None when its files are those its manifest lists.
    Checkpoints written before manifests existed cannot be checked and count as intact."""
    manifest_file = checkpoint / MANIFEST_FILE
    if not manifest_file.is_file():
        return None
    expected = json.loads(manifest_file.read_text())
    found = _file_digests(checkpoint)
    for name, entry in expected.items():
        if name not in found:
            return f"{name} is missing"
        if "sha256" in entry:  # a manifest of ftcli before 2026-11-29: one sha256 of the whole file
            found[name] = {"size": found[name]["size"], "sha256": file_sha256(checkpoint / name)}
        if found[name] != entry:
            return f"{name} differs from when it was saved"
    return None


def _file_digests(folder: Path, sync: bool = False) -> dict[str, dict[str, Any]]:
    """Size and digest of every file in `folder` (the manifest aside), and with `sync` each file
    fsynced. A file's digest is the sha256 of the sha256s of its 16 MiB pieces, so that the pieces
    of one big file (bert-base's 880 MB optimizer state) are hashed in parallel: reading and hashing
    release the GIL."""
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE]
    sizes = [path.stat().st_size for path in paths]
    pieces = [(path, offset) for path, size in zip(paths, sizes) for offset in range(0, max(size, 1), DIGEST_PIECE)]

    def piece_digest(piece: tuple[Path, int]) -> bytes:
        path, offset = piece
        with path.open("rb") as file:
            return hashlib.sha256(os.pread(file.fileno(), DIGEST_PIECE, offset)).digest()

    def fsync(path: Path) -> None:
        with path.open("rb") as file:
            os.fsync(file.fileno())

    piece_digests: dict[Path, list[bytes]] = {path: [] for path in paths}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for (path, _), digest in zip(pieces, pool.map(piece_digest, pieces)):
            piece_digests[path].append(digest)
        if sync:
            list(pool.map(fsync, paths))
    return {
        str(path.relative_to(folder)): {"size": size, "sha256_of_pieces": hashlib.sha256(b"".join(piece_digests[path])).hexdigest()}
        for path, size in zip(paths, sizes)
    }


def prune(run: RunDir, keep: int, best: str | Path | None) -> None:
    """Delete all checkpoints but the newest `keep` and the best one."""
    checkpoints = run.list_checkpoints()
    kept = set(checkpoints[-keep:]) | ({Path(best)} if best else set())
    for path in checkpoints:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def clear_staging(run: RunDir) -> None:
    """Delete every half-written save; no save may be in flight."""
    shutil.rmtree(run.checkpoints / ".partial", ignore_errors=True)


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict[str, Any]:
    """Every generator that training draws from (dropout, shuffling in user code), as plain data."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the loop backend's checkpoints


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
        self._host = HostBuffers()

    def reserve(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> None:
        """Allocate the host memory of the snapshots now, before training, rather than with training
        stopped at the first save; pinning on a side thread slowed the training steps beside it
        more than it costs here (measured)."""
        if self.accelerator.is_main_process:
            self._host.allocate(self._state(model, optimizer, scheduler))

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
        with disk_full_is_a_user_error(self.run, final):
            try:
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
        snapshot = self._host.copy(self._state(model, optimizer, scheduler))
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
            (final, error), *_ = self._errors
            self._errors.clear()
            with disk_full_is_a_user_error(self.run, final):
                raise error

    def close(self) -> None:
        """Wait for the last save; afterwards every process finds every checkpoint published."""
        self.wait()
        self._host.release()
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
        self._block = torch.empty(starts[-1], dtype=torch.uint8)
        if any(tensor.is_cuda for tensor in tensors):
            self._page_lock(self._block)
        self._buffers = [
            self._block[start : start + size].view(tensor.dtype).view(tensor.shape)
            for tensor, start, size in zip(tensors, starts, sizes)
        ]
        self._layout = [_shape(tensor) for tensor in tensors]

    def _page_lock(self, block: torch.Tensor) -> None:
        """Without it the copies still work, but wait for the GPU and run at pageable speed."""
        block.fill_(0)  # fault the pages in first: the registration then only locks them
        cudart = torch.cuda.cudart()
        if cudart.cudaHostRegister(block.data_ptr(), block.numel(), 0) == cudart.cudaError.success:
            # Unlocked before the memory is freed, also when the writer is dropped without release().
            self._unregister = weakref.finalize(self, cudart.cudaHostUnregister, block.data_ptr())

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
    load_weights(accelerator.unwrap_model(model), path)
    load_optimizer_state(optimizer, _load(path / "optimizer.pt"))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(_load(path / "scaler.pt"))
    set_rng_state(_load(rng_file))
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


def load_weights(model: PreTrainedModel, path: Path) -> None:
    """Load a checkpoint's safetensors weights into a model of the same architecture."""
    if is_adapter(path):  # a LoRA run's checkpoint: the adapters and the head alone
        return load_adapter_weights(model, path)
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    # save_pretrained leaves out tied weights (they come back with the tie); anything else is a mismatch.
    missing = set(missing) - set(getattr(model, "all_tied_weights_keys", None) or {})
    if missing or unexpected:
        raise FtcliError(
            f"the weights in {path} do not fit the model (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})",
            "resume with the config the run was trained with",
        )


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- choosing where to resume


def resume_point(run: RunDir, given: str | Path | None, backend: str) -> Path:
    """The checkpoint to resume from: `given` (a path, or a name or step inside the run), else the
    newest intact one."""
    if given is None:
        checkpoints = run.list_checkpoints()
        if not checkpoints:
            raise FtcliError(
                f"{run.path} has no checkpoint to resume from",
                "start the run again with --overwrite, or wait for training.save_every steps before stopping it",
            )
        for path in reversed(checkpoints):
            problem = damage(path)
            if problem is None:
                break
            log.warning("%s is damaged (%s); trying the checkpoint before it", path.name, problem)
        else:
            raise FtcliError(
                f"every checkpoint of {run.path} is damaged",
                "start the run again with --overwrite, or restore the checkpoints from a backup",
            )
    else:
        path = run.find_checkpoint(given)
    if path.resolve() not in {p.resolve() for p in run.list_checkpoints()}:
        available = ", ".join(p.name for p in run.list_checkpoints()) or "none"
        raise FtcliError(f"{given} is not a checkpoint of {run.path}", f"its checkpoints: {available}")
    if not (path / STATE_FILES[backend]).is_file():
        raise FtcliError(
            f"{path} is not a checkpoint of the {backend} backend (no {STATE_FILES[backend]})",
            "resume with the backend the run was trained with",
        )
    if given is not None and (problem := damage(path)):
        raise FtcliError(f"{path} is damaged ({problem})", "resume from another checkpoint, or with --resume")
    return path


def rewind(run: RunDir, resume_from: Path) -> None:
    """Forget what the run did after `resume_from`: the resumed run writes those checkpoints and events again."""
    step = run.checkpoint_step(resume_from)
    for path in run.list_checkpoints():
        if run.checkpoint_step(path) > step:
            shutil.rmtree(path)
    clear_staging(run)
    run.drop_events_after(step)
