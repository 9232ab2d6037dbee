"""The one training loop, method-agnostic: in-process, inside a Tune trial, or as a Ray Train worker.

`train_loop(config)` takes a plain dict (so Ray can ship it) made by `trial_config`:
    study     the resolved study dict of this trial (seed and swept values applied)
    trial_dir absolute folder of this trial's checkpoint
    tracking  TrialTracking fields, or None to log nothing
    runtime   "local" | "tune" | "train": where metrics are reported besides MLflow
Ray is imported only when the runtime needs it, so the loop runs with torch alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.registry import get_method_class
from sslab.platform.augment import Augment, Normalize, channel_stats
from sslab.platform.backbones import build_backbone
from sslab.platform.config import StudyConfig, TrainConfig, build_study, get_dotted
from sslab.platform.data import Dataset, atomic_torch_save, load_dataset
from sslab.platform.evaluate import eval_mode, run_protocols
from sslab.platform.tracking import TrialTracking

CHECKPOINT_NAME = "checkpoint.pt"


def trial_config(study: StudyConfig, trial_dir: Path, tracking: TrialTracking | None,
                 runtime: str = "local") -> dict:
    return {"study": study.to_dict(), "trial_dir": str(Path(trial_dir).resolve()),
            "tracking": dataclasses.asdict(tracking) if tracking else None, "runtime": runtime}


# ----------------------------------------------------------------------------- runtime

@dataclass
class Runtime:
    """Where this process runs: its rank, the world size, the device, and how it reports."""
    kind: str
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        if self.kind == "tune":
            import ray.tune
            checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.tune.report(metrics, checkpoint=checkpoint)
        elif self.kind == "train":
            import ray.train
            ray.train.report(metrics)   # a barrier: every rank calls it


def make_runtime(kind: str, train: TrainConfig) -> Runtime:
    if kind == "train":
        import ray.train.torch
        return Runtime(kind, dist.get_rank(), dist.get_world_size(), ray.train.torch.get_device())
    use_cuda = train.use_gpu and torch.cuda.is_available()
    return Runtime(kind, 0, 1, torch.device("cuda" if use_cuda else "cpu"))


# ----------------------------------------------------------------------------- building

def build_method(study: StudyConfig, data: Dataset, device: torch.device, total_steps: int,
                 world_size: int = 1) -> Method:
    method_cls = get_method_class(study.method)
    args = method_cls.Args(**study.method_args)
    backbone, feature_dim = build_backbone(study.backbone, data.image_size)
    mean, std = channel_stats(data.train_images)
    normalize = Normalize(mean, std, channels_last=study.train.channels_last)
    recipe = method_cls.augment_recipe(args).with_overrides(study.augment)
    augment = Augment(recipe, data.image_size, normalize)
    ctx = MethodContext(backbone, feature_dim, data.image_size, normalize, augment,
                        total_steps, world_size, dataset=data)
    method = method_cls(args, ctx).to(device)
    if study.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def param_groups(method: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay (and no LARS adaptation) for biases and normalisation parameters."""
    decay, no_decay = [], []
    for param in method.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR and BYOL."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    p_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, 1.0)
                    update = update.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(method: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(method, train.weight_decay)
    if train.optimizer == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    if train.optimizer == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=train.lr)
    return LARS(groups, lr=train.lr, momentum=train.momentum)


def scaled_lr(train: TrainConfig) -> float:
    """The peak learning rate after the batch-size scaling rule."""
    ratio = train.batch_size / 256
    return train.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[train.lr_scaling]


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero (SimCLR App. B.1)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- DDP and checkpoints

def wrap_ddp(method: Method, runtime: Runtime) -> None:
    """Wraps only the gradient-trained submodules in DDP; EMA copies and buffers stay outside."""
    if runtime.world_size == 1:
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # No buffer sync in forward: each rank keeps its own BN statistics (as SimCLR's per-device
    # BN), and a forward on one rank alone (kNN on rank 0) needs no collective. torch >= 2.14
    # names this forward_sync_buffers; older releases broadcast_buffers.
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else {"broadcast_buffers": False})
    for name in method.ddp_modules:
        module = getattr(method, name)
        if any(p.requires_grad for p in module.parameters()):
            setattr(method, name, DDP(module, device_ids=device_ids, **no_sync))


