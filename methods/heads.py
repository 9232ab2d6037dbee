"""Projection heads shared by the contrastive and self-distillation methods."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn


def projection_head(
    kind: str,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    depth: int = 2,
    batch_norm: bool = True,
    activation: Callable[[], nn.Module] = partial(nn.ReLU, inplace=True),
) -> nn.Module:
    """none: identity; linear: one layer; mlp: `depth` layers with BN + `activation` between them."""
    if kind == "none":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    layers, dim = [], in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        layers += [activation()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)
