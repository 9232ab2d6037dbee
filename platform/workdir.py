"""The workdir (checkpoints, Ray state, the default MLflow store): paths that stay inside it,
locks between concurrent `sslab` processes, and small files written atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from sslab.platform.config import ConfigError


def inside(root: Path, *parts: str) -> Path:
    """`root / parts...`, refused unless the resolved result stays within `root`."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{path} is outside {root}")
    return path


def safe_dirname(name: str) -> str:
    """A trial name as one folder name: swept values may hold '/', '..' or spaces."""
    cleaned = re.sub(r"[^\w.=,+-]", "_", name).lstrip(".")
    return cleaned or "_"


def check_writable(folder: Path, key: str = "--workdir") -> None:
    """Creates `folder` and proves it writable, before a study writes anything else there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(str(folder), key, f"not writable ({err.strerror or err})") from None


def atomic_write_json(path: Path, data: dict) -> None:
    """Writes a small JSON file by rename: a reader sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: Path, wait: bool, busy_message: str = ""):
    """An exclusive lock on `path` (created) for the block, released on exit or process death.
    wait=False: a lock held by another process is a ConfigError with `busy_message`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(str(path.parent), "", f"{busy_message} (held by {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_torch_save(obj, path: Path) -> None:
    """Writes to a temporary file, then renames: a crash never leaves a half-written file."""
    import torch  # here: reports and the CLI use this module without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the half-written file would hold its space
        raise


# A full disk: what the OS, SQLite (the MLflow store) and pyarrow (Ray's sync) each say.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")
RESERVE_FILE = ".sslab-disk-reserve"
RESERVE_BYTES = 4 << 20  # the room a stopped study needs to mark its runs FAILED


class DiskFull(Exception):
    """The disk under a folder sslab writes filled up; the message names the folder and what to do."""


def disk_full_cause(err: BaseException | None) -> BaseException | None:
    """The exception in `err`'s chain that says the disk is full, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFull) or (isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS):
            return err
        if says_disk_full(str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


def says_disk_full(text: str) -> bool:
    return any(marker in text.lower() for marker in _DISK_FULL_TEXT)


def is_disk_full(err: BaseException | None) -> bool:
    return disk_full_cause(err) is not None


def _no_room(folder: Path) -> ConfigError:
    """Before the study starts, a workdir without room is unusable, like one that is not writable."""
    need = f"a study needs more than {RESERVE_BYTES >> 20} MB free"
    return ConfigError(str(folder), "--workdir", f"no space left on device ({need})")


def check_room(folder: Path) -> None:
    """Refuses a workdir (or the folder it will be made in) without room for the reserve, before
    the study's cost is measured or Ray starts."""
    existing = next(place for place in (folder, *folder.parents) if place.exists())
    if shutil.disk_usage(existing).free <= RESERVE_BYTES:
        raise _no_room(folder)


class DiskReserve:
    """A few MB held in the workdir while a study runs, freed when the disk fills up: the room to
    save Tune's state and mark the runs FAILED, so that `--resume` finds them (a full disk would
    otherwise leave them RUNNING)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / RESERVE_FILE
        try:
            with open(self.path, "wb") as handle:
                handle.write(bytes(RESERVE_BYTES))  # zeros written, not a sparse file: real blocks
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            self.release()
            if not is_disk_full(err):
                raise
            raise _no_room(folder) from None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
