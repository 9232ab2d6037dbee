"""A study invocation's runs read back from MLflow into pandas: one row per trial, the per-epoch
curves, and the per-point statistics every report table and plot is built from."""

from __future__ import annotations

import json

import pandas as pd

from sslab.platform.metric_keys import EVAL, RANDOM_INIT, is_followed_knn, monitor_keys, random_init_key
from sslab.platform.tracking import COLLAPSE_TAG, TRIAL_TAG, Tracker

CURVES = ("loss", "knn_top1", "propagation_j")


def find_parent(tracker: Tracker, study: str, parent_run_id: str | None = None):
    """(experiment id, parent run) of the study's latest or given invocation."""
    experiment = tracker.client.get_experiment_by_name(study)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {study!r} at {tracker.uri}")
    parent = (
        tracker.client.get_run(parent_run_id)
        if parent_run_id
        else tracker.latest_parent(experiment.experiment_id)
    )
    if parent is None:
        raise LookupError(f"study {study!r} has no runs at {tracker.uri}")
    return experiment.experiment_id, parent


def load_study_runs(tracker: Tracker, experiment_id: str, parent, extra_curves: tuple[str, ...] = ()):
    """(trials DataFrame, curves DataFrame) of one invocation; the curves hold the per-epoch
    history of CURVES and `extra_curves`."""
    rows, curves = [], []
    for run in tracker.child_runs(experiment_id, parent.info.run_id):
        params = run.data.params
        trial = run.data.tags.get(TRIAL_TAG)
        point = run.data.tags.get("sslab.point") or point_name(trial)  # runs from before the tag: the name
        values = run.data.tags.get("sslab.point_values")
        row = {
            "trial": trial,
            "point": point,
            "point_values": json.loads(values) if values else parse_point(point),
            "seed": int(params.get("train.seed", 0)),
            "status": run.info.status,
            "run_id": run.info.run_id,
        }
        row.update(run.data.metrics)
        row["uses_labels"] = run.data.tags.get("sslab.uses_labels", "")
        row["state"] = run.data.tags.get(COLLAPSE_TAG, "")  # the method's own verdict, at the end
        rows.append(row)
        monitored = tuple(k for k in run.data.metrics if is_followed_knn(k))
        curve_keys = tuple(dict.fromkeys(CURVES + extra_curves + monitored))
        copied = tuple(k for k in monitor_keys(run.data.metrics) if f"{RANDOM_INIT}{k}" in run.data.metrics)
        keys = dict.fromkeys(curve_keys + copied)  # each history fetched once
        history = {k: tracker.client.get_metric_history(run.info.run_id, k) for k in keys}
        drop_random_init_copies(row, {k: history[k] for k in copied})
        for key in curve_keys:
            points = {m.step: m.value for m in history[key]}
            start = run.data.metrics.get(f"{RANDOM_INIT}{key}")
            if start is not None:
                points.setdefault(0, start)  # the monitor's curves start at the random init
            for epoch, value in points.items():
                curves.append({"trial": row["trial"], "metric": key, "epoch": epoch, "value": value})
    trials = pd.DataFrame(rows).sort_values("trial", ignore_index=True) if rows else pd.DataFrame()
    return trials, pd.DataFrame(curves)


def drop_random_init_copies(row: dict, history: dict) -> None:
    """Stores written before sslab 2026-12-02 hold the random-init monitor values under the
    monitor's own keys at epoch 0 too. A trial stopped before its first kNN epoch would then
    show its random-init kNN as its trained result: blank such values. `history`: each such
    key's logged values."""
    for key, values in history.items():
        if values and max(m.step for m in values) == 0:
            row[key] = float("nan")


def point_name(trial: str) -> str:
    """The sweep point of a trial logged before points were tagged: its name without the seed."""
    parts = [p for p in trial.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or "default"


# (trained metric, baseline metric, label, baseline's label): what a report puts side by side,
# where present. Video studies: propagated masks against the same network at random init and
# against the first mask copied to every frame (no tracking at all).
HEADLINES = [
    ("knn_top1", random_init_key("knn_top1"), "kNN top-1", "random init"),
    *(
        (EVAL + metric, random_init_key(metric), label, "random init")
        for metric, label in (
            ("linear_top1", "linear top-1"),
            ("finetune_top1", "fine-tune top-1"),
            ("zero_shot_top1", "zero-shot top-1"),
            ("propagation_j", "mask propagation J"),
        )
    ),
    (EVAL + "propagation_j", EVAL + "copy_first_j", "mask propagation J", "first mask copied"),
]


def headlines(trials: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    return [h for h in HEADLINES if h[0] in trials]


def summarise(trials: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Mean and std over seeds of each sweep point's headline metrics (and `extra` ones)."""
    columns = list(dict.fromkeys(c for h in headlines(trials) for c in h[:2] if c in trials))
    columns += [c for c in extra if c in trials and c not in columns]
    grouped = trials.groupby("point")[columns]
    return grouped.agg(["mean", "std", "count"])


def parse_point(point: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in point.split(",") if "=" in part)


def point_stats(frame: pd.DataFrame, column: str) -> dict[str, tuple[float, float, int]]:
    """Sweep point -> (mean, std, seeds) of `column`: what the verdict judges."""
    grouped = frame.groupby("point")[column].agg(["mean", "std", "count"])
    return {point: (row["mean"], row["std"], int(row["count"])) for point, row in grouped.iterrows()}


def steps_range(steps: pd.Series) -> str:
    """ "N" or "N-M" optimiser steps (points differ, e.g. batch sizes at equal epochs); "" if none."""
    steps = steps.dropna()
    if steps.empty:
        return ""
    low, high = int(steps.min()), int(steps.max())
    return f"{low}" if low == high else f"{low}-{high}"


def probe_table(trials: pd.DataFrame, curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (trial, epoch) where `metric` was logged: point, seed, epoch, optimiser steps,
    value, and the probe's fraction of its trial's training."""
    if trials.empty or curves.empty or metric not in set(curves["metric"]):
        return pd.DataFrame()
    wide = curves[curves["metric"].isin([metric, "optimizer_steps"])].pivot_table(
        index=["trial", "epoch"], columns="metric", values="value", aggfunc="last"
    )
    wide = wide.dropna(subset=[metric]).reset_index()
    wide = wide[wide["epoch"] >= 1]  # epoch 0 is the random-init baseline
    if "optimizer_steps" not in wide:
        wide["optimizer_steps"] = float("nan")
    info = trials.set_index("trial")[["point", "seed"]]
    wide = wide.join(info, on="trial")
    last_epoch = wide.groupby("trial")["epoch"].transform("max")
    wide["fraction"] = (wide["epoch"] / last_epoch).round(3)
    return wide.rename(columns={metric: "value"})
