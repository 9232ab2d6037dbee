"""The workdir (checkpoints, Ray state, the default MLflow store): paths that stay inside it,
locks between concurrent `sslab` processes, and small files written atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
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
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


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
    torch.save(obj, tmp)
    os.replace(tmp, path)
