"""BYOL: Grill et al. 2020, Bootstrap Your Own Latent."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sslab.methods.base import Encoder, Method, MethodContext
from sslab.methods.ema import ema_update, frozen_copy
from sslab.methods.heads import projection_head
from sslab.methods.losses import byol_regression, embedding_std
from sslab.platform.augment import AugmentRecipe, View
from sslab.platform.config import check
from sslab.platform.optim import cosine_schedule


@dataclass
class BYOLArgs:
    tau_base: float = check(default=0.99, ge=0, le=1)  # target EMA, rises to 1 (cosine)
    proj_hidden_dim: int = check(default=4096, gt=0)
    proj_dim: int = check(default=256, gt=0)
    pred_hidden_dim: int = check(default=4096, gt=0)


class BYOL(Method):
    """Online (backbone, projector, predictor) regresses the EMA target's projection; no negatives."""

    name = "byol"
    Args = BYOLArgs
    # BYOL App. C: LARS at lr 0.2 per 256 images scaled linearly, weight decay 1.5e-6, 10 warm-up
    # epochs, biases and BatchNorm out of the decay and of LARS's adaptation (sslab's default
    # groups). Small images: SGD at 0.06 without warm-up, where BYOL learned on CIFAR-10 here
    # (reports/dino_byol_small_images, issue #21).
    train_recipe = {
        "optimizer": "lars",
        "lr": 0.2,
        "lr_scaling": "linear",
        "weight_decay": 1.5e-6,
        "warmup_epochs": 10,
    }
    small_image_train_recipe = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "warmup_epochs": 0}

    def __init__(self, args: BYOLArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.projector = projection_head("mlp", ctx.feature_dim, args.proj_hidden_dim, args.proj_dim)
        self.predictor = projection_head("mlp", args.proj_dim, args.pred_hidden_dim, args.proj_dim)
        self.target_backbone, self.target_projector = frozen_copy(self.backbone), frozen_copy(self.projector)

    @classmethod
    def views(cls, args, image_size):
        # BYOL's two views are augmented differently (Table 6): blur 1.0 / 0.1, solarize 0 / 0.2.
        # No blur at 32 px (SimCLR App. B.9; solo-learn's CIFAR recipe): an 8 px kernel erases the image.
        blur = 1.0 if image_size > cls.SMALL_IMAGE_SIZE else 0.0
        first = AugmentRecipe(jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=blur)
        second = dataclasses.replace(first, blur_p=0.1 * blur, solarize_p=0.2)
        return {"first": View(first), "second": View(second)}

    def training_step(self, images, step, index=None):
        v1, v2 = self.views["first"](images), self.views["second"](images)
        z = self.projector(self.backbone(torch.cat([v1, v2])))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(torch.cat([v1, v2]))).chunk(2)
        loss = byol_regression(p1, t2) + byol_regression(p2, t1)  # symmetrised, L + L~
        return loss, {"z_std": embedding_std(z), "tau": torch.tensor(self.tau(step))}

    def monitored_encoders(self) -> dict[str, Encoder]:
        # The paper evaluates the online encoder; the target (an average of it) is followed too.
        return {"target": Encoder(self.target_backbone, self.feature_dim, self.normalize)}

    def tau(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, start=self.args.tau_base, end=1.0)  # BYOL Sec. 3.2

    @torch.no_grad()
    def on_step_end(self, step):
        tau = self.tau(step)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
