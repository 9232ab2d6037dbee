"""Jigsaw puzzles: Noroozi & Favaro 2016, Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.tiles import grid_tiles
from sslab.platform.augment import AugmentRecipe
from sslab.platform.config import check


@functools.lru_cache(maxsize=8)
def maximal_hamming_permutations(count: int, tiles: int = 9, seed: int = 0) -> torch.Tensor:
    """`count` permutations of `tiles` chosen greedily for maximal minimum Hamming distance
    (Noroozi & Favaro, Algorithm 1: each new permutation is the one farthest, by its minimum
    distance, from those already chosen; ties broken at random)."""
    generator = torch.Generator().manual_seed(seed)
    everything = torch.tensor(_all_permutations(tiles), dtype=torch.int8)
    first = torch.randint(len(everything), (1,), generator=generator).item()
    chosen = [first]
    min_distance = (everything != everything[first]).sum(1)
    for _ in range(count - 1):
        best = min_distance.max()
        candidates = (min_distance == best).nonzero().flatten()
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)].item()
        chosen.append(pick)
        min_distance = torch.minimum(min_distance, (everything != everything[pick]).sum(1))
    return everything[chosen].long()


def _all_permutations(n: int) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.permutations(range(n)))


@dataclass
class JigsawArgs:
    permutations: int = check(default=100, ge=2, le=1000)  # the paper's best: 1000 (Table 3)
    tile_fraction: float = check(default=0.75, gt=0, le=1)  # tile side / cell side (64/75 in the paper)
    min_gap: int = check(default=1, ge=0)  # pixels between neighbouring tiles
    tile_dim: int = check(default=128, gt=0)  # per-tile embedding ("fc7")
    hidden_dim: int = check(default=512, gt=0)


class Jigsaw(Method):
    """Nine tiles, shuffled by one permutation of a fixed set, pass one shared encoder; their
    concatenated embeddings classify which permutation it was (cross-entropy)."""

    name = "jigsaw"
    Args = JigsawArgs

    def __init__(self, args: JigsawArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.register_buffer("permutation_set", maximal_hamming_permutations(args.permutations).clone())
        self.tile_head = nn.Sequential(nn.Linear(ctx.feature_dim, args.tile_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(9 * args.tile_dim, args.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(args.hidden_dim, args.permutations),
        )

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return AugmentRecipe(crop_scale_min=0.6, jitter_p=0.0, grayscale_p=0.3)

    def shuffle(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot i of puzzle n holds tile permutation_set[label_n][i]."""
        labels = torch.randint(len(self.permutation_set), (len(tiles),), device=tiles.device)
        order = self.permutation_set[labels]
        return tiles[torch.arange(len(tiles), device=tiles.device)[:, None], order], labels

    def training_step(self, images, step, index=None):
        a = self.args
        tiles = grid_tiles(self.augment(images), 3, a.tile_fraction, a.min_gap)
        # Each tile normalised on its own (Noroozi & Favaro, Sec. 3.3): no low-level statistics shortcut.
        tiles = (tiles - tiles.mean(dim=(2, 3, 4), keepdim=True)) / (
            tiles.std(dim=(2, 3, 4), keepdim=True) + 1e-5
        )
        puzzles, labels = self.shuffle(tiles)
        n, t = puzzles.shape[:2]
        embedded = self.tile_head(self.backbone(puzzles.flatten(0, 1))).view(n, -1)
        logits = self.classifier(embedded)
        loss = F.cross_entropy(logits, labels)
        return loss, {"pretext_acc": (logits.detach().argmax(1) == labels).float().mean()}
