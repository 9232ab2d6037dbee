"""Losses shared across methods, each with the paper and equation it implements."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sslab.platform.distributed import gather_with_grad, global_index


def in_fp32(loss_fn):
    """Runs a loss in fp32 under bf16 autocast too. Autocast would run its similarity matmuls in
    bf16 and round their output to 8 bits of mantissa (cosines 0.996 and 1.0 coincide), an error
    the temperature then multiplies; `.float()` on the inputs alone does not stop it."""

    @functools.wraps(loss_fn)
    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type, enabled=False):
            return loss_fn(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    return run


def _to_fp32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


@in_fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent, SimCLR (Chen et al. 2020) eq. (1), averaged over all 2N anchors.

    z1[i] and z2[i] are the two views of image i on this rank. Under DDP the candidates are the
    2N views of the *global* batch; this rank's anchors are its own 2N views, and the mean over
    ranks (DDP's gradient average) is the mean over all global anchors.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    local = torch.cat([z1, z2])  # [2n, d] anchors
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    candidates = torch.cat([g1, g2])  # [2N, d]
    n, big_n = len(z1), len(g1)
    own = global_index(n, z1.device)  # this rank's rows in g1 / g2
    self_index = torch.cat([own, own + big_n])  # anchor k is candidate self_index[k]
    positive_index = torch.cat([own + big_n, own])  # its other view
    logits = local @ candidates.T / temperature
    logits[torch.arange(2 * n), self_index] = float("-inf")  # 1[k != i] in the denominator
    return F.cross_entropy(logits, positive_index)


@in_fp32
def info_nce_with_queue(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    batch_keys: torch.Tensor | None = None,
    own_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo (He et al. 2020) eq. (1): -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.k/t)).
    q, k: [N, d] L2-normalised; queue: [K, d] L2-normalised negatives. With `batch_keys`
    [M, d], the batch's keys are negatives too, except each query's own (at `own_index`)."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = [q @ queue.T]
    if batch_keys is not None:
        in_batch = q @ batch_keys.T
        in_batch[torch.arange(len(q), device=q.device), own_index] = float("-inf")
        negatives.append(in_batch)
    logits = torch.cat([positive, *negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@in_fp32
def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL (Grill et al. 2020) eq. (2): ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z), batch mean."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (SimSiam, Chen & He 2021, Sec. 4.1): mean per-dimension std of the
    L2-normalised embeddings: ~1/sqrt(d) when spread out, 0 when collapsed to a point."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
