"""Losses shared across methods, each with the paper and equation it implements."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates `x` from every DDP rank, keeping gradients (negatives span the global batch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent, SimCLR (Chen et al. 2020) eq. (1), averaged over all 2N anchors.

    z1[i] and z2[i] are the two views of image i on this rank. Under DDP the candidates are the
    2N views of the *global* batch; this rank's anchors are its own 2N views, and the mean over
    ranks (DDP's gradient average) is the mean over all global anchors.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    local = torch.cat([z1, z2])                                   # [2n, d] anchors
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    candidates = torch.cat([g1, g2])                              # [2N, d]
    n, big_n = len(z1), len(g1)
    own = torch.arange(n, device=z1.device) + rank * n            # this rank's rows in g1 / g2
    self_index = torch.cat([own, own + big_n])                    # anchor k is candidate self_index[k]
    positive_index = torch.cat([own + big_n, own])                # its other view
    logits = local @ candidates.T / temperature
    logits[torch.arange(2 * n), self_index] = float("-inf")       # 1[k != i] in the denominator
    return F.cross_entropy(logits, positive_index)
