"""A trial's files from its MLflow run, for `sslab eval` and `sslab export` on any machine that
reaches the store: the resolved study it ran, its checkpoint (the local file where this machine
has it, else the logged copy), and its encoder rebuilt from the checkpoint for older runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sslab.platform.build import method_from_checkpoint
from sslab.platform.checkpoint import CHECKPOINT_NAME, has_checkpoint
from sslab.platform.config import ConfigError
from sslab.platform.data import load_dataset
from sslab.platform.export import EXPORT_ARTIFACT, write_export
from sslab.platform.validate import build_study


def trial_config_of(tracker, run_id: str) -> dict:
    """The resolved study a trial ran (its `config.json`), as one trial: no sweep."""
    raw = json.loads(tracker.download(run_id, "config.json").read_text())
    raw["sweep"] = {}
    return raw


def run_checkpoint(tracker, run) -> Path:
    """The trial's checkpoint: the local file the trial wrote where this machine has it, else
    the copy logged to the run (`checkpoint/`), downloaded from the tracking server."""
    local = Path(run.data.tags.get("sslab.checkpoint", ""))
    if local.name and has_checkpoint(local):
        return local
    try:
        return tracker.download(run.info.run_id, f"checkpoint/{local.name or CHECKPOINT_NAME}")
    except Exception:
        raise ConfigError(
            f"run {run.info.run_id}",
            "tags.sslab.checkpoint",
            f"no checkpoint at {local} nor in the run's artifacts",
        ) from None


def logged_export(tracker, run, folder: Path) -> Path:
    """The run's export, downloaded into `folder`: `export/`; `encoder/` for runs logged before
    2026-12-08; else rebuilt from the checkpoint (runs from before trials logged exports)."""
    for artifact in (EXPORT_ARTIFACT, "encoder"):
        try:
            return tracker.download(run.info.run_id, artifact, str(folder))
        except Exception:
            continue
    return export_from_checkpoint(tracker, run, folder)


def export_from_checkpoint(tracker, run, folder: Path) -> Path:
    """Runs from before trials logged an export: rebuild the method and export its checkpoint."""
    study = build_study(trial_config_of(tracker, run.info.run_id), source=f"run {run.info.run_id}")
    checkpoint = run_checkpoint(tracker, run)
    method, _ = method_from_checkpoint(study, load_dataset(study.data), checkpoint, torch.device("cpu"))
    write_export(method.eval(), study, folder / "encoder", run_id=run.info.run_id)
    return folder / "encoder"