@contextlib.contextmanager
def unwrapped(method: Method):
    """The method with its DDP wrappers removed for the block (checkpoints, evaluation)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapped = {n: getattr(method, n) for n in method.ddp_modules if isinstance(getattr(method, n), DDP)}
    for name, ddp in wrapped.items():
        setattr(method, name, ddp.module)
    try:
        yield method
    finally:
        for name, ddp in wrapped.items():
            setattr(method, name, ddp)


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(path: Path, method: Method, optimizer, epoch: int, step: int) -> None:
    """Atomic, and the one before is kept: a checkpoint damaged after it was written (a full
    disk, a copy cut short) costs one checkpoint interval, not the run."""
    with unwrapped(method):
        state = {"epoch": epoch, "step": step, "method": method.state_dict(),
                 "optimizer": optimizer.state_dict()}
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
        except Exception as err:   # truncated or corrupt: torch raises several kinds
            print(f"warning: {candidate} is unreadable ({type(err).__name__}: {str(err)[:120]}); "
                  "falling back to the previous checkpoint", file=sys.stderr, flush=True)
            continue
        with unwrapped(method):
            method.load_state_dict(state["method"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state["epoch"], state["step"]
    raise FileNotFoundError(f"no readable checkpoint at {path} or {previous_checkpoint(path)}")


def evaluate_checkpoint(study: StudyConfig, data: Dataset, checkpoint: Path | None,
                        device: torch.device, prefix: str = "eval/") -> tuple[dict[str, float], dict, int]:
    """The study's protocols on a checkpoint's encoder (None: random initialisation).
    Returns (metrics, label subsets, epochs the checkpoint had trained)."""
    torch.manual_seed(study.train.seed)
    method = build_method(study, data, device, total_steps=1)
    epoch = 0
    if checkpoint is not None:
        epoch, _ = load_checkpoint(checkpoint, method, None, device)
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


def protocol_eval(method: Method, data: Dataset, study: StudyConfig, runtime: Runtime,
                  prefix: str) -> tuple[dict[str, float], dict]:
    """Every evaluation protocol of the study (kNN always), keys prefixed."""
    with unwrapped(method):
        metrics, subsets = run_protocols(method, data, study.eval, runtime.device, seed=study.train.seed,
                                         amp=study.train.amp, prefix=prefix)
        with eval_mode(method):
            metrics |= {prefix + k: v for k, v in method.evaluate(data).items()}
    return metrics, subsets


class TrialLogger:
    """Rank 0's MLflow child run; epochs already logged (before a restart) are not logged twice."""

    def __init__(self, tracking: dict | None, runtime: Runtime, study: StudyConfig):
        self.tracker = self.run_id = None
        self.logged: set[int] = set()
        if tracking is None or not runtime.is_main:
            return
        from sslab.platform.tracking import Tracker

        spec = TrialTracking(**tracking)
        self.tracker = Tracker(spec.uri)
        self.run_id, created = self.tracker.find_or_create_child(spec)
        if created:
            self.tracker.log_dict(self.run_id, study.to_dict(), "config.json")
        else:
            self.logged = self.tracker.logged_steps(self.run_id, "loss")

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

    def end(self, status: str) -> None:
        if self.tracker:
            self.tracker.end(self.run_id, status)


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def say(runtime: Runtime, name: str, text: str) -> None:
    if runtime.is_main:
        print(f"[{name}] {text}", flush=True)


