"""Barlow Twins: Zbontar et al. 2021, Self-Supervised Learning via Redundancy Reduction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslab.methods.base import Method, MethodContext
from sslab.methods.heads import projection_head
from sslab.methods.losses import barlow_twins_loss, embedding_std
from sslab.platform.config import check


@dataclass
class BarlowTwinsArgs:
    lambd: float = check(default=0.0051, ge=0)  # off-diagonal weight (paper: 5e-3)
    proj_hidden_dim: int = check(default=8192, gt=0)
    proj_dim: int = check(default=8192, gt=0)
    proj_layers: int = check(default=3, ge=1)


class BarlowTwins(Method):
    """Two views; the cross-correlation of their batch-standardised embeddings is pushed to the
    identity: invariance on the diagonal, redundancy reduction off it."""

    name = "barlow_twins"
    Args = BarlowTwinsArgs

    @classmethod
    def small_image_args(cls) -> dict:
        return {"proj_hidden_dim": 2048, "proj_dim": 2048}  # solo-learn's CIFAR projector

    def __init__(self, args: BarlowTwinsArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.projector = projection_head(
            "mlp", ctx.feature_dim, args.proj_hidden_dim, args.proj_dim, depth=args.proj_layers
        )

    def training_step(self, images, step, index=None):
        v1, v2 = self.augment(images), self.augment(images)
        z1, z2 = self.projector(self.backbone(torch.cat([v1, v2]))).chunk(2)
        return barlow_twins_loss(z1, z2, self.args.lambd), {"z_std": embedding_std(z1)}
