"""SimCLR: Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Encoder, Method, MethodContext
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, nt_xent
from sslab.platform.config import check


@dataclass
class SimCLRArgs:
    temperature: float = check(default=0.5, gt=0)
    projection: Literal["none", "linear", "mlp"] = "mlp"
    proj_depth: int = check(default=2, ge=2)  # layers of the MLP head (SimCLR v1: 2)
    proj_hidden_dim: int = check(default=512, gt=0)
    proj_dim: int = check(default=128, gt=0)
    eval_on: Literal["h", "z"] = "h"  # backbone output h or head output z (Sec. 4.2)


class SimCLR(Method):
    """Two augmented views per image; NT-Xent between their projections, eq. (1)."""

    name = "simclr"
    Args = SimCLRArgs
    # CIFAR: SGD at lr 0.5, weight decay 5e-4, 1 warm-up epoch: the recipe the quickstart and
    # sslab's CIFAR-10 reports measured (SimCLR's own App. B.9 uses LARS at batch 512-4096).
    small_image_train_recipe = {"optimizer": "sgd", "lr": 0.5, "weight_decay": 5e-4, "warmup_epochs": 1}
    # ImageNet (Sec. 4 and App. B.1): LARS at 0.3 per 256 images scaled linearly, weight decay
    # 1e-6, 10 warm-up epochs; the authors' code keeps biases and BatchNorm out of the decay and of
    # LARS's adaptation (the platform's groups).
    train_recipe = {
        "optimizer": "lars",
        "lr": 0.3,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "warmup_epochs": 10,
    }

    def __init__(self, args: SimCLRArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.head = projection_head(
            args.projection, ctx.feature_dim, args.proj_hidden_dim, args.proj_dim, depth=args.proj_depth
        )

    def training_step(self, images, step, index=None):
        v1, v2 = self.augment(images), self.augment(images)
        z = self.head(self.backbone(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.args.temperature)
        pos_sim = F.cosine_similarity(z1.detach().float(), z2.detach().float()).mean()
        return loss, {"pos_sim": pos_sim, "z_std": embedding_std(z)}

    def encoder(self) -> Encoder:
        if self.args.eval_on == "h":
            return super().encoder()
        dim = self.feature_dim if self.args.projection == "none" else self.args.proj_dim
        return Encoder(nn.Sequential(self.backbone, self.head), dim, self.normalize)  # z (Sec. 4.2)
