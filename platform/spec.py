"""A trial's complete, validated input: built once (on the driver, or in the trial for values
Optuna or PBT propose while the study runs), then handed as is to the training loop, in-process,
in a Tune trial or to every Ray Train worker. Nothing is added to it afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sslab.platform.config import StudyConfig, get_dotted
from sslab.platform.tracking import TrialTracking


@dataclass(frozen=True)
class TrialSpec:
    study: StudyConfig  # this trial's study, validated: seed and swept values applied
    trial_dir: str  # absolute folder of this trial's checkpoint
    tracking: TrialTracking | None = None  # where its MLflow child run is; None: log nothing
    runtime: Literal["local", "tune", "train"] = "local"  # where epochs are reported besides MLflow
    tune_checkpoints: bool = False  # PBT: Tune hands checkpoints from trial to trial
    logged_keys: tuple[str, ...] = ()  # PBT's mutated keys, logged every epoch as hp/<key>

    @property
    def name(self) -> str:
        return self.tracking.trial_name if self.tracking else self.study.name

    def logged_values(self) -> dict[str, float]:
        config = self.study.to_dict()
        return {f"hp/{key}": float(get_dotted(config, key)) for key in self.logged_keys}


def trial_spec(
    study: StudyConfig, trial_dir: Path | str, tracking: TrialTracking | None = None, **options
) -> TrialSpec:
    """A spec with its folder made absolute (Ray moves trials to other working directories)."""
    return TrialSpec(study, str(Path(trial_dir).resolve()), tracking, **options)
