"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint of the loop backend (ftcli.training.loop.checkpointing writes and reads it):

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

import hashlib
import json
import logging
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ftcli.errors import FtcliError
from ftcli.fileio import (
    DiskFull,
    atomic_write_json,
    damaged_file,
    disk_full,
    file_damage,
    file_sha256,
    folder_damage,
    free_bytes,
    space_report,
    tree_bytes,
)
from ftcli.lora import is_adapter, load_adapter_weights
from ftcli.runs.rundir import RunDir

LOOP_STATE_FILE = "training_state.json"
TRAINER_STATE_FILE = "trainer_state.json"  # what HF Trainer writes into its checkpoints
STATE_FILES = {"loop": LOOP_STATE_FILE, "trainer": TRAINER_STATE_FILE}
MANIFEST_FILE = "manifest.json"
DIGEST_PIECE = 16 << 20  # bytes hashed apart, in parallel
ROOM_MARGIN = 1 << 20  # bytes free beyond a checkpoint's size before saving the next (blocks, json files)

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
def disk_full_is_a_user_error(run: RunDir, final: Path, estimate: Callable[[], int | None] | None = None) -> Iterator[None]:
    """A full disk (or quota) while saving `final`: drop its staging folder and say where, how much
    the checkpoint needs (the size of the one before it, else `estimate`) and which checkpoint to
    resume from, rather than end in a traceback."""
    try:
        yield
    except Exception as error:
        if not disk_full(error, run.checkpoints):
            raise
        shutil.rmtree(staging_dir(final), ignore_errors=True)
        with suppress(OSError):
            staging_dir(final).parent.rmdir()  # .partial, unless another save is staged there
        raise checkpoint_disk_full(run, final, estimate) from None


def checkpoint_disk_full(run: RunDir, final: Path, estimate: Callable[[], int | None] | None = None) -> DiskFull:
    intact = [path for path in run.list_checkpoints() if path != final]
    needed = tree_bytes(intact[-1]) if intact else estimate() if estimate else None
    return DiskFull(
        f"no space left on device while saving {final.name}; "
        + (f"{intact[-1].name} is intact" if intact else "no checkpoint was saved before it")
        + f"; {space_report(run.checkpoints, needed)}",
        f"free space, then ftcli train {run.path} --resume" if intact else "free space and train again",
    )


def tensor_bytes(state: Any) -> int:
    """The bytes of every tensor in a (nested) state: about what saving it writes."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        state = list(state.values())
    return sum(map(tensor_bytes, state)) if isinstance(state, (list, tuple)) else 0


def refuse_without_room(run: RunDir, final: Path, accelerator: Any, needed: int | None = None) -> None:
    """Refuse to start saving `final` when its filesystem has less free space than the checkpoint
    before it took (`needed`, else the newest published one's size) plus a margin: the line a save
    that ran out of space would end in, before anything is written. The main process decides, for all."""
    verdict: list[tuple[str, str | None] | None] = [None]  # the error's message and hint: they pickle
    if accelerator.is_main_process and needed is None and (published := run.list_checkpoints()):
        needed = tree_bytes(published[-1])
    if accelerator.is_main_process and needed is not None:
        if free_bytes(run.checkpoints) < needed + needed // 100 + ROOM_MARGIN:
            error = checkpoint_disk_full(run, final)
            verdict = [(error.message, error.hint)]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict, from_process=0)
    if verdict[0] is not None:
        raise DiskFull(*verdict[0])


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a published checkpoint, or None when its files are those its manifest lists.
    Of a checkpoint written before manifests existed, the files' formats are checked."""
    manifest_file = checkpoint / MANIFEST_FILE
    if not manifest_file.is_file():
        found = folder_damage(checkpoint)
        return None if found is None else f"{found[0].name} is {found[1]}"
    if problem := file_damage(manifest_file):
        return f"{MANIFEST_FILE} is {problem}"
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


# ---------------------------------------------------------------- reading back


def load_weights(model: PreTrainedModel, path: Path) -> None:
    """Load a checkpoint's safetensors weights into a model of the same architecture."""
    if is_adapter(path):  # a LoRA run's checkpoint: the adapters and the head alone
        return load_adapter_weights(model, path)
    with damaged_file(path / "model.safetensors", "restore it from a backup"):
        state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied weights (they come back with the tie); anything else is a mismatch.
    missing = set(missing) - set(getattr(model, "all_tied_weights_keys", None) or {})
    if missing or unexpected:
        raise FtcliError(
            f"the weights in {path} do not fit the model (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})",
            "resume with the config the run was trained with",
        )


def load_torch_file(path: Path) -> Any:
    """A checkpoint's optimizer, schedule or RNG file, read without running code."""
    with damaged_file(path, "restore it from a backup"):
        return torch.load(path, map_location="cpu", weights_only=True)


def resume_hint(checkpoint: Path) -> str:
    """What to do about a damaged checkpoint that a run was to continue from: an older one, or a backup."""
    run = RunDir(checkpoint.parent.parent)
    step = run.checkpoint_step(checkpoint)
    older = [path.name for path in run.list_checkpoints() if run.checkpoint_step(path) < step]
    if older:
        return f"resume from an older checkpoint: ftcli train {run.path} --resume-from {older[-1]}; or restore it from a backup"
    return f"restore it from a backup, or start the run again: ftcli train {run.path} --overwrite"


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
