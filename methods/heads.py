"""Projection heads shared by the contrastive and self-distillation methods."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from sslab.methods.base import Method, MethodContext


def projection_head(
    kind: str,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    depth: int = 2,
    batch_norm: bool = True,
    activation: Callable[[], nn.Module] = partial(nn.ReLU, inplace=True),
) -> nn.Module:
    """none: identity; linear: one layer; mlp: `depth` layers with BN + `activation` between them."""
    if kind == "none":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    layers, dim = [], in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        layers += [activation()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class TwoProjectedViews(Method):
    """Two augmented views of each image through the backbone and a wide MLP projector
    (`proj_hidden_dim`, `proj_dim`, `proj_layers` in the Args): Barlow Twins and VICReg differ
    only in the loss they put on the two embeddings."""

    # CIFAR: solo-learn's recipe for both (LARS, lr 0.3 at batch 256 scaled linearly, weight decay
    # 1e-4, eta 0.02), warm-up 1 epoch for short studies. SGD at SimCLR's lr 0.5 diverges within
    # an epoch for VICReg, whose loss is ~25x SimCLR's scale.
    small_image_train_recipe = {
        "optimizer": "lars",
        "lr": 0.3,
        "lr_scaling": "linear",
        "weight_decay": 1e-4,
        "lars_eta": 0.02,
        "warmup_epochs": 1,
    }

    @classmethod
    def small_image_args(cls) -> dict:
        return {"proj_hidden_dim": 2048, "proj_dim": 2048}  # solo-learn's CIFAR projector (8192 on ImageNet)

    def __init__(self, args, ctx: MethodContext):
        super().__init__(args, ctx)
        self.projector = projection_head(
            "mlp", ctx.feature_dim, args.proj_hidden_dim, args.proj_dim, depth=args.proj_layers
        )

    def projected_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = self.augment(images), self.augment(images)
        z1, z2 = self.projector(self.backbone(torch.cat([v1, v2]))).chunk(2)
        return z1, z2
