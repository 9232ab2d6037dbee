"""Momentum (EMA) encoders and their schedules, shared by MoCo, BYOL and DINO."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy trained only by EMA: no gradients, so DDP and the optimiser leave it alone."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online (MoCo eq. 2), parameters only.

    Buffers (BN running statistics) are the target's own, kept by its forward passes in train
    mode: the online network's statistics belong to the online weights, and an EMA network
    evaluated with them (DINO's teacher) computes features with mismatched normalisation."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
