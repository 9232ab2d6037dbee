"""DINO: Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Encoder, Method, MethodContext
from sslab.methods.ema import ema_update, frozen_copy
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, in_fp32
from sslab.platform.augment import AugmentRecipe, View
from sslab.platform.config import check
from sslab.platform.distributed import mean_over_ranks
from sslab.platform.optim import cosine_schedule

# Collapse, read from the last epoch's diagnostics (Sec. 5.3 / Fig. 7).
UNIFORM_ENTROPY = 0.97  # teacher entropy at >= 97% of log K: every prototype equally likely
ONE_HOT_ENTROPY = 0.03  # <= 3% of log K: one prototype takes every image
KL_COLLAPSED = 0.01  # nats: the student matches the teacher, nothing left to learn from it


@dataclass
class DINOArgs:
    out_dim: int = check(default=4096, gt=0)  # K prototypes (paper: 65536)
    hidden_dim: int = check(default=2048, gt=0)
    bottleneck_dim: int = check(default=256, gt=0)
    head_layers: int = check(default=3, ge=1)  # MLP layers before the bottleneck
    head_batch_norm: bool = False  # BN in the MLP (convnets)
    norm_last_layer: bool = True  # fixed-norm prototypes (DINO's code)
    student_temp: float = check(default=0.1, gt=0)
    teacher_temp: float = check(default=0.04, gt=0)  # after the warm-up
    warmup_teacher_temp: float = check(default=0.04, gt=0)
    teacher_temp_warmup: float = check(default=0.3, ge=0, le=1)  # fraction of training
    freeze_last_layer: float = check(default=0.01, ge=0, le=1)  # fraction of training (paper: 1 epoch)
    center_momentum: float = check(default=0.9, ge=0, le=1)
    momentum_teacher: float = check(default=0.996, ge=0, le=1)  # rises to 1 (cosine)
    local_crops: int = check(default=4, ge=0)
    local_crop_size: Optional[int] = check(default=None, ge=8)  # None: the paper's 96/224 of the image
    eval_on: Literal["teacher", "student"] = "teacher"  # the paper evaluates the teacher
    # Each student parameter's gradient norm capped at this (DINO's code, clip_grad 3.0: per
    # parameter, not the global norm); 0: off.
    clip_grad: float = check(default=3.0, ge=0)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to K dimensions (Sec. 3.1)."""

    def __init__(self, in_dim: int, args: DINOArgs):
        super().__init__()
        self.mlp = projection_head(
            "mlp",
            in_dim,
            args.hidden_dim,
            args.bottleneck_dim,
            depth=args.head_layers,
            batch_norm=args.head_batch_norm,
            activation=nn.GELU,
        )
        self.last = nn.utils.parametrizations.weight_norm(
            nn.Linear(args.bottleneck_dim, args.out_dim, bias=False)
        )
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(not args.norm_last_layer)
        # DINO's code initialises the MLP's linear layers with a truncated normal (std 0.02):
        # PyTorch's default (std ~1/sqrt(3 fan_in)) starts every prototype score far larger.
        for layer in self.mlp.modules():
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