def train_loop(config: dict) -> dict:
    """Pretrains one trial; returns the last epoch's metrics (on rank 0)."""
    study = build_study(config["study"], source="<trial>")
    runtime = make_runtime(config.get("runtime", "local"), study.train)
    train = study.train
    name = (config.get("tracking") or {}).get("trial_name") or study.name
    if runtime.device.type == "cpu" and train.cpus_per_worker:
        torch.set_num_threads(max(1, round(train.cpus_per_worker)))   # Ray sets 1 by default

    data = load_dataset(study.data)
    if runtime.device.type == "cuda":
        data.train_images = data.train_images.to(runtime.device)   # uint8 on the GPU: 150 MB for CIFAR
    local_batch = train.batch_size // runtime.world_size
    steps_per_epoch = len(data.train_images) // train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={train.batch_size} exceeds the {len(data.train_images)} training images")
    total_steps = steps_per_epoch * train.epochs

    torch.manual_seed(train.seed)                      # same initial weights on every rank
    method = build_method(study, data, runtime.device, total_steps, runtime.world_size)
    optimizer = build_optimizer(method, train)
    checkpoint = Path(config["trial_dir"]) / CHECKPOINT_NAME
    tune_checkpoints = runtime.kind == "tune" and config.get("tune_checkpoints", False)
    if tune_checkpoints:
        adopt_tune_checkpoint(checkpoint)
    start_epoch, step = 0, 0
    if has_checkpoint(checkpoint):
        start_epoch, step = load_checkpoint(checkpoint, method, optimizer, runtime.device)
        if start_epoch >= train.epochs:
            # Finished before a restart whose scheduler had not yet recorded it: nothing to do,
            # and its MLflow run stays as it ended.
            say(runtime, name, f"already complete ({checkpoint})")
            return {}
        say(runtime, name, f"resumed from {checkpoint} after epoch {start_epoch}")
    if train.compile:
        method.backbone.compile()   # in place: state-dict keys (checkpoints) unchanged
    wrap_ddp(method, runtime)
    logger = TrialLogger(config.get("tracking"), runtime, study)
    say(runtime, name, f"{study.method} on {data.describe()}; {train.epochs} epochs x "
                       f"{steps_per_epoch} steps, batch {train.batch_size} on {runtime.world_size} "
                       f"worker(s), {runtime.device}")

    latest_knn: dict = {}   # every report carries the latest kNN: schedulers compare trials on it
    if start_epoch == 0 and study.eval.random_init_baseline and runtime.is_main:
        baseline, _ = protocol_eval(method, data, study, runtime, prefix="random_init_")
        say(runtime, name, "random init: " + _format(baseline))
        logger.log_once(baseline | {"knn_top1": baseline["random_init_knn_top1"]}, 0, "random_init_knn_top1")
        latest_knn = {"knn_top1": baseline["random_init_knn_top1"], "knn_top5": baseline["random_init_knn_top5"]}

    warmup_steps = int(train.warmup_epochs * steps_per_epoch)
    metrics: dict = {}
    try:
        for epoch in range(start_epoch + 1, train.epochs + 1):
            metrics, step = run_epoch(method, optimizer, data, study, runtime, epoch, step,
                                      steps_per_epoch, local_batch, total_steps, warmup_steps, name)
            is_last = epoch == train.epochs
            if runtime.is_main and is_last:
                final, subsets = protocol_eval(method, data, study, runtime, prefix="eval/")
                metrics |= final | {"knn_top1": final["eval/knn_top1"], "knn_top5": final["eval/knn_top5"]}
                logger.log_artifact_once(subsets, "eval/label_subsets.json")
                with unwrapped(method), eval_mode(method):
                    logger.log_images(method.artifacts(data))
            elif runtime.is_main and study.eval.knn_every and epoch % study.eval.knn_every == 0:
                metrics.update(knn_eval(method, data, study, runtime))
            latest_knn.update({k: v for k, v in metrics.items() if k.startswith("knn_")})
            metrics |= {f"hp/{k}": float(get_dotted(config["study"], k)) for k in config.get("logged_keys", [])}
            # Log before the checkpoint: a crash in between re-runs this epoch, whose metrics
            # are then skipped as already logged (never lost, never twice).
            logger.log(metrics, epoch)
            saved = runtime.is_main and (is_last or epoch % train.checkpoint_every == 0)
            if saved:
                save_checkpoint(checkpoint, method, optimizer, epoch, step)
            say(runtime, name, "epoch " + _format(metrics))
            # PBT's clock: the last epoch reports just under its number, so that the population is
            # never perturbed after it (a copied finished trial would have nothing left to train).
            pbt_clock = {"pbt_epoch": epoch - 0.5 if is_last else epoch} if tune_checkpoints else {}
            identity = {"sslab_trial": name} if runtime.kind == "tune" else {}   # Tune results -> our trials
            runtime.report(latest_knn | metrics | pbt_clock | identity,
                           checkpoint.parent if saved and tune_checkpoints else None)
    except BaseException:
        # Under Ray the driver knows how the trial ended (stopped early by a scheduler: KILLED;
        # crashed: FAILED) and closes the run; a status set here could land after its own.
        if runtime.kind == "local":
            logger.end("FAILED")
        raise
    logger.end("FINISHED")
    return metrics


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
            partial.replace(path)   # atomic: a crash leaves the old checkpoint or the new one


def train_step(method: Method, optimizer, images: torch.Tensor, step: int, index: torch.Tensor,
               amp: bool) -> tuple[torch.Tensor, dict]:
    """One optimisation step: the method's loss, backward, optimiser, then its EMA/queue update."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, metrics = method.training_step(images, step, index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with unwrapped(method):
        method.before_optimizer_step(step)
    optimizer.step()
    with unwrapped(method):
        method.on_step_end(step)
    return loss, metrics


def run_epoch(method, optimizer, data, study, runtime, epoch, step, steps_per_epoch, local_batch,
              total_steps, warmup_steps, name) -> tuple[dict, int]:
    train = study.train
    method.train()
    # Same permutation on every rank (seeded by seed and epoch); each rank takes its slice.
    generator = torch.Generator().manual_seed(train.seed * 100_003 + epoch)
    order = torch.randperm(len(data.train_images), generator=generator)
    torch.manual_seed(train.seed * 1_000_003 + epoch * 1009 + runtime.rank)   # augmentation draws
    meter, started = EpochMeter(), time.perf_counter()
    for i in range(steps_per_epoch):
        lr = learning_rate(step, total_steps, warmup_steps, scaled_lr(train))
        for group in optimizer.param_groups:
            group["lr"] = lr
        begin = i * train.batch_size + runtime.rank * local_batch
        index = order[begin:begin + local_batch].to(data.train_images.device)
        images = data.train_images[index].to(runtime.device, non_blocking=True)
        loss, step_metrics = train_step(method, optimizer, images, step, index, train.amp)
        meter.add(loss, step_metrics)
        step += 1
        if (i + 1) % train.report_every_steps == 0 or i + 1 == steps_per_epoch:
            so_far = meter.means()   # one host sync per k steps, also the non-finite check
            if not math.isfinite(so_far["loss"]):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i + 1}")
            say(runtime, name, f"epoch {epoch}/{train.epochs} step {i + 1}/{steps_per_epoch} "
                               f"loss {so_far['loss']:.4f}")
    seconds = time.perf_counter() - started
    metrics = meter.means()
    metrics.update(epoch=epoch, lr=lr, peak_lr=scaled_lr(train), epoch_seconds=seconds,
                   images_per_s=steps_per_epoch * train.batch_size / seconds)
    return metrics, step
