"""SimSiam: Chen & He 2021, Exploring Simple Siamese Representation Learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, negative_cosine
from sslab.platform.config import check


@dataclass
class SimSiamArgs:
    proj_layers: int = check(default=3, ge=2)  # ImageNet: 3; CIFAR: 2 (Sec. 5, App.)
    proj_dim: int = check(default=2048, gt=0)
    pred_hidden_dim: int = check(default=512, gt=0)  # the predictor's bottleneck (Sec. 4.4)


class SimSiam(Method):
    """Two views; a predictor on one branch regresses the other's projection under a
    stop-gradient (eq. 3), symmetrised; no negatives, no momentum encoder."""

    name = "simsiam"
    Args = SimSiamArgs

    @classmethod
    def small_image_args(cls) -> dict:
        return {"proj_layers": 2}  # the paper's CIFAR-10 projector (App. D)

    def __init__(self, args: SimSiamArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        dim = args.proj_dim
        # The projector ends in BN without affine, as the paper's code; the predictor has BN inside.
        self.projector = nn.Sequential(
            projection_head("mlp", ctx.feature_dim, dim, dim, depth=args.proj_layers),
            nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = projection_head("mlp", dim, args.pred_hidden_dim, dim, depth=2)

    def training_step(self, images, step, index=None):
        v1, v2 = self.augment(images), self.augment(images)
        z1, z2 = self.projector(self.backbone(torch.cat([v1, v2]))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2  # eq. (2), stop-grad on z
        return loss, {"z_std": embedding_std(z1)}
