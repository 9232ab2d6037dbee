"""The one training loop, method-agnostic: in-process, inside a Tune trial, or as a Ray Train worker.

`train_loop(config)` takes a plain dict (so Ray can ship it) made by `trial_config`:
    study     the resolved study dict of this trial (seed and swept values applied)
    trial_dir absolute folder of this trial's checkpoint
    tracking  TrialTracking fields, or None to log nothing
    runtime   "local" | "tune" | "train": where metrics are reported besides MLflow
Ray is imported only when the runtime needs it, so the loop runs with torch alone.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.registry import get_method_class
from sslab.platform import distributed
from sslab.platform.augment import Normalize, build_views, channel_stats
from sslab.platform.backbones import build_backbone
from sslab.platform.config import StudyConfig, TrainConfig, build_study, get_dotted
from sslab.platform.data import Dataset, atomic_torch_save, load_dataset
from sslab.platform.evaluate import eval_mode, run_protocols
from sslab.platform.optim import build_optimizer, cosine_schedule, scaled_lr
from sslab.platform.streaming import epoch_batches, epoch_order, rank_batches, stream_decoder
from sslab.platform.tracking import MONITOR, TrialTracking, monitor_keys

CHECKPOINT_NAME = "checkpoint.pt"


def trial_config(
    study: StudyConfig, trial_dir: Path, tracking: TrialTracking | None, runtime: str = "local"
) -> dict:
    return {
        "study": study.to_dict(),
        "trial_dir": str(Path(trial_dir).resolve()),
        "tracking": dataclasses.asdict(tracking) if tracking else None,
        "runtime": runtime,
    }


# ----------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where this process runs (rank, world size, device) and where its epochs are reported:
    nowhere else ("local", also under torchrun), to Tune ("tune") or to Ray Train ("train").
    The loop reports every epoch the same way; what each place needs is decided here."""

    kind: str
    rank: int
    world_size: int
    device: torch.device
    trial_name: str = ""
    tune_checkpoints: bool = False  # PBT: Tune hands checkpoints from trial to trial

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def adopt_checkpoint(self, path: Path) -> None:
        if self.tune_checkpoints:
            adopt_tune_checkpoint(path)

    def report(self, metrics: dict, epoch: int, is_last: bool, checkpoint_dir: Path | None) -> None:
        """One epoch's metrics; `checkpoint_dir` where this epoch saved one."""
        if self.kind == "tune":
            import ray.tune

            extra = {"sslab_trial": self.trial_name}  # Tune results -> our trials
            if self.tune_checkpoints:
                # PBT's clock: the last epoch reports just under its number, so that the population
                # is never perturbed after it (a copied finished trial would have nothing to train).
                extra["pbt_epoch"] = epoch - 0.5 if is_last else epoch
            given = checkpoint_dir if self.tune_checkpoints else None
            ray.tune.report(metrics | extra, checkpoint=given and ray.tune.Checkpoint.from_directory(given))
        elif self.kind == "train":
            import ray.train

            ray.train.report(metrics)  # a barrier: every rank calls it


def make_runtime(
    kind: str, train: TrainConfig, trial_name: str = "", tune_checkpoints: bool = False
) -> Runtime:
    """kind "train": a Ray Train worker; otherwise this process, in a process group if one was
    started (torchrun, or the DDP tests) and alone if not."""
    if kind == "train":
        import ray.train.torch

        device = ray.train.torch.get_device()
    elif train.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    return Runtime(
        kind,
        distributed.rank(),
        distributed.world_size(),
        device,
        trial_name,
        tune_checkpoints=kind == "tune" and tune_checkpoints,
    )


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it (Ampere on), or a CPU
    with AVX512-BF16 or AMX (Linux, where /proc/cpuinfo says). Elsewhere bf16 is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # e.g. Apple's MPS: bf16 is the device's own business
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------- building


