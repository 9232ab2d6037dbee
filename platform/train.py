"""The one training loop, method-agnostic: in-process, inside a Tune trial, or as a Ray Train
worker. `train_loop(spec)` takes a validated `TrialSpec` (spec.py) and uses it as it is."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslab.methods.base import Method
from sslab.platform.build import build_method
from sslab.platform.checkpoint import (
    CHECKPOINT_NAME,
    adopt_tune_checkpoint,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sslab.platform.config import StudyConfig
from sslab.platform.data import Dataset, load_dataset
from sslab.platform.evaluate import eval_mode, knn_eval, protocol_eval
from sslab.platform.metric_keys import EVAL, MONITOR, RANDOM_INIT, monitor_keys
from sslab.platform.optim import (
    build_optimizer,
    cosine_schedule,
    scale_weight_decay,
    scaled_lr,
    set_learning_rate,
)
from sslab.platform.propagation import propagation_strip
from sslab.platform.runtime import Runtime, distribute, make_runtime, native_bf16, process_rss_mb, say
from sslab.platform.spec import TrialSpec
from sslab.platform.streaming import epoch_batches, epoch_order, rank_batches, stream_decoder
from sslab.platform.tracking import COLLAPSE_TAG
from sslab.platform.trial_log import TrialLogger
from sslab.platform.workdir import is_disk_full


class EpochMeter:
    """Sums per-step metrics on the device; one host sync when read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in {"loss": loss.detach(), **metrics}.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[key] = self.sums.get(key, 0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: (v / max(1, self.count)).item() for k, v in self.sums.items()}


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


@dataclass
class Trainer:
    """What an epoch needs: the method, what computes its loss (the method, or DDP around it),
    the optimiser, the data and the schedule; `step` counts optimiser steps across epochs."""

    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Dataset
    study: StudyConfig
    runtime: Runtime
    steps_per_epoch: int
    step: int = 0
    checkpoint: Path | None = None  # where `train.checkpoint_every_steps` saves inside an epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.study.train.epochs

    def learning_rate(self) -> float:
        train = self.study.train
        warmup = int(train.warmup_epochs * self.steps_per_epoch)
        return cosine_schedule(self.step, self.total_steps, scaled_lr(train), 0.0, warmup)

    def weight_decay_factor(self) -> float:
        """This step's weight decay over train.weight_decay (1 unless train.weight_decay_end)."""
        train = self.study.train
        if train.weight_decay_end is None:
            return 1.0
        return cosine_schedule(self.step, self.total_steps, 1.0, train.weight_decay_end / train.weight_decay)


# The trial process's memory: at the start (in a reused Tune process, what earlier trials left) and
# after each epoch.
RSS_AT_START, RSS = "process_rss_start_mb", "process_rss_mb"


