"""Losses against direct transcriptions of the papers' formulas."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sslab.methods.clip import clip_loss
from sslab.methods.dino import dino_loss
from sslab.methods.losses import byol_regression, info_nce_with_queue, nt_xent

LOSSES = {"nt_xent": lambda a, b: nt_xent(a, b, 0.5), "clip": lambda a, b: clip_loss(a, b, torch.tensor(2.0))}


def nt_xent_by_the_paper(z1, z2, tau):
    """SimCLR (Chen et al. 2020) eq. (1): l(i,j) = -log exp(sim(z_i,z_j)/tau) /
    sum_{k != i} exp(sim(z_i,z_k)/tau), with L the mean of l(2k-1,2k) + l(2k,2k-1) over 2N."""
    z = [v for pair in zip(z1, z2) for v in pair]  # views 2k-1, 2k are neighbours
    sim = lambda a, b: float(a @ b / (a.norm() * b.norm()))

    def loss_term(i, j):
        denominator = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(len(z)) if k != i)
        return -math.log(math.exp(sim(z[i], z[j]) / tau) / denominator)

    n = len(z1)
    return sum(loss_term(2 * k, 2 * k + 1) + loss_term(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_eq1(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(nt_xent_by_the_paper(z1, z2, tau), rel=1e-5)


@pytest.mark.parametrize("name", ["nt_xent", "clip", "moco", "byol", "dino"])
def test_losses_are_computed_in_fp32_under_bf16_autocast(name):
    # Under autocast a similarity matmul would round to bf16 (about 3 significant digits).
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    loss = {
        **LOSSES,
        "moco": lambda a, b: info_nce_with_queue(
            F.normalize(a, dim=1), F.normalize(b, dim=1), F.normalize(b.flip(0), dim=1), 0.07
        ),
        "byol": byol_regression,
        "dino": lambda a, b: dino_loss([a, b], [b, a], torch.zeros(128), 0.1, 0.04),
    }[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(a, b)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(loss(a, b).item(), rel=1e-6)


def test_nt_xent_is_low_for_aligned_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z), 0.1) < nt_xent(z, torch.randn(8, 16), 0.1)


def _ddp_worker(rank, world, port, loss_name, z1, z2, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = len(z1) // world
    a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = LOSSES[loss_name](a, b)
    loss.backward()
    # DDP averages parameter gradients over ranks; do the same to the inputs' gradients
    # of this rank's slice to compare with the single-process global loss.
    out[rank] = (loss.detach(), a.grad / world, b.grad / world)
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_loss_under_ddp_uses_global_negatives(loss_name):
    """Two gloo ranks, each with half the batch: the mean of their losses and their gradients equal
    the single-process loss over the whole batch (negatives span the global batch)."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    ref1, ref2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    reference = LOSSES[loss_name](ref1, ref2)
    reference.backward()

    manager = mp.Manager()
    out = manager.dict()
    port = 29500 + os.getpid() % 1000 + (7 if loss_name == "clip" else 0)
    mp.spawn(_ddp_worker, args=(2, port, loss_name, z1, z2, out), nprocs=2, join=True)
    mean_loss = (out[0][0] + out[1][0]) / 2
    assert mean_loss.item() == pytest.approx(reference.item(), rel=1e-5)
    # Each rank's anchors only see their own loss term; the all_gather backward adds the
    # other rank's contribution, so the gradient of this rank's slice is the global one.
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), ref1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), ref2.grad, atol=1e-6)
