"""Rotation prediction: Gidaris et al. 2018, Unsupervised Representation Learning by Predicting
Image Rotations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslab.methods.base import Method, MethodContext
from sslab.methods.heads import projection_head
from sslab.platform.augment import CROP_FLIP, AugmentRecipe
from sslab.platform.config import check


def rotate_all(images: torch.Tensor, rotations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at every multiple of 360/K degrees (K = 4: 0/90/180/270, counter-clockwise),
    grouped by rotation, and the rotation labels y."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(rotations)])
    labels = torch.arange(rotations, device=images.device).repeat_interleave(len(images))
    return rotated, labels


@dataclass
class RotationArgs:
    rotations: int = check(default=4, ge=2, le=4)  # multiples of 90 degrees
    head_hidden_dim: int = check(default=512, gt=0)


class Rotation(Method):
    """The K-way classifier F sees g(X|y) for every rotation y; loss -1/K sum_y log F_y(g(X|y))
    (Gidaris et al., eq. 2), averaged over the batch."""

    name = "rotation"
    Args = RotationArgs

    def __init__(self, args: RotationArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.classifier = projection_head("mlp", ctx.feature_dim, args.head_hidden_dim, args.rotations)

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        # Crops and flips only: the task needs the image's orientation cues, not colour invariance.
        return CROP_FLIP

    def training_step(self, images, step, index=None):
        rotated, labels = rotate_all(self.augment(images), self.args.rotations)
        logits = self.classifier(self.backbone(rotated))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return loss, {"pretext_acc": accuracy}
