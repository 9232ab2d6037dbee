"""MoCo v3: Chen, Xie & He 2021, An Empirical Study of Training Self-Supervised Vision Transformers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.ema import ema_update, frozen_copy
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, moco_v3_contrastive
from sslab.platform.config import check
from sslab.platform.optim import cosine_schedule


@dataclass
class MoCoV3Args:
    temperature: float = check(default=0.2, gt=0)  # paper: 0.2 (ViT), 1.0 in its ResNet-50 recipe
    momentum: float = check(default=0.99, ge=0, le=1)  # rises to 1 on a cosine (Sec. 5)
    proj_hidden_dim: int = check(default=4096, gt=0)
    proj_dim: int = check(default=256, gt=0)
    pred_hidden_dim: int = check(default=4096, gt=0)


class MoCoV3(Method):
    """No queue: each query is contrasted with the momentum encoder's keys of the same (global)
    batch, symmetrised over the two views; a predictor on the query branch. ResNet or ViT.

    Conventions (the authors' facebookresearch/moco-v3, main_moco.py): ResNet on LARS at lr 0.6
    per 256 images scaled linearly, weight decay 1e-6, 10 warm-up epochs, LARS's adaptation and
    the decay on weights only (`p.ndim > 1`: the platform's groups); the loss scaled by 2 tau; the
    momentum on a half cosine to 1. Their ResNet temperature is 1.0 and projector 2 layers; sslab
    keeps the ViT's 0.2 and 3 layers for both. A ViT study sets the ViT recipe: `optimizer:
    adamw, lr: 1.5e-4, weight_decay: 0.1, warmup_epochs: 40` (the authors decay every parameter
    there). At 32 px sslab's defaults (SGD) until a CIFAR recipe is measured here."""

    name = "moco_v3"
    Args = MoCoV3Args
    train_recipe = {
        "optimizer": "lars",
        "lr": 0.6,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "warmup_epochs": 10,
    }
    small_image_train_recipe = {}

    def __init__(self, args: MoCoV3Args, ctx: MethodContext):
        super().__init__(args, ctx)
        # The paper's MLPs: BN in every layer, the projector's last one without affine.
        self.projector = nn.Sequential(
            projection_head("mlp", ctx.feature_dim, args.proj_hidden_dim, args.proj_dim, depth=3),
            nn.BatchNorm1d(args.proj_dim, affine=False),
        )
        self.predictor = projection_head("mlp", args.proj_dim, args.pred_hidden_dim, args.proj_dim, depth=2)
        self.key_backbone, self.key_projector = frozen_copy(self.backbone), frozen_copy(self.projector)

    def training_step(self, images, step, index=None):
        v1, v2 = self.augment(images), self.augment(images)
        q1, q2 = self.predictor(self.projector(self.backbone(torch.cat([v1, v2])))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_projector(self.key_backbone(torch.cat([v1, v2]))).chunk(2)
        t = self.args.temperature
        loss = moco_v3_contrastive(q1, k2, t) + moco_v3_contrastive(q2, k1, t)  # Algorithm 1
        return loss, {"z_std": embedding_std(q1), "momentum": torch.tensor(self.momentum(step))}

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, start=self.args.momentum, end=1.0)

    @torch.no_grad()
    def on_step_end(self, step):
        m = self.momentum(step)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)
