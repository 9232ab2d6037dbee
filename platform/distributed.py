"""Distributed helpers in one place: rank, world size, gathers (with and without gradient),
means over ranks. Each works unchanged in a single process (no process group): a method
written against these runs the same in-process, under torchrun and as a Ray Train worker."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` from every rank, concatenated in rank order; gradients flow back to each rank's slice
    (negatives that span the global batch)."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` from every rank, concatenated in rank order, without gradient (keys, statistics)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over ranks (in place where distributed), e.g. a batch statistic."""
    if is_distributed():
        dist.all_reduce(x)
        x /= world_size()
    return x


@torch.no_grad()
def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (in place where distributed), e.g. Sinkhorn's marginals."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def global_index(local_size: int, device=None) -> torch.Tensor:
    """This rank's rows in a batch gathered from every rank (`gather_*` order)."""
    return torch.arange(local_size, device=device) + rank() * local_size


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(x, src=src)
    return x
