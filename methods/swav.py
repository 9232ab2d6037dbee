"""SwAV: Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, sinkhorn_knopp, swapped_prediction
from sslab.platform.augment import AugmentRecipe, View
from sslab.platform.config import check


@dataclass
class SwAVArgs:
    num_prototypes: int = check(default=3000, gt=0)  # K
    proj_hidden_dim: int = check(default=2048, gt=0)
    proj_dim: int = check(default=128, gt=0)
    temperature: float = check(default=0.1, gt=0)  # tau of the swapped prediction
    epsilon: float = check(default=0.05, gt=0)  # Sinkhorn's entropic regularisation
    sinkhorn_iterations: int = check(default=3, ge=1)
    # A queue of past global-crop embeddings joins the batch in Sinkhorn when batches are small
    # (paper: 3840 at batch 256, from epoch 15 of 100); 0: none.
    queue_size: int = check(default=0, ge=0)
    queue_start: float = check(default=0.15, ge=0, le=1)  # fraction of training
    freeze_prototypes: float = check(default=0.01, ge=0, le=1)  # fraction of training (paper: 1 epoch)
    local_crops: int = check(default=6, ge=0)  # multi-crop: 2 global + this many small crops
    local_crop_size: Optional[int] = check(default=None, ge=8)  # None: 96/224 of the image


class SwAV(Method):
    """Online clustering: each global crop's codes (Sinkhorn-Knopp over the batch, equal
    partition of the prototypes) are predicted from every other crop's prototype scores.

    Conventions (the authors' facebookresearch/swav, main_swav.py): SGD wrapped in LARC (trust
    0.001, no clipping) over every parameter, biases and BatchNorm included in the decay and the
    adaptation (`decay_all_parameters`); base lr 4.8 at batch 4,096 (0.3 per 256, scaled
    linearly), weight decay 1e-6, 10 warm-up epochs, cosine decay; the prototypes frozen for the
    first epoch and l2-normalised every step. At 32 px sslab's defaults (SGD) until a CIFAR
    recipe is measured here."""

    name = "swav"
    Args = SwAVArgs
    decay_all_parameters = True
    train_recipe = {
        "optimizer": "lars",
        "lr": 0.3,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "warmup_epochs": 10,
    }
    small_image_train_recipe = {}

    @classmethod
    def small_image_args(cls) -> dict:
        return {"local_crops": 0}  # solo-learn's CIFAR recipe: two 32 px crops

    def __init__(self, args: SwAVArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.projector = projection_head("mlp", ctx.feature_dim, args.proj_hidden_dim, args.proj_dim)
        self.prototypes = nn.Linear(args.proj_dim, args.num_prototypes, bias=False)
        self.register_buffer(
            "queue", torch.zeros(2, args.queue_size // max(1, ctx.world_size), args.proj_dim)
        )
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @classmethod
    def views(cls, args, image_size):
        """SwAV's multi-crop (Sec. 3.2): two global crops (scale 0.14-1), small ones (0.05-0.14)."""
        blur = 0.5 if image_size > cls.SMALL_IMAGE_SIZE else 0.0  # no blur at 32 px
        crop = AugmentRecipe(crop_scale_min=0.14, blur_p=blur)
        local = dataclasses.replace(crop, crop_scale_min=0.05, crop_scale_max=0.14)
        local_size = args.local_crop_size or max(8, image_size * 96 // 224 // 2 * 2)
        return {"global": View(crop, count=2), "local": View(local, size=local_size, count=args.local_crops)}

    def training_step(self, images, step, index=None):
        with torch.no_grad():  # prototypes on the unit sphere (the paper's code, every step)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        globals_ = [self.views["global"](images) for _ in range(2)]
        locals_ = [self.views["local"](images) for _ in range(self.args.local_crops)]
        z = [F.normalize(e, dim=1) for e in self.projector(self.backbone(torch.cat(globals_))).chunk(2)]
        if locals_:
            z += [
                F.normalize(e, dim=1)
                for e in self.projector(self.backbone(torch.cat(locals_))).chunk(len(locals_))
            ]
        scores = [self.prototypes(e) for e in z]
        codes = [self.codes(i, scores[i].detach(), z[i].detach(), step) for i in range(2)]
        loss = swapped_prediction(scores, codes, self.args.temperature)
        return loss, {"z_std": embedding_std(z[0]), "code_entropy": _entropy(codes[0])}

    def codes(self, crop: int, scores: torch.Tensor, embeddings: torch.Tensor, step: int) -> torch.Tensor:
        """Sinkhorn codes of one global crop, with the queue's past embeddings joining the batch
        once it has filled (their codes are computed and dropped)."""
        a = self.args
        use_queue = a.queue_size > 0 and step >= a.queue_start * self.total_steps
        if use_queue and self.queue_filled.item() >= self.queue.shape[1]:
            scores = torch.cat([self.queue[crop] @ self.prototypes.weight.detach().T, scores])
        q = sinkhorn_knopp(scores, a.epsilon, a.sinkhorn_iterations)[-len(embeddings) :]
        if use_queue:  # FIFO: newest first
            n = min(len(embeddings), self.queue.shape[1])
            self.queue[crop] = torch.cat([embeddings[:n], self.queue[crop][:-n]])
            if crop == 1:
                self.queue_filled += n
        return q

    def before_optimizer_step(self, step):
        # The prototypes stay fixed at first (the paper's code: one epoch), which it found to
        # stabilise the start: gradients set to None are skipped by the optimiser.
        if step < self.args.freeze_prototypes * self.total_steps:
            self.prototypes.weight.grad = None


def _entropy(codes: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the codes: log K if every image is spread over all prototypes."""
    return -(codes * torch.log(codes + 1e-12)).sum(dim=1).mean()
