"""VICReg: Bardes, Ponce & LeCun 2022, Variance-Invariance-Covariance Regularization."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslab.methods.base import Method, MethodContext
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, vicreg_loss
from sslab.platform.config import check


@dataclass
class VICRegArgs:
    sim_weight: float = check(default=25.0, ge=0)  # lambda
    var_weight: float = check(default=25.0, ge=0)  # mu
    cov_weight: float = check(default=1.0, ge=0)  # nu
    proj_hidden_dim: int = check(default=8192, gt=0)
    proj_dim: int = check(default=8192, gt=0)
    proj_layers: int = check(default=3, ge=1)


class VICReg(Method):
    """Two views; their embeddings are pulled together (invariance) while each branch keeps
    every dimension's std above 1 (variance) and its dimensions decorrelated (covariance)."""

    name = "vicreg"
    Args = VICRegArgs

    @classmethod
    def small_image_args(cls) -> dict:
        return {"proj_hidden_dim": 2048, "proj_dim": 2048}  # solo-learn's CIFAR projector

    def __init__(self, args: VICRegArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.projector = projection_head(
            "mlp", ctx.feature_dim, args.proj_hidden_dim, args.proj_dim, depth=args.proj_layers
        )

    def training_step(self, images, step, index=None):
        v1, v2 = self.augment(images), self.augment(images)
        z1, z2 = self.projector(self.backbone(torch.cat([v1, v2]))).chunk(2)
        a = self.args
        loss, terms = vicreg_loss(z1, z2, a.sim_weight, a.var_weight, a.cov_weight)
        return loss, terms | {"z_std": embedding_std(z1)}
