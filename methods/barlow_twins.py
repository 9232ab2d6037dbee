"""Barlow Twins: Zbontar et al. 2021, Self-Supervised Learning via Redundancy Reduction.

Where Algorithm 1 and the authors' code (facebookresearch/barlowtwins) differ, sslab follows the
code: embeddings standardised by BatchNorm without affine (the biased std), so that the
cross-correlation's diagonal can reach 1; Algorithm 1's unbiased std caps it at (N - 1) / N."""

from __future__ import annotations

from dataclasses import dataclass

from sslab.methods.heads import TwoProjectedViews
from sslab.methods.losses import barlow_twins_loss, embedding_std
from sslab.platform.config import check


@dataclass
class BarlowTwinsArgs:
    lambd: float = check(default=0.0051, ge=0)  # off-diagonal weight (paper: 5e-3)
    proj_hidden_dim: int = check(default=8192, gt=0)
    proj_dim: int = check(default=8192, gt=0)
    proj_layers: int = check(default=3, ge=1)


class BarlowTwins(TwoProjectedViews):
    """Two views; the cross-correlation of their batch-standardised embeddings is pushed to the
    identity: invariance on the diagonal, redundancy reduction off it."""

    name = "barlow_twins"
    Args = BarlowTwinsArgs
    # The authors' main.py: LARS at 0.2 per 256 images scaled linearly for the weights, weight
    # decay 1.5e-6, 10 warm-up epochs, biases and norms out of the decay and of LARS (the
    # platform's groups). Not taken: their biases' and norms' own rate, 0.0048 (1/42 of the
    # weights'); here they share the weights' rate.
    train_recipe = {
        "optimizer": "lars",
        "lr": 0.2,
        "lr_scaling": "linear",
        "weight_decay": 1.5e-6,
        "warmup_epochs": 10,
    }

    def training_step(self, images, step, index=None):
        z1, z2 = self.projected_views(images)
        return barlow_twins_loss(z1, z2, self.args.lambd), {"z_std": embedding_std(z1)}
