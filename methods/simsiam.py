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
    # The authors' recipe (main_simsiam.py, paper Sec. 4 and App. D): SGD, momentum 0.9, lr 0.05
    # per 256 images scaled linearly, weight decay 1e-4, no warm-up, cosine decay; CIFAR-10 lr 0.03
    # and weight decay 5e-4. (sslab's cosine steps per optimiser step, the authors' per epoch.)
    train_recipe = {
        "optimizer": "sgd",
        "lr": 0.05,
        "lr_scaling": "linear",
        "weight_decay": 1e-4,
        "warmup_epochs": 0,
    }
    small_image_train_recipe = train_recipe | {"lr": 0.03, "weight_decay": 5e-4}

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

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """As the authors' code: weight decay on every parameter, biases and BatchNorm included,
        and the predictor at the peak rate throughout (`--fix-pred-lr`, their recommended setting;
        Table 1 of the paper: a decayed predictor rate does a little worse)."""
        predictor = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in predictor]
        return [
            {"params": rest, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": list(self.predictor.parameters()), "weight_decay": weight_decay, "fixed_lr": True},
        ]

    def training_step(self, images, step, index=None):
        v1, v2 = self.augment(images), self.augment(images)
        z1, z2 = self.projector(self.backbone(torch.cat([v1, v2]))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2  # eq. (2), stop-grad on z
        return loss, {"z_std": embedding_std(z1)}
