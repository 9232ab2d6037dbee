"""Checkpoints: every module, buffer and the optimiser, written atomically with the previous one
kept, so a crash or a damaged file costs one checkpoint interval, never the run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from sslab.methods.base import Method
from sslab.platform.workdir import atomic_torch_save

CHECKPOINT_NAME = "checkpoint.pt"


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(path: Path, method: Method, optimizer, epoch: int, step: int) -> None:
    """Atomic, and the one before is kept: a checkpoint damaged after it was written (a full
    disk, a copy cut short) costs one checkpoint interval, not the run."""
    state = {"epoch": epoch, "step": step, "method": method.state_dict(), "optimizer": optimizer.state_dict()}
    if path.exists():
        os.replace(path, previous_checkpoint(path))
    atomic_torch_save(state, path)


def has_checkpoint(path: Path) -> bool:
    return path.exists() or previous_checkpoint(path).exists()


def load_checkpoint(path: Path, method: Method, optimizer, device) -> tuple[int, int]:
    """Restores every module, buffer and (if given) the optimizer from `path`, or from the
    previous checkpoint where `path` is missing or unreadable. Returns (epochs done, step)."""
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location=device, weights_only=True)
        except Exception as err:  # truncated or corrupt: torch raises several kinds
            print(
                f"warning: {candidate} is unreadable ({type(err).__name__}: {str(err)[:120]}); "
                "falling back to the previous checkpoint",
                file=sys.stderr,
                flush=True,
            )
            continue
        method.load_state_dict(state["method"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state["epoch"], state["step"]
    raise FileNotFoundError(f"no readable checkpoint at {path} or {previous_checkpoint(path)}")


def adopt_tune_checkpoint(path: Path) -> None:
    """The checkpoint Tune hands this trial (after a restore, or under PBT another trial's that it
    now continues) replaces the trial's own."""
    import ray.tune

    given = ray.tune.get_checkpoint()
    if given is None:
        return
    with given.as_directory() as folder:
        source = Path(folder) / CHECKPOINT_NAME
        if source.exists() and source.resolve() != path.resolve():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".adopting")
            shutil.copyfile(source, partial)
            partial.replace(path)  # atomic: a crash leaves the old checkpoint or the new one
