"""Optimisers and schedules: parameter groups, LARS, and the one warm-up + cosine schedule that
drives the learning rate, EMA momentum (BYOL, DINO) and DINO's teacher temperature."""

from __future__ import annotations

import math

import torch
from torch import nn

from sslab.platform.config import TrainConfig


def cosine_schedule(
    step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_from: float = 0.0
) -> float:
    """Linear warm-up from `warmup_from` to `start` over `warmup_steps`, then a half cosine from
    `start` to `end` over the remaining steps (SimCLR App. B.1 for the learning rate; BYOL eq. in
    Sec. 3.2 for tau, start tau_base, end 1; DINO's teacher temperature: start = end after warm-up)."""
    if step < warmup_steps:
        return warmup_from + (start - warmup_from) * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def scaled_lr(train: TrainConfig) -> float:
    """The peak learning rate after the batch-size scaling rule (SimCLR App. B.1)."""
    ratio = train.batch_size / 256
    return train.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[train.lr_scaling]


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from 0, then cosine decay to zero."""
    return cosine_schedule(step, total_steps, base_lr, 0.0, warmup_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay (and so no LARS adaptation) for biases and normalisation parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017), as SimCLR and BYOL use it:
    trust ratio eta * ||w|| / ||g + wd w||, skipped for groups marked `lars_exclude` (biases and
    norms, which are not decayed either). timm's `Lars` was considered: its denominator is
    ||g|| + wd ||w||, not the norm of the update the paper scales."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                lars_exclude=False,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    p_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where(
                        (p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm, 1.0
                    )
                    update = update.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """The study's optimiser over the method's parameter groups (its own, or `param_groups`)."""
    own = getattr(model, "optimizer_groups", None)
    groups = (own and own(train.weight_decay)) or param_groups(model, train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, train.adamw_beta2))
    return LARS(groups, lr=train.lr, momentum=train.momentum, trust_coefficient=train.lars_eta)


def scale_weight_decay(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Each group's decay at `factor` times the one it was built with (undecayed groups stay 0)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = group.setdefault("base_weight_decay", group["weight_decay"]) * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, peak: float) -> None:
    """This step's rate on every group; a `fixed_lr` group stays at the peak (SimSiam's predictor)."""
    for group in optimizer.param_groups:
        group["lr"] = peak if group.get("fixed_lr") else lr
