"""Relative patch location: Doersch et al. 2015, Unsupervised Visual Representation Learning by
Context Prediction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.tiles import grid_tiles
from sslab.platform.augment import AugmentRecipe
from sslab.platform.config import check

CENTRE = 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # grid cells (row-major) of labels 0..7, the centre skipped


def drop_colour(patches: torch.Tensor, noise_std: float = 0.01) -> torch.Tensor:
    """Keeps one random channel of each patch and replaces the other two with noise (Doersch et
    al., Sec. 4: 'color dropping' against chromatic-aberration shortcuts). [n, C, H, W]."""
    keep = torch.randint(3, (len(patches),), device=patches.device)
    mask = F.one_hot(keep, 3).to(patches.dtype)[:, :, None, None]
    return patches * mask + torch.randn_like(patches) * noise_std * (1 - mask)


@dataclass
class RelativePatchArgs:
    tile_fraction: float = check(default=0.75, gt=0, le=1)
    min_gap: int = check(default=1, ge=0)  # the paper: about half a patch at 96 px
    color_dropping: bool = True
    pair_dim: int = check(default=256, gt=0)  # per-patch embedding ("fc6")
    hidden_dim: int = check(default=512, gt=0)


class RelativePatch(Method):
    """The centre patch and one of its 8 neighbours, through one shared encoder; an 8-way
    classifier on their concatenated embeddings names where the neighbour was."""

    name = "relative_patch"
    Args = RelativePatchArgs

    def __init__(self, args: RelativePatchArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.patch_head = nn.Sequential(nn.Linear(ctx.feature_dim, args.pair_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(2 * args.pair_dim, args.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(args.hidden_dim, len(NEIGHBOURS)),
        )
        self.register_buffer("neighbour_cells", torch.tensor(NEIGHBOURS), persistent=False)

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return AugmentRecipe(crop_scale_min=0.6, jitter_p=0.0, grayscale_p=0.0)

    def pairs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centre patches, neighbour patches, labels 0..7) for a batch of normalised images."""
        tiles = grid_tiles(images, 3, self.args.tile_fraction, self.args.min_gap)
        labels = torch.randint(len(NEIGHBOURS), (len(images),), device=images.device)
        rows = torch.arange(len(images), device=images.device)
        return tiles[:, CENTRE], tiles[rows, self.neighbour_cells[labels]], labels

    def training_step(self, images, step, index=None):
        centre, neighbour, labels = self.pairs(self.augment(images))
        both = torch.cat([centre, neighbour])
        if self.args.color_dropping:
            both = drop_colour(both)
        c, n = self.patch_head(self.backbone(both)).chunk(2)
        logits = self.classifier(torch.cat([c, n], dim=1))
        loss = F.cross_entropy(logits, labels)
        return loss, {"pretext_acc": (logits.detach().argmax(1) == labels).float().mean()}
