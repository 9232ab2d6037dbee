"""Split-brain autoencoder: Zhang, Isola & Efros 2017, Split-Brain Autoencoders: Unsupervised
Learning by Cross-Channel Prediction."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Encoder, Method, MethodContext
from sslab.methods.colorization import (
    ab_bins,
    dense_head,
    dense_logits,
    lightness_input,
    nearest_bin,
    rgb_to_lab,
)
from sslab.platform.augment import CROP_FLIP, AugmentRecipe
from sslab.platform.config import check


def ab_input(lab: torch.Tensor) -> torch.Tensor:
    """ab (about -110..110) -> a 3-channel input (a, b, 0) of unit scale."""
    ab = lab[:, 1:] / 110
    return torch.cat([ab, torch.zeros_like(ab[:, :1])], dim=1)


def lightness_bins(lab: torch.Tensor, count: int) -> torch.Tensor:
    """L in [0, 100] -> class index in [0, count) (equal-width bins)."""
    return (lab[:, 0] / 100 * count).long().clamp(0, count - 1)


def fresh_copy(module: nn.Module) -> nn.Module:
    """Same architecture, its own newly initialised weights."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return twin


@dataclass
class SplitBrainArgs:
    grid: int = check(default=10, gt=0)  # ab bins for L -> ab
    lightness_bins: int = check(default=50, ge=2)  # L classes for ab -> L (the paper: 50)
    output_stride: int = check(default=2, ge=1)


class SplitBrain(Method):
    """Two networks split the channels: one predicts ab from L, the other L from ab, each as a
    per-pixel classification (cross-entropy, the paper's better loss, Sec. 3.2). Evaluation uses
    both: their pooled features concatenated."""

    name = "split_brain"
    Args = SplitBrainArgs

    def __init__(self, args: SplitBrainArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.ab_backbone = fresh_copy(ctx.backbone)  # the ab -> L half
        self.register_buffer("bins", ab_bins(args.grid).clone())
        self.ab_head = dense_head(ctx.feature_dim, len(self.bins))  # L -> ab
        self.l_head = dense_head(ctx.feature_dim, args.lightness_bins)  # ab -> L
        self.target_size = ctx.image_size // args.output_stride

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return CROP_FLIP

    def training_step(self, images, step, index=None):
        lab = rgb_to_lab(self.augment.unit(images))
        size = self.target_size
        target = F.interpolate(lab, size=(size, size), mode="area")
        ab_logits = dense_logits(self.backbone, self.ab_head, lightness_input(lab), size)
        l_logits = dense_logits(self.ab_backbone, self.l_head, ab_input(lab), size)
        ab_loss = F.cross_entropy(ab_logits.float(), nearest_bin(target[:, 1:], self.bins))
        l_loss = F.cross_entropy(l_logits.float(), lightness_bins(target, self.args.lightness_bins))
        return ab_loss + l_loss, {"ab_loss": ab_loss.detach(), "l_loss": l_loss.detach()}

    def encoder(self) -> Encoder:
        return Encoder(
            BothHalves(self.backbone, self.ab_backbone),
            2 * self.feature_dim,
            lambda images: rgb_to_lab(self.normalize.to_unit(images)),
        )


class BothHalves(nn.Module):
    """Lab images -> the L network's and the ab network's pooled features, concatenated (Sec. 3.3)."""

    def __init__(self, l_network: nn.Module, ab_network: nn.Module):
        super().__init__()
        self.l_network, self.ab_network = l_network, ab_network

    def forward(self, lab: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.l_network(lightness_input(lab)), self.ab_network(ab_input(lab))], dim=1)
