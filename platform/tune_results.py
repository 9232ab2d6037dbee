"""Both sides of what a trial reports to Ray Tune: the loop's report (`tune_result`) and what the
driver, its schedulers and its progress line read back. Tune results carry every epoch's metrics
plus these keys."""

from __future__ import annotations

EPOCH = "epoch"  # ASHA's time_attr: Tune's own training_iteration restarts after a restore
PBT_EPOCH = "pbt_epoch"  # PBT's clock (see tune_result)
TRIAL = "sslab_trial"  # the trial's own name: Tune results -> our trials (PBT may swap configs)


def tune_result(metrics: dict, trial_name: str, epoch: int, is_last: bool, pbt: bool) -> dict:
    """One epoch's report. Under PBT the last epoch reports just under its number, so that the
    population is never perturbed after it (a copied finished trial would have nothing to train)."""
    extra = {TRIAL: trial_name}
    if pbt:
        extra[PBT_EPOCH] = epoch - 0.5 if is_last else epoch
    return metrics | extra


def reported_trial(metrics: dict | None) -> str | None:
    """The trial name a result was reported under, if it reported any epoch."""
    return (metrics or {}).get(TRIAL)


def epochs_reached(metrics: dict | None) -> int:
    return (metrics or {}).get(EPOCH, 0)