def build_method(
    study: StudyConfig, data: Dataset, device: torch.device, total_steps: int, world_size: int = 1
) -> Method:
    method_cls = get_method_class(study.method)
    args = method_cls.Args(**study.method_args)
    backbone, feature_dim = build_backbone(study.backbone, data.image_size)
    mean, std = channel_stats(data.ssl_images)  # of what training sees
    normalize = Normalize(mean, std, channels_last=study.train.channels_last)
    views = build_views(method_cls.views(args, data.image_size), study.augment, data.image_size, normalize)
    ctx = MethodContext(
        backbone,
        feature_dim,
        data.image_size,
        normalize,
        views.get("view") or next(iter(views.values())),
        total_steps,
        world_size,
        dataset=data,
        views=views,
    )
    method = method_cls(args, ctx).to(device)
    if study.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


# ----------------------------------------------------------------------------- DDP and checkpoints


def distribute(method: Method, runtime: Runtime) -> nn.Module:
    """What the loop calls for a training step: the method, or under several workers DDP around
    the whole method (its forward is the training step). Hooks, checkpoints and evaluation keep
    using `method` itself, as DINO's and MAE's reference trainers keep `model_without_ddp`."""
    if runtime.world_size == 1:
        return method
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # No buffer sync in forward: each rank keeps its own BN statistics (as SimCLR's per-device
    # BN), and a forward on one rank alone (kNN on rank 0) needs no collective. torch >= 2.14
    # names this forward_sync_buffers; older releases broadcast_buffers.
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(method, device_ids=device_ids, **no_sync)


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


def method_from_checkpoint(
    study: StudyConfig, data: Dataset, checkpoint: Path | None, device: torch.device
) -> tuple[Method, int]:
    """The study's method with a checkpoint's weights (None: as initialised), and the epochs
    the checkpoint had trained."""
    method = build_method(study, data, device, total_steps=1)
    epoch = 0 if checkpoint is None else load_checkpoint(checkpoint, method, None, device)[0]
    return method, epoch


def evaluate_checkpoint(
    study: StudyConfig, data: Dataset, checkpoint: Path | None, device: torch.device, prefix: str = "eval/"
) -> tuple[dict[str, float], dict, int]:
    """The study's protocols on a checkpoint's encoder (None: random initialisation).
    Returns (metrics, label subsets, epochs the checkpoint had trained)."""
    torch.manual_seed(study.train.seed)
    method, epoch = method_from_checkpoint(study, data, checkpoint, device)
    runtime = Runtime("local", 0, 1, device)
    metrics, subsets = protocol_eval(method, data, study, runtime, prefix)
    return metrics, subsets, epoch


# ----------------------------------------------------------------------------- the loop


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


def knn_eval(method: Method, data: Dataset, study: StudyConfig, runtime: Runtime) -> dict[str, float]:
    """The per-epoch monitor: weighted kNN on eval-mode features, plus the method's own."""
    knn_only = dataclasses.replace(study.eval, protocols=["knn"], label_fractions=[1.0])
    return protocol_eval(method, data, dataclasses.replace(study, eval=knn_only), runtime, prefix="")[0]


def protocol_eval(
    method: Method, data: Dataset, study: StudyConfig, runtime: Runtime, prefix: str
) -> tuple[dict[str, float], dict]:
    """Every evaluation protocol of the study (kNN always), keys prefixed."""
    metrics, subsets = run_protocols(
        method, data, study.eval, runtime.device, seed=study.train.seed, amp=study.train.amp, prefix=prefix
    )
    with eval_mode(method):
        metrics |= {prefix + k: v for k, v in method.evaluate(data).items()}
    return metrics, subsets


