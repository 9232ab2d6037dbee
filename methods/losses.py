"""Losses shared across methods, each with the paper and equation it implements."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sslab.platform.distributed import (
    gather_no_grad,
    gather_with_grad,
    global_index,
    sum_over_ranks,
    world_size,
)


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


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam (Chen & He 2021) eq. (1): D(p, z) = -p/||p|| . z/||z||, z detached (stop-gradient,
    eq. 3), batch mean."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


@in_fp32
def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021) eq. (1): each embedding dimension standardised over the
    *global* batch, C = z_a_norm^T z_b_norm / N, loss = sum_i (1 - C_ii)^2 + lambda sum_{i != j}
    C_ij^2. Every rank computes the same global loss.
    Standardised as the authors' code does it (BatchNorm1d without affine, i.e. the biased std
    and eps 1e-5), not as Algorithm 1 prints it (torch's unbiased std): then C_ii reaches 1,
    while with the unbiased std it tops out at (N - 1) / N."""
    z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
    n = len(z_a)
    z_a = F.batch_norm(z_a, None, None, training=True, eps=1e-5)
    z_b = F.batch_norm(z_b, None, None, training=True, eps=1e-5)
    c = z_a.T @ z_b / n
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off_diagonal


@in_fp32
def vicreg_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, sim_weight: float, var_weight: float, cov_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022) eqs. (1)-(6) over the *global* batch: invariance s = mean
    squared distance, variance v = mean_j max(0, 1 - sqrt(Var z_j + 1e-4)), covariance c = sum of
    the squared off-diagonal covariances / d; loss = lambda s + mu (v_a + v_b) / 2 + nu (c_a + c_b).
    The variance term is halved as in the authors' code (main_vicreg.py), with which the 25/25/1
    weights were tuned; eq. (6) as printed weighs it twice as heavily."""
    z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
    invariance = F.mse_loss(z_a, z_b)
    variance = (_vicreg_variance(z_a) + _vicreg_variance(z_b)) / 2
    covariance = _vicreg_covariance(z_a) + _vicreg_covariance(z_b)
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return loss, {
        "invariance": invariance.detach(),
        "variance": variance.detach(),
        "covariance": covariance.detach(),
    }


def _vicreg_variance(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()  # eq. (1)


def _vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    z = z - z.mean(dim=0)
    cov = z.T @ z / (len(z) - 1)  # eq. (3)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]  # eq. (4)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV (Caron et al. 2020) Sec. 3.1 / Algorithm 1 codes: Q = exp(C^T Z / epsilon) made, by
    alternate normalisation, a transport plan whose rows (prototypes) each hold 1/K and whose
    columns (images) each hold 1/B of the mass, B the *global* batch; returns Q * B, one
    distribution over prototypes per image (rows of the result)."""
    # Scores are cosines (|s| <= 1): exp(s / 0.05) <= e^20 stays finite without a shift, and a
    # per-rank shift would weigh the ranks' columns differently.
    q = torch.exp(scores.float() / epsilon).T  # [K, b]
    k, b = q.shape[0], q.shape[1] * world_size()
    q /= sum_over_ranks(q.sum())
    for _ in range(iterations):
        q /= sum_over_ranks(q.sum(dim=1, keepdim=True))  # each prototype: 1/K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each image: 1/B (its column is local to this rank)
        q /= b
    return (q * b).T


@in_fp32
def swapped_prediction(
    scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """SwAV eq. (1)-(2): each code q_s (of a global crop s) is predicted from every other crop t,
    -sum_k q_s log softmax(z_t . c_k / tau); averaged over crop pairs and the batch."""
    total = 0.0
    for s, q in enumerate(codes):
        others = [t for t in range(len(scores)) if t != s]
        for t in others:
            total = total - (q * F.log_softmax(scores[t] / temperature, dim=1)).sum(dim=1).mean() / len(
                others
            )
    return total / len(codes)


@in_fp32
def moco_v3_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 (Chen, Xie & He 2021) Algorithm 1, ctr(q, k): InfoNCE of each query against the
    keys of the *global* batch, its own key the positive; scaled by 2 tau as in the paper's code."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = gather_no_grad(k.detach())
    logits = q @ keys.T / temperature
    labels = global_index(len(q), q.device)
    return F.cross_entropy(logits, labels) * 2 * temperature
