"""Files written whole or not at all, their digests, and where ftcli keeps its caches."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcli.errors import FtcliError


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: readers see the old file or the new one."""
    data = text.encode("utf-8")
    with writing(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.chmod(staging, 0o644)  # mkstemp makes 0600; run files are meant to be shared
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` to `path`; a write that fails (a full disk) leaves the file as it was, not
    ending in half a line."""
    with writing(path, len(data)):
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(handle).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(handle, view) :]
            except BaseException:
                os.ftruncate(handle, start)
                raise
        finally:
            os.close(handle)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_home() -> Path:
    """Where ftcli caches what it computed once (tokenized splits, the CPU's bf16 gain):
    $FTCLI_CACHE, else ~/.cache/ftcli."""
    return Path(os.environ.get("FTCLI_CACHE", Path.home() / ".cache" / "ftcli"))


# ---------------------------------------------------------------- a full disk, said in one line

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip writer reports a short write in its own words, without the OS's reason.
SHORT_WRITE_MESSAGES = ("unexpected pos", "file write failed")
NEARLY_FULL_BYTES = 64 << 20  # or a twentieth of a smaller filesystem


class DiskFull(FtcliError):
    """A write that found its filesystem full (or the quota spent), said where and how much it needed."""


def disk_full(error: BaseException, where: Path | None = None) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is a full disk or quota.
    torch's short-write errors count when the filesystem of `where` is (nearly) full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if (
            isinstance(current, DiskFull)
            or getattr(current, "errno", None) in DISK_FULL_ERRNOS
            # torch and safetensors quote the OS's message inside their own errors
            or any(os.strerror(code) in text for code in DISK_FULL_ERRNOS)
            or (where is not None and any(message in text for message in SHORT_WRITE_MESSAGES) and nearly_full(where))
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def nearly_full(where: Path) -> bool:
    usage = shutil.disk_usage(existing_parent(where))
    return usage.free < min(NEARLY_FULL_BYTES, usage.total // 20)


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest folder that exists (a failed write may have removed what it made)."""
    path = Path(path).absolute()
    return next(folder for folder in (path, *path.parents) if folder.exists())


def free_bytes(where: Path) -> int:
    return shutil.disk_usage(existing_parent(where)).free


def tree_bytes(path: Path) -> int:
    """The bytes of a file, or of every file in a folder."""
    return path.stat().st_size if path.is_file() else sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def space_report(folder: Path, needed: int | None = None) -> str:
    """Where a write ran out of space and what it lacks, e.g. "runs/a (filesystem /mnt/data) has
    1.2 MB free, about 9.0 MB needed"."""
    folder = existing_parent(folder)
    mount = next(path for path in (folder, *folder.parents) if os.path.ismount(path))
    report = f"{folder} (filesystem {mount}) has {format_bytes(free_bytes(folder))} free"
    return report + (f", about {format_bytes(needed)} needed" if needed else "")


@contextmanager
def writing(path: Path, needed: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Around a write of `path` (a file or a folder), after whatever the write removes when it
    fails: a full disk becomes one line, DiskFull, that says where and how many bytes the write
    needed (`needed`, or a function that tells, asked only then) against those free."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        if not disk_full(error, path):
            raise
        size = needed() if callable(needed) else needed
        raise DiskFull(
            f"no space left on device writing {path}: {space_report(path.parent, size)}",
            "free space there or write elsewhere, then run again",
        ) from None