class TrialLogger:
    """Rank 0's MLflow child run; epochs already logged (before a restart) are not logged twice."""

    def __init__(self, tracking: dict | None, runtime: Runtime, study: StudyConfig):
        self.tracker = self.run_id = self.monitor = None
        self.logged: set[int] = set()
        if tracking is None or not runtime.is_main:
            return
        from sslab.platform.tracking import Tracker

        spec = TrialTracking(**tracking)
        self.tracker = Tracker(spec.uri)
        self.run_id, created = self.tracker.find_or_create_child(spec)
        # What the trial computed with: concurrent trials must not oversubscribe the cores.
        self.tracker.set_tag(self.run_id, "sslab.torch_threads", torch.get_num_threads())
        self.monitor = self.tracker.system_metrics(self.run_id)
        if created:
            self.tracker.log_dict(self.run_id, study.to_dict(), "config.json")
        else:
            self.logged = self.tracker.logged_steps(self.run_id, "loss")

    def tag(self, key: str, value: str) -> None:
        if self.tracker:
            self.tracker.set_tag(self.run_id, key, value)

    def log(self, metrics: dict, epoch: int) -> None:
        if self.tracker and epoch not in self.logged:
            self.tracker.log_metrics(self.run_id, metrics, step=epoch)
            self.logged.add(epoch)

    def log_once(self, metrics: dict, epoch: int, key: str) -> None:
        if self.tracker and epoch not in self.tracker.logged_steps(self.run_id, key):
            self.tracker.log_metrics(self.run_id, metrics, step=epoch)

    def log_artifact_once(self, data: dict, path: str) -> None:
        if self.tracker and data:
            self.tracker.log_dict(self.run_id, data, path)

    def log_images(self, images: dict) -> None:
        for name, image in images.items():
            if self.tracker:
                self.tracker.log_image(self.run_id, image, f"samples/{name}.png")

    def log_outputs(self, method: Method, study: StudyConfig, data: Dataset, checkpoint: Path) -> None:
        """After training: the export (`encoder/`: weights in torchvision/timm layout, input
        statistics, loader), the checkpoint (`checkpoint/`: `sslab eval` and `sslab export`
        against a remote store) and the encoder as an MLflow model, registered if asked."""
        if not self.tracker:
            return
        from sslab.platform.export import EncoderModule, write_export

        folder = checkpoint.parent / "encoder"
        write_export(method, study, folder, run_id=self.run_id)
        self.tracker.log_artifacts(self.run_id, folder, "encoder")
        self.tracker.client.log_artifact(self.run_id, str(checkpoint), "checkpoint")
        if not study.log_model:
            return
        # A CPU copy in fp32, eval mode: what a user loads (the trained method stays as it is).
        module = copy.deepcopy(EncoderModule(method.encoder())).cpu().float().eval()
        example = data.example_images(2).cpu().float() / 255  # RGB in [0, 1]
        try:
            description = f"{study.method} encoder of study {study.name}" + (
                f": {study.description}" if study.description else ""
            )
            uri = self.tracker.log_encoder_model(
                self.run_id, module, example, study.register_model, description
            )
        except Exception as err:  # the weights are safe in encoder/ and checkpoint/: warn, go on
            print(f"warning: MLflow model logging failed ({type(err).__name__}: {err})", file=sys.stderr)
            return
        self.tracker.set_tag(self.run_id, "sslab.model_uri", uri)

    def end(self, status: str) -> None:
        if self.tracker:
            if self.monitor:
                self.monitor.finish()
            self.tracker.end(self.run_id, status)


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def say(runtime: Runtime, text: str) -> None:
    if runtime.is_main:
        print(f"[{runtime.trial_name}] {text}", flush=True)


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


