"""The cost lines `sslab validate` and `sslab run` print before a study runs (steps, evaluation
passes, wall time and memory on this machine), and the refusal of a study whose concurrent trials
would not fit in this machine's memory."""

from __future__ import annotations

import os

import psutil

from sslab.platform.config import ConfigError
from sslab.platform.estimate import RAY_PROCESSES_MB, estimate, fitting_concurrency
from sslab.platform.sweep import expand_trials
from sslab.platform.train import clock


def print_study_cost(study, raw: dict, source: str, local: bool = True) -> float | None:
    """Prints the cost line; returns the mean estimated seconds of a trial (None: no estimate)."""
    if study.search.name == "optuna":
        print("  cost: Optuna proposes its trials as it runs; no estimate")
        return None
    return print_cost(expand_trials(study, raw), study.max_concurrent_trials, source, local)


def print_cost(trials, concurrency: int, source: str, local: bool = True) -> float | None:
    """Steps, evaluation passes, the wall time and the memory on this machine, before anything
    runs; a study whose concurrent trials would not fit in this machine's memory is refused
    (`local`: the trials would run here)."""
    if any(t.study.train.use_gpu for t in trials):
        print("  cost: trials train on GPUs, and sslab measures steps on this machine's CPU; no estimate")
        return None
    costs, wall = estimate(trials, concurrency)
    steps = [c.steps for c in costs]
    if None in steps:
        print("  cost: the training set's size is known only once loaded; no estimate")
        return None
    per_trial = f"{min(steps):,}" if min(steps) == max(steps) else f"{min(steps):,}-{max(steps):,}"
    print(
        f"  cost: {len(costs)} trial(s) x {per_trial} optimiser steps = {sum(steps):,} steps, "
        f"{costs[0].eval_passes} evaluation passes per trial; about {clock(wall)} on this machine "
        f"at {concurrency} trial(s) at a time (measured steps, cached)"
    )
    print_memory(costs, min(concurrency, len(costs)), source, local and not os.environ.get("RAY_ADDRESS"))
    return sum(c.seconds for c in costs) / len(costs)


def print_memory(costs, concurrency: int, source: str, local: bool) -> None:
    largest = max(c.memory_mb for c in costs)
    needed = concurrency * largest + RAY_PROCESSES_MB
    available = psutil.virtual_memory().available / 2**20
    print(
        f"  memory: about {largest / 1024:.1f} GB per trial, {needed / 1024:.1f} GB at {concurrency} at a "
        f"time with Ray's processes; {available / 1024:.1f} GB available now"
    )
    if not local or needed <= available:
        return
    fits = fitting_concurrency(costs, available)
    remedy = (
        f"--set max_concurrent_trials={fits} fits"
        if fits
        else "not even one trial fits: lower train.batch_size, or stream the images (data.loading: stream)"
    )
    raise ConfigError(
        source,
        "max_concurrent_trials",
        f"{concurrency} trial(s) at a time need about {needed / 1024:.1f} GB and this machine has "
        f"{available / 1024:.1f} GB available; {remedy}",
    )