def train_loop(spec: TrialSpec) -> dict:
    """Pretrains one trial; returns the last epoch's metrics (on rank 0)."""
    started, rss_at_start = time.perf_counter(), process_rss_mb()
    study = spec.study
    runtime = make_runtime(spec.runtime, study.train, spec.name, spec.tune_checkpoints)
    if study.train.amp and not native_bf16(runtime.device):
        say(
            runtime,
            f"train.amp: {runtime.device} has no native bf16 (emulated bf16 is slower): training in fp32",
        )
        study = dataclasses.replace(study, train=dataclasses.replace(study.train, amp=False))
    train = study.train
    if runtime.device.type == "cpu" and train.cpus_per_worker:
        torch.set_num_threads(max(1, round(train.cpus_per_worker)))  # Ray sets 1 by default

    data = load_dataset(study.data)
    if runtime.device.type == "cuda":  # uint8 on the GPU (150 MB for CIFAR); streamed files stay files
        if torch.is_tensor(data.train_images):
            data.train_images = data.train_images.to(runtime.device)
        if torch.is_tensor(data.pretrain_images):
            data.pretrain_images = data.pretrain_images.to(runtime.device)
    steps_per_epoch = len(data.ssl_images) // train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size={train.batch_size} exceeds the {len(data.ssl_images)} training images"
        )

    torch.manual_seed(train.seed)  # same initial weights on every rank
    method = build_method(study, data, runtime.device, steps_per_epoch * train.epochs, runtime.world_size)
    optimizer = build_optimizer(method, train)
    checkpoint = Path(spec.trial_dir) / CHECKPOINT_NAME
    if runtime.tune_checkpoints:
        adopt_tune_checkpoint(checkpoint)
    start_epoch, step = 0, 0
    if has_checkpoint(checkpoint):
        start_epoch, step = load_checkpoint(checkpoint, method, optimizer, runtime.device)
        if start_epoch >= train.epochs:
            # Finished before a restart whose scheduler had not yet recorded it: nothing to do,
            # and its MLflow run stays as it ended.
            say(runtime, f"already complete ({checkpoint})")
            return {}
        within = step - start_epoch * steps_per_epoch  # > 0: saved inside epoch start_epoch + 1
        say(
            runtime,
            f"resumed from {checkpoint} after epoch {start_epoch}" + (f", step {within}" if within else ""),
        )
    if train.compile:
        method.backbone.compile()  # in place: state-dict keys (checkpoints) unchanged
    trainer = Trainer(
        method,
        distribute(method, runtime),
        optimizer,
        data,
        study,
        runtime,
        steps_per_epoch,
        step,
        checkpoint,
    )
    logger = TrialLogger(spec.tracking, runtime, study, data)
    logger.log_once({RSS_AT_START: rss_at_start}, start_epoch, RSS_AT_START)
    if method.uses_labels():
        logger.tag("sslab.uses_labels", method.uses_labels())
    decoder = stream_decoder(data.ssl_images, study.data.stream_engine)
    if decoder:
        logger.tag("sslab.stream_decoder", decoder)
    say(
        runtime,
        f"{study.method} on {data.describe()}; {train.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {train.batch_size} on {runtime.world_size} worker(s), {runtime.device}",
    )

    latest_knn: dict = {}  # every report carries the latest kNN: schedulers compare trials on it
    if start_epoch == 0 and study.eval.random_init_baseline and runtime.is_main:
        baseline, _ = protocol_eval(method, data, study, runtime.device, prefix=RANDOM_INIT)
        say(runtime, "random init: " + _format(baseline))
        # Schedulers rank on the monitor's own keys from the start; MLflow gets only the
        # random_init_ ones, so a trial stopped before its first kNN epoch shows no trained kNN.
        latest_knn = monitor_keys(baseline, prefix=RANDOM_INIT)
        logger.log_once(baseline, 0, RANDOM_INIT + next(iter(latest_knn)))

    metrics: dict = {}
    mutated = spec.logged_values()  # PBT: this trial's current values of the mutated keys
    try:
        for epoch in range(start_epoch + 1, train.epochs + 1):
            metrics = run_epoch(trainer, epoch)
            is_last = epoch == train.epochs
            if runtime.is_main:
                metrics |= epoch_evaluation(trainer, logger, epoch, is_last)
            latest_knn.update(monitor_keys(metrics))
            metrics |= mutated
            metrics["trial_seconds"] = time.perf_counter() - started  # this run of the loop so far
            metrics[RSS] = process_rss_mb()
            # Log before the checkpoint: a crash in between re-runs this epoch, whose metrics
            # are then skipped as already logged (never lost, never twice).
            logger.log(metrics, epoch)
            saved = runtime.is_main and (is_last or epoch % train.checkpoint_every == 0)
            if saved:
                save_checkpoint(checkpoint, method, optimizer, epoch, trainer.step)
            say(runtime, "epoch " + _format(metrics))
            if is_last and runtime.is_main:
                logger.tag(COLLAPSE_TAG, method.collapse_state(metrics))
                logger.log_outputs(method, study, data, checkpoint)
            runtime.report(latest_knn | metrics, epoch, is_last, checkpoint.parent if saved else None)
    except BaseException as err:
        if is_disk_full(err):
            raise  # nothing more can be written: the driver ends the runs once it freed room
        # The time it trained, also when it fails or is stopped: the study's accounting would
        # otherwise count it as Ray's overhead.
        elapsed = {"trial_seconds": time.perf_counter() - started}
        logger.log_once(elapsed, trainer.step // steps_per_epoch + 1, "trial_seconds")
        # Under Ray the driver knows how the trial ended (stopped early by a scheduler: KILLED;
        # crashed: FAILED) and closes the run; a status set here could land after its own.
        if runtime.kind == "local":
            logger.end("FAILED")
        logger.stop_monitor()  # its thread would outlive the trial in a reused Tune process
        raise
    logger.end("FINISHED")
    return metrics


def epoch_evaluation(trainer: Trainer, logger: TrialLogger, epoch: int, is_last: bool) -> dict:
    """Rank 0, after an epoch: every protocol and the method's samples at the end, every protocol
    at the probe epochs (`eval.probe_at`), the kNN monitor every `eval.knn_every` epochs."""
    method, data, study, runtime = trainer.method, trainer.data, trainer.study, trainer.runtime
    if is_last or epoch in probe_epochs(study):
        probe, subsets = protocol_eval(method, data, study, runtime.device, prefix=EVAL)
        if is_last:
            logger.log_artifact_once(subsets, "eval/label_subsets.json")
            with eval_mode(method):
                logger.log_images(method.artifacts(data))
            if data.kind == "video":
                with eval_mode(method):
                    strip = propagation_strip(method.dense_features, data, runtime.device, study.eval)
                logger.log_images({"propagation": strip})
        # the monitor's keys too (knn_top1, student_knn_top1, propagation_j): its curves run to the end
        monitored = {k.removeprefix(EVAL): v for k, v in probe.items() if MONITOR.search(k)}
        return probe | monitored
    if study.eval.knn_every and epoch % study.eval.knn_every == 0:
        return knn_eval(method, data, study, runtime.device)
    return {}


def probe_epochs(study: StudyConfig) -> set[int]:
    """The epochs that end the fractions of training in `eval.probe_at` (at least epoch 1)."""
    epochs = study.train.epochs
    return {max(1, math.ceil(fraction * epochs - 1e-9)) for fraction in study.eval.probe_at}


def train_step(
    model: nn.Module,
    method: Method,
    optimizer,
    images: torch.Tensor,
    step: int,
    index: torch.Tensor,
    amp: bool,
) -> tuple[torch.Tensor, dict]:
    """One optimisation step: the loss from `model` (the method, or DDP around it), backward,
    the method's gradient hook, the optimiser, then its EMA/queue update."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, metrics = model(images, step, index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step(step)
    optimizer.step()
    method.on_step_end(step)
    return loss, metrics


def progress_line(
    trainer: Trainer, epoch: int, steps_done: int, loss: float, seconds: float, timed: int | None = None
) -> str:
    """ "epoch 3/30 step 10/19 loss 1.234 | 44 img/s | epoch 0:21 left, trial 47:02 left": the
    time left at this epoch's pace (training steps only; evaluations add to it). `timed`: the
    steps `seconds` covers (fewer than `steps_done` in an epoch resumed part-way)."""
    timed = timed or steps_done
    train, per_step = trainer.study.train, seconds / timed
    trial_steps_left = trainer.total_steps - trainer.step
    return (
        f"epoch {epoch}/{train.epochs} step {steps_done}/{trainer.steps_per_epoch} loss {loss:.4f} | "
        f"{timed * train.batch_size / max(seconds, 1e-9):.0f} img/s | "
        f"epoch {clock((trainer.steps_per_epoch - steps_done) * per_step)} left, "
        f"trial {clock(trial_steps_left * per_step)} left"
    )


def clock(seconds: float) -> str:
    """12:05 or 1:02:05 (h:mm:ss)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def run_epoch(trainer: Trainer, epoch: int) -> dict:
    """One pass over the training set: each rank takes its slice of every global batch, in an
    order that is a pure function of (seed, epoch), so an epoch resumed from a checkpoint saved
    inside it continues with the batch after the saved one."""
    train, runtime, data = trainer.study.train, trainer.runtime, trainer.data
    trainer.method.train()
    first = trainer.step - (epoch - 1) * trainer.steps_per_epoch  # > 0: resumed inside this epoch
    images_of = data.ssl_images  # the pretraining folder's, or the labelled training split
    order = epoch_order(len(images_of), train.seed, epoch).to(images_of.device)  # once, not per step
    indices = rank_batches(
        order, train.batch_size, trainer.steps_per_epoch, runtime.rank, runtime.world_size, first
    )
    # Augmentation draws: fresh per epoch, rank and (after a resume) starting step.
    torch.manual_seed(train.seed * 1_000_003 + epoch * 1009 + runtime.rank + first * 7919)
    meter, started, peak_lr = EpochMeter(), time.perf_counter(), scaled_lr(train)
    data_cfg = trainer.study.data
    batches = epoch_batches(
        images_of, indices, data_cfg.stream_workers, runtime.device, data_cfg.stream_engine
    )
    for i, (index, images) in enumerate(zip(indices, batches), start=first):
        lr = trainer.learning_rate()
        set_learning_rate(trainer.optimizer, lr, peak_lr)
        if train.weight_decay_end is not None:
            scale_weight_decay(trainer.optimizer, trainer.weight_decay_factor())
        images = images.to(runtime.device, non_blocking=True)
        loss, step_metrics = train_step(
            trainer.model,
            trainer.method,
            trainer.optimizer,
            images,
            trainer.step,
            index.to(runtime.device),
            train.amp,
        )
        meter.add(loss, step_metrics)
        trainer.step += 1
        if (i + 1) % train.report_every_steps == 0 or i + 1 == trainer.steps_per_epoch:
            so_far = meter.means()  # one host sync per k steps, also the non-finite check
            if not math.isfinite(so_far["loss"]):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i + 1}")
            seconds = time.perf_counter() - started
            say(runtime, progress_line(trainer, epoch, i + 1, so_far["loss"], seconds, i + 1 - first))
        every = train.checkpoint_every_steps
        if every and trainer.step % every == 0 and i + 1 < trainer.steps_per_epoch and runtime.is_main:
            save_checkpoint(trainer.checkpoint, trainer.method, trainer.optimizer, epoch - 1, trainer.step)
    seconds = time.perf_counter() - started
    metrics = meter.means()
    metrics.update(
        epoch=epoch,
        optimizer_steps=trainer.step,  # probes are plotted against these
        lr=lr,
        peak_lr=peak_lr,
        epoch_seconds=seconds,
        images_per_s=len(indices) * train.batch_size / seconds,
    )
    return metrics