@in_fp32
def dino_loss(
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO eq. (1)/(3): sum over teacher global views x and student views x' != x of
    H(P_t(x), P_s(x')) = -sum P_t log P_s, with P_t = softmax((g_t - c) / tau_t) (centred,
    sharpened) and P_s = softmax(g_s / tau_s); averaged over pairs and the batch."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher_out]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    total, pairs = 0.0, 0
    for i, target in enumerate(targets):
        for j, log_p in enumerate(log_probs):
            if i == j:  # the same global view
                continue
            total = total + (-target * log_p).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


class DINO(Method):
    """Student and EMA teacher; teacher outputs centred and sharpened; multi-crop."""

    name = "dino"
    Args = DINOArgs
    # DINO's code (main_dino.py): AdamW at lr 5e-4 per 256 images scaled linearly, 10 warm-up
    # epochs, weight decay on a cosine from 0.04 to 0.4 (biases and norms undecayed). Small images:
    # SGD at 0.06 without warm-up, where DINO learned on CIFAR-10 here (reports/
    # dino_byol_small_images, issue #21).
    train_recipe = {
        "optimizer": "adamw",
        "lr": 5e-4,
        "lr_scaling": "linear",
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "warmup_epochs": 10,
    }
    small_image_train_recipe = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "warmup_epochs": 0}

    def __init__(self, args: DINOArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.head = DINOHead(ctx.feature_dim, args)
        self.teacher_backbone, self.teacher_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, args.out_dim))
        self._teacher_mean = None

    @classmethod
    def small_image_args(cls) -> dict:
        # Measured on CIFAR-10 at 32 px (issue #21, reports/dino_byol_small_images): with the
        # paper's ImageNet recipe the teacher stays uniform for hundreds of steps; a 2-layer BN
        # head (the convnet variant), 2048 prototypes, no 12 px local crops, no frozen prototypes
        # and a faster teacher (0.99, as solo-learn's CIFAR configs) learn from the first epochs.
        return {
            "local_crops": 0,
            "freeze_last_layer": 0.0,
            "head_layers": 2,
            "head_batch_norm": True,
            "out_dim": 2048,
            "momentum_teacher": 0.99,
        }

    @classmethod
    def views(cls, args, image_size):
        """Multi-crop (Sec. 3.1 and DINO's code): two global crops, scale (0.4, 1), one always
        blurred and one rarely blurred but sometimes solarised; `local_crops` small crops, scale
        (0.05, 0.4), blur 0.5. A study changes any of them under `augment.views.<name>`."""
        blur = 1.0 if image_size > cls.SMALL_IMAGE_SIZE else 0.0  # no blur at 32 px (SimCLR App. B.9)
        first = AugmentRecipe(crop_scale_min=0.4, jitter_strength=0.5, blur_p=blur)
        second = dataclasses.replace(first, blur_p=0.1 * blur, solarize_p=0.2)
        local = dataclasses.replace(first, crop_scale_min=0.05, crop_scale_max=0.4, blur_p=0.5 * blur)
        local_size = args.local_crop_size or max(8, image_size * 96 // 224 // 2 * 2)
        return {
            "global_1": View(first),
            "global_2": View(second),
            "local": View(local, size=local_size, count=args.local_crops),
        }

    def teacher_temp(self, step: int) -> float:
        """Linear warm-up from warmup_teacher_temp, then constant (Sec. 3.1, DINO's code)."""
        a = self.args
        return cosine_schedule(
            step,
            self.total_steps,
            a.teacher_temp,
            a.teacher_temp,
            int(a.teacher_temp_warmup * self.total_steps),
            a.warmup_teacher_temp,
        )

    def training_step(self, images, step, index=None):
        globals_ = [self.views["global_1"](images), self.views["global_2"](images)]
        locals_ = [self.views["local"](images) for _ in range(self.args.local_crops)]
        # Same-size crops go through the backbone together (one batch per resolution).
        student = self.head(self.backbone(torch.cat(globals_))).chunk(2)
        if locals_:
            student = student + self.head(self.backbone(torch.cat(locals_))).chunk(len(locals_))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(globals_))).chunk(2)
        loss = dino_loss(
            list(student), list(teacher), self.center, self.args.student_temp, self.teacher_temp(step)
        )
        self._teacher_mean = torch.cat(teacher).float().mean(dim=0, keepdim=True)
        entropy = torch.stack([_entropy(t, self.center, self.teacher_temp(step)) for t in teacher]).mean()
        return loss, {
            "z_std": embedding_std(student[0]),
            "teacher_entropy": entropy,
            # KL(P_t || P_s) = H(P_t, P_s) - H(P_t): DINO Fig. 7's diagnostic. It falls to 0 in
            # both collapses (the student matches a uniform or a one-hot teacher) and stays
            # positive while the teacher has something to teach.
            "teacher_student_kl": loss.detach() - entropy,
        }

    def collapse_state(self, metrics):
        """DINO's two collapses (Sec. 5.3, Fig. 7): the student matches a teacher whose output is
        uniform over the K prototypes, or one-hot; while it learns, KL(teacher || student) > 0."""
        entropy, kl = metrics.get("teacher_entropy"), metrics.get("teacher_student_kl")
        if entropy is None or kl is None:
            return super().collapse_state(metrics)
        ratio = entropy / math.log(self.args.out_dim)
        if kl < KL_COLLAPSED and ratio >= UNIFORM_ENTROPY:
            return "collapsed (uniform)"
        if kl < KL_COLLAPSED and ratio <= ONE_HOT_ENTROPY:
            return "collapsed (one-hot)"
        return "learning"

    def before_optimizer_step(self, step):
        if self.args.clip_grad:
            clip_each_gradient(self.parameters(), self.args.clip_grad)
        # The prototypes stay fixed at first: DINO's code (`freeze_last_layer`, one epoch) does so to
        # stabilise the start of training. Gradients set to None are skipped by the optimiser.
        if step < self.args.freeze_last_layer * self.total_steps:
            for p in self.head.last.parameters():
                p.grad = None

    @torch.no_grad()
    def on_step_end(self, step):
        momentum = cosine_schedule(step, self.total_steps, start=self.args.momentum_teacher, end=1.0)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        if self._teacher_mean is not None:
            self.update_center(self._teacher_mean)
            self._teacher_mean = None

    @torch.no_grad()
    def update_center(self, batch_mean: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean of the teacher outputs over the global batch (eq. 4)."""
        batch_mean = mean_over_ranks(batch_mean)
        self.center.mul_(self.args.center_momentum).add_(batch_mean, alpha=1 - self.args.center_momentum)

    def encoder(self) -> Encoder:
        backbone = self.teacher_backbone if self.args.eval_on == "teacher" else self.backbone
        return Encoder(backbone, self.feature_dim, self.normalize)

    def monitored_encoders(self) -> dict[str, Encoder]:
        # The teacher and the student learn at different times (the teacher lags, then leads):
        # the kNN monitor follows the one evaluation does not measure too.
        other = "student" if self.args.eval_on == "teacher" else "teacher"
        backbone = self.backbone if other == "student" else self.teacher_backbone
        return {other: Encoder(backbone, self.feature_dim, self.normalize)}


@torch.no_grad()
def clip_each_gradient(parameters, max_norm: float) -> None:
    """Scales each parameter's gradient down to L2 norm `max_norm` where it is larger, one
    parameter at a time (DINO's `clip_gradients`; torch's clip_grad_norm_ caps the global norm)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


def _entropy(logits, center, temperature) -> torch.Tensor:
    """Mean entropy of the teacher's sharpened output: collapse to uniform drives it to log K,
    collapse to one dimension to 0 (DINO Sec. 5.3)."""
    p = F.softmax((logits.detach().float() - center) / temperature, dim=-1)
    return -(p * torch.log(p + 1e-12)).sum(dim=-1).mean()
