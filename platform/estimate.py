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
# Memory (MB) measured here on 2026-12-03 with psutil: a trial process before its data and model
# (torch, Ray, MLflow imported: RSS 852 at a fresh trial's start, 1,044-1,051 at later ones in a
# reused process), and Ray's own processes of a local cluster (GCS, raylet, dashboard and its
# modules, agents: their PSS summed, 538; 600 with room).
TRIAL_PROCESS_MB = 1050.0
RAY_PROCESSES_MB = 600.0


@dataclass
class TrialCost:
    name: str
    steps: int | None  # None: the training set's size is known only once loaded
    eval_passes: int  # feature extractions of the train and test sets (kNN, probes)
    seconds: float | None = None
    memory_mb: float | None = None  # the trial process's peak: imports, data held, model, a step


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
    Concurrent trials share the machine, so their step is measured shared: as many copies of the
    model as trials run together, each on its share of the threads, stepping at the same time.
    (Measured alone at its share of the threads, a step was 1.1-1.7x faster than in the real
    concurrent runs of two CIFAR-10 studies on an fp32-only 2-core machine; measured with every
    thread and counted at 1/c of that pace, it was within 10% of those two but said 71:03 for
    simclr_temperature's two concurrent trials on a 2-core AVX512-BF16 machine, which run ~48 min
    undisturbed, a bf16 step gaining only 1.3x from a second thread. Measured shared: 50:49.)"""
    cpus = cpus or os.cpu_count() or 1
    sharing = max(1, min(concurrency, len(trials)))
    costs = trial_costs(trials)
    for cost, trial in zip(costs, trials):
        step, forward, step_mb = step_seconds(trial.study, cpus, sharing)
        cost.memory_mb = TRIAL_PROCESS_MB + data_mb(trial.study.data) + step_mb
        data = trial.study.data
        images = (train_set_size(data) or 0) + (data.test_subset or data.test_size)
        extraction = cost.eval_passes * math.ceil(images / trial.study.train.batch_size) * forward
        cost.seconds = (cost.steps or 0) * step + extraction + TRIAL_OVERHEAD_SECONDS
    # Trials run `concurrency` at a time: the longest ones set the pace of each round.
    ordered = sorted((c.seconds for c in costs), reverse=True)
    wall = sum(ordered[i] for i in range(0, len(ordered), max(1, concurrency)))
    return costs, RAY_START_SECONDS + wall


def fitting_concurrency(costs: list[TrialCost], available_mb: float) -> int:
    """How many of the largest trials fit in `available_mb` beside Ray's own processes."""
    largest = max(c.memory_mb or 0.0 for c in costs)
    return max(0, int((available_mb - RAY_PROCESSES_MB) // largest)) if largest else len(costs)


def data_mb(data: DataConfig) -> float:
    """The uint8 images a trial holds in memory: the training set (unless streamed from its files)
    and the test set; video clips as their frames."""
    from sslab.platform.data import DATASETS, streams

    frames = data.clip_length if DATASETS[data.name].kind == "video" else 1
    image = 3 * data.image_size**2 * frames
    train = train_set_size(data) or 0
    test = data.test_subset or data.test_size
    held = (0 if streams(data, train, pretraining=data.pretrain is not None) else train) + test
    return held * image / 2**20


def step_seconds(study: StudyConfig, threads: int, sharing: int = 1) -> tuple[float, float, float]:
    """(one optimiser step, one batch of feature extraction, the MB a step's model, optimiser and
    activations add to the process at its peak) for the study's model on this machine's `threads`
    CPU threads, shared by `sharing` copies stepping at once (concurrent trials); measured once per
    model, machine and sharing, then read from the cache."""
    key = _cache_key(study, threads, sharing)
    cache = _read_cache()
    entry = cache.get(key, ())
    busy = machine_busy()
    # A step measured while other work held the cores was up to 1.9x slow (0.59 s against 0.31 s
    # idle for the quickstart's): such a measurement serves until the machine is idle again.
    if len(entry) != 4 or (entry[3] and not busy):
        measured = _measure(study, threads) if sharing == 1 else _measure_shared(study, threads, sharing)
        cache[key] = [*measured, int(busy)]
        _write_cache(cache)
    return tuple(cache[key][:3])


def machine_busy() -> bool:
    """Whether other work holds the cores now: a 1-minute load average above half the CPUs."""
    try:
        return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def _measure_shared(study: StudyConfig, threads: int, sharing: int) -> list[float]:
    """`sharing` processes, each on its share of the threads, time their steps together (they
    start the clock at a barrier after their warm steps): what concurrent trials get of the
    machine, its memory bandwidth and caches shared. The slowest's times, the largest peak."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
    share = max(1, threads // sharing)
    with context.Manager() as manager:
        barrier = manager.Barrier(sharing)
        with concurrent.futures.ProcessPoolExecutor(sharing, mp_context=context) as pool:
            runs = [pool.submit(_measure, study, share, barrier) for _ in range(sharing)]
            results = [run.result() for run in runs]
    return [max(result[i] for result in results) for i in range(3)]


def _bf16(study: StudyConfig) -> bool:
    """Whether the study's trials autocast to bf16 here (the trainer falls back to fp32 where the
    CPU only emulates it)."""
    import torch

    from sslab.platform.runtime import native_bf16

    return study.train.amp and native_bf16(torch.device("cpu"))


def _cache_key(study: StudyConfig, threads: int, sharing: int = 1) -> str:
    import torch

    what = [study.method, study.method_args, dataclasses.asdict(study.backbone), study.data.image_size]
    what += [study.data.clip_length, study.train.batch_size // study.train.num_workers]
    what += [_bf16(study), study.train.channels_last, threads, _cpu_name(), torch.__version__]
    what += [sharing] if sharing > 1 else []  # unshared keys as before: their cache stays valid
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _measure(study: StudyConfig, threads: int, barrier=None) -> list[float]:
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
        before = _reset_peak_rss()
        method = build_method(measured, data, torch.device("cpu"), total_steps=1000)
        optimizer = build_optimizer(method, measured.train)
        images, index = data.train_images[:batch], torch.arange(batch)
        for step in range(WARM_STEPS + TIMED_STEPS):
            if step == WARM_STEPS:
                if barrier is not None:
                    barrier.wait()  # the copies sharing the machine step together from here
                started = time.perf_counter()
            train_step(method, method, optimizer, images, step, index, amp)
        step_time = (time.perf_counter() - started) / TIMED_STEPS
        method.eval()
        examples = data.example_images(batch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            method.features(examples)
            started = time.perf_counter()
            method.features(examples)
            forward_time = time.perf_counter() - started
        return [step_time, forward_time, max(0.0, _peak_rss_mb() - before)]
    finally:
        torch.set_num_threads(threads_before)


def _reset_peak_rss() -> float:
    """Starts a new peak-RSS window (Linux: clear_refs 5); returns the RSS now (MB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak is read as the RSS at the end: a lower bound
    return _rss_mb()


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _rss_mb()


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


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