def train_loop(config: dict) -> dict:
    """Pretrains one trial; returns the last epoch's metrics (on rank 0)."""
    started = time.perf_counter()
    study = build_study(config["study"], source="<trial>")
    name = (config.get("tracking") or {}).get("trial_name") or study.name
    runtime = make_runtime(
        config.get("runtime", "local"), study.train, name, config.get("tune_checkpoints", False)
    )
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
    checkpoint = Path(config["trial_dir"]) / CHECKPOINT_NAME
    runtime.adopt_checkpoint(checkpoint)
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
    logger = TrialLogger(config.get("tracking"), runtime, study)
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
        baseline, _ = protocol_eval(method, data, study, runtime, prefix="random_init_")
        say(runtime, "random init: " + _format(baseline))
        # Schedulers rank on the monitor's own keys from the start; MLflow gets only the
        # random_init_ ones, so a trial stopped before its first kNN epoch shows no trained kNN.
        latest_knn = monitor_keys(baseline, prefix="random_init_")
        logger.log_once(baseline, 0, "random_init_" + next(iter(latest_knn)))

    metrics: dict = {}
    try:
        for epoch in range(start_epoch + 1, train.epochs + 1):
            metrics = run_epoch(trainer, epoch)
            is_last = epoch == train.epochs
            if runtime.is_main:
                metrics |= epoch_evaluation(trainer, logger, epoch, is_last)
            latest_knn.update(monitor_keys(metrics))
            metrics |= {
                f"hp/{k}": float(get_dotted(config["study"], k)) for k in config.get("logged_keys", [])
            }
            metrics["trial_seconds"] = time.perf_counter() - started  # this run of the loop so far
            # Log before the checkpoint: a crash in between re-runs this epoch, whose metrics
            # are then skipped as already logged (never lost, never twice).
            logger.log(metrics, epoch)
            saved = runtime.is_main and (is_last or epoch % train.checkpoint_every == 0)
            if saved:
                save_checkpoint(checkpoint, method, optimizer, epoch, trainer.step)
            say(runtime, "epoch " + _format(metrics))
            if is_last and runtime.is_main:
                logger.log_outputs(method, study, data, checkpoint)
            runtime.report(latest_knn | metrics, epoch, is_last, checkpoint.parent if saved else None)
    except BaseException:
        # Under Ray the driver knows how the trial ended (stopped early by a scheduler: KILLED;
        # crashed: FAILED) and closes the run; a status set here could land after its own.
        if runtime.kind == "local":
            logger.end("FAILED")
        raise
    logger.end("FINISHED")
    return metrics


def epoch_evaluation(trainer: Trainer, logger: TrialLogger, epoch: int, is_last: bool) -> dict:
    """Rank 0, after an epoch: every protocol and the method's samples at the end, every protocol
    at the probe epochs (`eval.probe_at`), the kNN monitor every `eval.knn_every` epochs."""
    method, data, study, runtime = trainer.method, trainer.data, trainer.study, trainer.runtime
    if is_last or epoch in probe_epochs(study):
        probe, subsets = protocol_eval(method, data, study, runtime, prefix="eval/")
        if is_last:
            logger.log_artifact_once(subsets, "eval/label_subsets.json")
            with eval_mode(method):
                logger.log_images(method.artifacts(data))
            if data.kind == "video":
                from sslab.platform.propagation import propagation_strip

                with eval_mode(method):
                    strip = propagation_strip(method.dense_features, data, runtime.device, study.eval)
                logger.log_images({"propagation": strip})
        # the monitor's keys too (knn_top1, student_knn_top1, propagation_j): its curves run to the end
        monitored = {k.removeprefix("eval/"): v for k, v in probe.items() if MONITOR.search(k)}
        return probe | monitored
    if study.eval.knn_every and epoch % study.eval.knn_every == 0:
        return knn_eval(method, data, study, runtime)
    return {}


def probe_epochs(study: StudyConfig) -> set[int]:
    """The epochs that end the fractions of training in `eval.probe_at` (at least epoch 1)."""
    epochs = study.train.epochs
    return {max(1, math.ceil(fraction * epochs - 1e-9)) for fraction in study.eval.probe_at}


def adopt_tune_checkpoint(path: Path) -> None:
    """The checkpoint Tune hands this trial (after a restore, or under PBT another trial's that it
    now continues) replaces the trial's own."""
    import shutil

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
    meter, started = EpochMeter(), time.perf_counter()
    data_cfg = trainer.study.data
    batches = epoch_batches(
        images_of, indices, data_cfg.stream_workers, runtime.device, data_cfg.stream_engine
    )
    for i, (index, images) in enumerate(zip(indices, batches), start=first):
        lr = trainer.learning_rate()
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
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
        peak_lr=scaled_lr(train),
        epoch_seconds=seconds,
        images_per_s=len(indices) * train.batch_size / seconds,
    )
    return metrics
