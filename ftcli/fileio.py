"""Files written whole or not at all, their digests, and where ftcli keeps its caches; and the two
ways a file on disk goes wrong, each said in one line: a write that finds the disk full (DiskFull:
where, bytes free and needed) and a file whose bytes are not what its format needs (DamagedFile:
which file, what is wrong, what to do), found by checking the file, not the library's wording."""

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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """atomic_write_text's bytes."""
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


# ---------------------------------------------------------------- a damaged file, said in one line


class DamagedFile(FtcliError):
    """A file whose bytes are not what its format needs (cut short by a full disk or an interrupted
    copy, overwritten with something else): which file, what is wrong with it and what to do."""

    def __init__(self, path: Path, reason: str, hint: str | None = None) -> None:
        super().__init__(f"{path} is damaged ({reason})", hint)
        self.path, self.reason = path, reason


# What to do about a damaged file: a fixed hint, or one chosen by the damaged file's path.
Hint = str | Callable[[Path], str]


@contextmanager
def damaged_file(path: Path, hint: Hint) -> Iterator[None]:
    """Around a read of `path`, a file or a folder that a library loads from: when the read fails
    and a file there is damaged, one DamagedFile that names it, with `hint`. The file's format is
    checked, not the library's wording, so an error of another kind (a wrong dtype, memory, a
    missing file) passes as it was. A DamagedFile raised inside takes this hint: the reader outside
    knows better what the file is for."""
    try:
        yield
    except DamagedFile as error:
        raise DamagedFile(error.path, error.reason, _hint_for(hint, error.path)) from None
    except FtcliError:
        raise
    except Exception:
        found = folder_damage(path) if path.is_dir() else _damage_of(path)
        if found is None:
            raise
        raise DamagedFile(*found, _hint_for(hint, found[0])) from None


def read_json(path: Path, hint: Hint) -> Any:
    """A JSON file; a damaged one is a DamagedFile with `hint`."""
    with damaged_file(path, hint):
        return json.loads(path.read_text(encoding="utf-8"))


def folder_damage(folder: Path) -> tuple[Path, str] | None:
    """The first damaged file in `folder` and what is wrong with it; None when those ftcli can
    check (JSON, safetensors, torch.save's zip files) are whole."""
    for path in sorted(folder.iterdir()):
        if found := _damage_of(path):
            return found
    return None


def file_damage(path: Path) -> str | None:
    """What is wrong with a file by its format (by suffix: .json, .safetensors, torch.save's .pt, .pth
    and .bin), or
    None when it is whole, cannot be checked (another suffix) or cannot be read (missing,
    unreadable: the reader's own error says so)."""
    check = _FORMAT_CHECKS.get(path.suffix)
    try:
        if check is None or not path.is_file():
            return None
        return "empty" if path.stat().st_size == 0 else check(path)
    except OSError:
        return None


def _damage_of(path: Path) -> tuple[Path, str] | None:
    reason = file_damage(path)
    return None if reason is None else (path, reason)


def _hint_for(hint: Hint, path: Path) -> str:
    return hint(path) if callable(hint) else hint


def _json_damage(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as error:
        return "cut short" if _cut_short(error) else f"not valid JSON at line {error.lineno} column {error.colno}"
    return None


def _cut_short(error: json.JSONDecodeError) -> bool:
    """Whether JSON that does not parse ends too early: inside a string, before a value is complete,
    or an object or list that does not end closed (a cut inside a number fails before the end)."""
    text = error.doc.strip()
    closer = {"{": "}", "[": "]"}.get(text[:1])
    if error.msg == "Extra data":  # a whole value with more after it
        return False
    return (
        error.msg.startswith("Unterminated string")
        or error.pos >= len(error.doc.rstrip())
        or (closer is not None and not text.endswith(closer))
    )


# safetensors' words for a file shorter than its header says (SafetensorError, its one error type)
SAFETENSORS_CUT = ("not fully covered", "invalid header length", "header too small")


def _safetensors_damage(path: Path) -> str | None:
    from safetensors import safe_open  # the header only; numpy, so that no torch is imported for it

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        message = str(error).split(": ", 1)[-1]
        return "cut short" if any(sign in message for sign in SAFETENSORS_CUT) else f"not safetensors: {message}"


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL = b"\x80"  # torch.save's format before PyTorch 1.6: a bare pickle, which cannot be checked


def _torch_file_damage(path: Path) -> str | None:
    """torch.save writes a zip archive; its directory sits at the end, so a file cut short has none."""
    import zipfile

    with path.open("rb") as file:
        head = file.read(len(ZIP_MAGIC))
    if head.startswith(PICKLE_PROTOCOL):
        return None
    if head != ZIP_MAGIC:
        return "not a file torch.save wrote"
    try:
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile:
        return "cut short"
    return None


_FORMAT_CHECKS: dict[str, Callable[[Path], str | None]] = {
    ".json": _json_damage,
    ".safetensors": _safetensors_damage,
    ".pt": _torch_file_damage,
    ".pth": _torch_file_damage,
    ".bin": _torch_file_damage,
}
