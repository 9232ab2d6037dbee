"""What a study costs before it runs: trials, optimiser steps, evaluation passes, and the wall time
on this machine, from a few measured steps of each distinct model (cached per model, precision,
threads and machine, so a second `sslab validate` answers at once)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sslab.platform.config import DataConfig, StudyConfig
from sslab.platform.data import train_set_size
from sslab.platform.sweep import Trial

# Measured on this project's 2-core machine (the study notes of issue #31): Ray's start, and each
# trial's start and close outside training (dataset, model, MLflow run).
RAY_START_SECONDS = 12.0
TRIAL_OVERHEAD_SECONDS = 20.0
WARM_STEPS, TIMED_STEPS = 2, 3


@dataclass
class TrialCost:
    name: str
    steps: int | None  # None: the training set's size is known only once loaded
    eval_passes: int  # feature extractions of the train and test sets (kNN, probes)
    seconds: float | None = None


def trial_costs(trials: list[Trial]) -> list[TrialCost]:
    return [TrialCost(t.name, total_steps(t.study), eval_passes(t.study)) for t in trials]


def total_steps(study: StudyConfig) -> int | None:
    images = train_set_size(study.data)
    return None if images is None else images // study.train.batch_size * study.train.epochs


def eval_passes(study: StudyConfig) -> int:
    """Random init, the kNN monitor every `knn_every` epochs, the probes and the end."""
    from sslab.platform.train import probe_epochs  # torch: only when a cost is asked for

    epochs, every = study.train.epochs, study.eval.knn_every
    monitor = set(range(every, epochs + 1, every)) if every else set()
    return len(probe_epochs(study) | monitor | {epochs}) + int(study.eval.random_init_baseline)


def estimate(trials: list[Trial], concurrency: int, cpus: int | None = None) -> tuple[list[TrialCost], float]:
    """Each trial's cost and the study's wall time (seconds) at `concurrency` trials at a time.
    Concurrent trials share the machine: a step is measured with every CPU, and each of the c
    trials running together gets 1/c of that pace. (Measured alone at its share of the threads,
    a step was 1.1-1.7x faster than in the real concurrent runs of two CIFAR-10 studies on a
    2-core machine; shared this way it was within 10% of both.)"""
    cpus = cpus or os.cpu_count() or 1
    sharing = max(1, min(concurrency, len(trials)))
    costs = trial_costs(trials)
    for cost, trial in zip(costs, trials):
        step, forward = (seconds * sharing for seconds in step_seconds(trial.study, cpus))
        data = trial.study.data
        images = (train_set_size(data) or 0) + (data.test_subset or data.test_size)
        extraction = cost.eval_passes * math.ceil(images / trial.study.train.batch_size) * forward
        cost.seconds = (cost.steps or 0) * step + extraction + TRIAL_OVERHEAD_SECONDS
    # Trials run `concurrency` at a time: the longest ones set the pace of each round.
    ordered = sorted((c.seconds for c in costs), reverse=True)
    wall = sum(ordered[i] for i in range(0, len(ordered), max(1, concurrency)))
    return costs, RAY_START_SECONDS + wall


def step_seconds(study: StudyConfig, threads: int) -> tuple[float, float]:
    """(one optimiser step, one batch of feature extraction) for the study's model on this machine
    at `threads` CPU threads; measured once per model and machine, then read from the cache."""
    key = _cache_key(study, threads)
    cache = _read_cache()
    if key not in cache:
        cache[key] = _measure(study, threads)
        _write_cache(cache)
    return tuple(cache[key])


def _bf16(study: StudyConfig) -> bool:
    """Whether the study's trials autocast to bf16 here (the trainer falls back to fp32 where the
    CPU only emulates it)."""
    import torch

    from sslab.platform.runtime import native_bf16

    return study.train.amp and native_bf16(torch.device("cpu"))


def _cache_key(study: StudyConfig, threads: int) -> str:
    import torch

    what = [study.method, study.method_args, dataclasses.asdict(study.backbone), study.data.image_size]
    what += [study.data.clip_length, study.train.batch_size // study.train.num_workers]
    what += [_bf16(study), study.train.channels_last, threads, _cpu_name(), torch.__version__]
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _measure(study: StudyConfig, threads: int) -> list[float]:
    """A few warm optimiser steps of the study's model on generated images of its size and batch,
    then feature extraction of a batch (what kNN and the probes do per batch)."""
    import torch

    from sslab.methods.registry import get_method_class
    from sslab.platform.build import build_method
    from sslab.platform.data import load_dataset
    from sslab.platform.optim import build_optimizer
    from sslab.platform.train import train_step

    batch = study.train.batch_size // study.train.num_workers
    video = get_method_class(study.method).data_kind == "video"
    data_cfg = DataConfig(
        name="synthetic_video" if video else "synthetic",
        image_size=study.data.image_size,
        train_size=batch,
        test_size=batch,
        clip_length=study.data.clip_length,
    )
    amp = _bf16(study)
    measured = dataclasses.replace(study, data=data_cfg, train=dataclasses.replace(study.train, amp=amp))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        data = load_dataset(data_cfg)
        method = build_method(measured, data, torch.device("cpu"), total_steps=1000)
        optimizer = build_optimizer(method, measured.train)
        images, index = data.train_images[:batch], torch.arange(batch)
        for step in range(WARM_STEPS + TIMED_STEPS):
            if step == WARM_STEPS:
                started = time.perf_counter()
            train_step(method, method, optimizer, images, step, index, amp)
        step_time = (time.perf_counter() - started) / TIMED_STEPS
        method.eval()
        examples = data.example_images(batch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            method.features(examples)
            started = time.perf_counter()
            method.features(examples)
        return [step_time, time.perf_counter() - started]
    finally:
        torch.set_num_threads(threads_before)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as std_platform

    return std_platform.processor() or std_platform.machine()


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "sslab" / "step_seconds.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    from sslab.platform.workdir import atomic_write_json

    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_cache_file(), cache)
    except OSError:
        pass  # a read-only home: measured again next time
