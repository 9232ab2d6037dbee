"""VICReg: Bardes, Ponce & LeCun 2022, Variance-Invariance-Covariance Regularization.

Where the paper's text and the authors' code (facebookresearch/vicreg) differ, sslab follows the
code, with which the published 25/25/1 weights were tuned: the variance term is the mean of the two
branches' hinges (halved against eq. (6) as printed)."""

from __future__ import annotations

from dataclasses import dataclass

from sslab.methods.heads import TwoProjectedViews
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


class VICReg(TwoProjectedViews):
    """Two views; their embeddings are pulled together (invariance) while each branch keeps
    every dimension's std above 1 (variance) and its dimensions decorrelated (covariance)."""

    name = "vicreg"
    Args = VICRegArgs
    # main_vicreg.py: LARS at base lr 0.2 per 256 images scaled linearly, weight decay 1e-6, 10
    # warm-up epochs, biases and norms out of the decay and of LARS (the platform's groups).
    train_recipe = {
        "optimizer": "lars",
        "lr": 0.2,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "warmup_epochs": 10,
    }

    def training_step(self, images, step, index=None):
        z1, z2 = self.projected_views(images)
        a = self.args
        loss, terms = vicreg_loss(z1, z2, a.sim_weight, a.var_weight, a.cov_weight)
        return loss, terms | {"z_std": embedding_std(z1)}
