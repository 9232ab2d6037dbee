"""MoCo and BYOL: losses against the papers' formulas, and the EMA / queue updates."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.ema import ema_update, frozen_copy
from sslab.methods.losses import byol_regression, embedding_std, info_nce_with_queue
from sslab.platform.optim import cosine_schedule


def test_moco_info_nce_matches_eq1():
    """MoCo eq. (1): L_q = -log exp(q.k+/t) / sum_{i=0..K} exp(q.k_i/t), k_0 = k+, the rest the queue."""
    g = torch.Generator().manual_seed(0)
    q, k = (
        F.normalize(torch.randn(4, 8, generator=g), dim=1),
        F.normalize(torch.randn(4, 8, generator=g), dim=1),
    )
    queue = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    t = 0.07
    expected = 0.0
    for i in range(4):
        terms = [math.exp(float(q[i] @ k[i]) / t)] + [math.exp(float(q[i] @ n) / t) for n in queue]
        expected += -math.log(terms[0] / sum(terms)) / 4
    assert info_nce_with_queue(q, k, queue, t).item() == pytest.approx(expected, rel=1e-5)


def test_byol_loss_matches_eq2():
    """BYOL eq. (2): || q/||q|| - z/||z|| ||_2^2, averaged over the batch."""
    p, z = torch.randn(5, 6), torch.randn(5, 6)
    expected = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert byol_regression(p, z).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ema_update_follows_the_momentum_rule():
    online = nn.Linear(3, 2)
    target = frozen_copy(online)
    before = target.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema_update(target, online, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)
    assert not any(p.requires_grad for p in target.parameters())


def test_ema_update_leaves_the_targets_own_batch_norm_statistics():
    """Only parameters are averaged (MoCo's code: param_k = m param_k + (1-m) param_q); the
    target's BN statistics come from its own forward passes, matching its own weights."""
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    online(torch.randn(16, 3) + 5.0)  # online statistics move to ~5
    ema_update(target, online, 0.5)
    assert torch.equal(target.running_mean, torch.zeros(3))


def test_byol_tau_rises_from_base_to_one_on_a_cosine():
    # BYOL Sec. 3.2: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
    for k in (0, 25, 50, 100):
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * k / 100) + 1) / 2
        assert cosine_schedule(k, 100, start=0.99, end=1.0) == pytest.approx(expected)


def test_moco_queue_is_fifo_and_wraps(make_method):
    moco, _ = make_method("moco_v2", queue_size=8, proj_dim=4)
    first, second = torch.ones(6, 4), 2 * torch.ones(6, 4)
    moco.enqueue(first)
    moco.enqueue(second)
    # 6 ones at 0..5, then twos at 6, 7 and wrapping to 0..3: the oldest keys went first
    assert moco.queue[:, 0].tolist() == [2, 2, 2, 2, 1, 1, 2, 2] and moco.queue_ptr.item() == 4


def test_moco_step_enqueues_its_keys_and_moves_the_key_encoder(make_method):
    moco, data = make_method("moco_v2", queue_size=64, momentum=0.5)
    key_before = [p.clone() for p in moco.key_backbone.parameters()]
    loss, _ = moco.training_step(data.train_images[:16], 0)
    loss.backward()
    with torch.no_grad():
        for p in moco.backbone.parameters():
            p.add_(0.1)
    moco.on_step_end(0)
    assert moco.queue_ptr.item() == 16
    moved = [not torch.equal(a, b) for a, b in zip(key_before, moco.key_backbone.parameters())]
    assert all(moved)


def test_moco_versions_differ_as_the_papers_say(make_method):
    v1, _ = make_method("moco_v1")
    v2, _ = make_method("moco_v2")
    assert isinstance(v1.head, nn.Linear) and isinstance(v2.head, nn.Sequential)
    assert v1.args.temperature == 0.07 and v2.args.temperature == 0.2
    assert v1.augment.recipe.blur_p == 0 and v2.augment.recipe.blur_p > 0


def test_embedding_std_detects_collapse():
    assert embedding_std(torch.ones(32, 16) + 1e-6 * torch.randn(32, 16)) < 1e-3
    assert embedding_std(torch.randn(4096, 16)) == pytest.approx(1 / math.sqrt(16), rel=0.05)


def test_moco_single_worker_shuffle_bn_normalises_keys_in_shuffled_groups(make_method):
    """Each key is normalised with a random quarter of the batch, not with its own query's batch:
    in train mode the keys differ from a whole-batch forward, yet each key is still its own
    image's (same key for the same image when there is one group)."""
    moco, data = make_method("moco_v2", shuffle_bn_groups=4)
    x = moco.normalize(data.train_images[:32])
    whole = moco.key_head(moco.key_backbone(x))
    grouped = moco._key_forward(x)
    assert grouped.shape == whole.shape and not torch.allclose(grouped, whole, atol=1e-4)
    moco.args.shuffle_bn_groups = 1
    assert torch.allclose(moco._key_forward(x), whole, atol=1e-5)  # order restored
