"""SimSiam, Barlow Twins, VICReg, SwAV and MoCo v3: each loss against its paper's formula or
pseudo-code written out term by term (the 2-rank checks are in tests/test_ddp.py)."""

import math

import pytest
import torch

from sslab.methods.losses import (
    barlow_twins_loss,
    moco_v3_contrastive,
    negative_cosine,
    sinkhorn_knopp,
    swapped_prediction,
    vicreg_loss,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def test_simsiam_negative_cosine_is_eq1_with_a_stop_gradient():
    """SimSiam eq. (1): D(p, z) = -(p / ||p||) . (z / ||z||); eq. (3): z is a constant."""
    p, z = _rand(4, 6, seed=1).requires_grad_(), _rand(4, 6, seed=2).requires_grad_()
    expected = -sum(_cos(p[i].tolist(), z[i].tolist()) for i in range(4)) / 4
    loss = negative_cosine(p, z)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert z.grad is None and p.grad is not None  # stop-gradient on the target branch


def test_barlow_twins_loss_is_eq_1_standardised_as_the_authors_code():
    """Barlow Twins eq. (1) / Algorithm 1: z standardised along the batch, c = z_a^T z_b / N, loss =
    sum (1 - c_ii)^2 + lambda sum_{i!=j} c_ij^2; standardised as the authors' code (BatchNorm1d, no
    affine: the biased std, eps 1e-5), so that identical views give c_ii = 1 (a zero diagonal term)."""
    n, d, lambd = 8, 5, 0.0051
    z_a, z_b = _rand(n, d, seed=3), _rand(n, d, seed=4)

    def standardise(z, j):
        column = [z[i][j].item() for i in range(n)]
        mean = sum(column) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in column) / n + 1e-5)
        return [(x - mean) / std for x in column]

    a = [standardise(z_a, j) for j in range(d)]
    b = [standardise(z_b, j) for j in range(d)]
    c = [[sum(a[i][k] * b[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
    expected = sum((1 - c[i][i]) ** 2 for i in range(d))
    expected += lambd * sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    assert barlow_twins_loss(z_a, z_b, lambd).item() == pytest.approx(expected, rel=1e-4)
    same = barlow_twins_loss(z_a, z_a, 0.0).item()  # the diagonal term alone, identical views
    assert same == pytest.approx(0.0, abs=1e-5 * d)


def test_vicreg_loss_is_eqs_1_to_6():
    """VICReg: s = 1/n sum ||z_i - z'_i||^2 / d (the MSE), v = 1/d sum_j max(0, 1 - sqrt(Var(z_j)
    + 1e-4)) (eq. 1), c = 1/d sum_{i!=j} C_ij^2 with C the unbiased covariance (eqs. 3-4);
    loss = lambda s + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z')): eq. (6) with the variance term
    halved, as the authors' main_vicreg.py computes it (`std_loss = mean(relu(1 - std_x)) / 2 +
    mean(relu(1 - std_y)) / 2`)."""
    n, d = 10, 4
    z_a, z_b = _rand(n, d, seed=5), _rand(n, d, seed=6) * 0.3
    rows_a, rows_b = z_a.tolist(), z_b.tolist()

    def variance_term(rows):
        total = 0.0
        for j in range(d):
            col = [r[j] for r in rows]
            mean = sum(col) / n
            var = sum((x - mean) ** 2 for x in col) / (n - 1)
            total += max(0.0, 1 - math.sqrt(var + 1e-4))
        return total / d

    def covariance_term(rows):
        means = [sum(r[j] for r in rows) / n for j in range(d)]
        cov = [
            [sum((r[i] - means[i]) * (r[j] - means[j]) for r in rows) / (n - 1) for j in range(d)]
            for i in range(d)
        ]
        return sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    invariance = sum((x - y) ** 2 for ra, rb in zip(rows_a, rows_b) for x, y in zip(ra, rb)) / (n * d)
    expected = 25 * invariance + 25 * (variance_term(rows_a) + variance_term(rows_b)) / 2
    expected += 1 * (covariance_term(rows_a) + covariance_term(rows_b))
    loss, terms = vicreg_loss(z_a, z_b, 25.0, 25.0, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert terms["invariance"].item() == pytest.approx(invariance, rel=1e-4)


def _sinkhorn_algorithm_1(scores, eps, iterations):
    """SwAV's Algorithm 1 (appendix), as printed: multiplicative updates to the marginals r, c."""
    q = torch.exp(scores / eps).T
    q /= q.sum()
    k, b = q.shape
    r, c = torch.ones(k) / k, torch.ones(b) / b
    for _ in range(iterations):
        u = q.sum(dim=1)
        q *= (r / u).unsqueeze(1)
        q *= (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).T


def test_sinkhorn_codes_are_the_papers_algorithm_and_spread_images_over_prototypes():
    z = torch.nn.functional.normalize(_rand(32, 8, seed=7), dim=1)
    prototypes = torch.nn.functional.normalize(_rand(10, 8, seed=8), dim=1)
    scores = z @ prototypes.T
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert torch.allclose(codes, _sinkhorn_algorithm_1(scores, 0.05, 3), atol=1e-5)
    assert torch.allclose(codes.sum(dim=1), torch.ones(32), atol=1e-5)  # one distribution per image
    # equipartition: each prototype takes B/K of the images at convergence, and three
    # iterations are already closer to it than the plain softmax assignment
    plain = torch.softmax(scores / 0.05, dim=1).sum(dim=0)
    assert (codes.sum(dim=0) - 3.2).abs().max() < (plain - 3.2).abs().max()
    converged = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    assert torch.allclose(converged.sum(dim=0), torch.full((10,), 3.2), rtol=1e-3)


def test_swapped_prediction_is_eq1():
    """SwAV eq. (1)-(2): L = sum over code crops s and other crops t of -sum_k q_s,k log p_t,k,
    p_t = softmax(z_t . c / tau); averaged over the pairs of each code crop and the images."""
    scores = [_rand(4, 5, seed=s) for s in (9, 10, 11)]  # 2 global crops + 1 local
    codes = [torch.softmax(_rand(4, 5, seed=s), dim=1) for s in (12, 13)]
    tau, total = 0.1, 0.0
    for s in range(2):
        others = [t for t in range(3) if t != s]
        for t in others:
            for i in range(4):
                logits = [x / tau for x in scores[t][i].tolist()]
                log_z = math.log(sum(math.exp(x) for x in logits))
                total -= sum(q * (x - log_z) for q, x in zip(codes[s][i].tolist(), logits)) / 4 / len(others)
    assert swapped_prediction(scores, codes, tau).item() == pytest.approx(total / 2, rel=1e-5)


def test_moco_v3_contrastive_is_algorithm_1():
    """MoCo v3 Algorithm 1: ctr(q, k) = CrossEntropy(q k^T / tau, arange(N)) * 2 tau, q and k
    L2-normalised, k without gradient."""
    q, k, tau = _rand(6, 4, seed=14).requires_grad_(), _rand(6, 4, seed=15).requires_grad_(), 0.2
    qn = torch.nn.functional.normalize(q, dim=1).tolist()
    kn = torch.nn.functional.normalize(k, dim=1).tolist()
    expected = 0.0
    for i in range(6):
        logits = [sum(a * b for a, b in zip(qn[i], kn[j])) / tau for j in range(6)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits))) / 6
    loss = moco_v3_contrastive(q, k, tau)
    assert loss.item() == pytest.approx(expected * 2 * tau, rel=1e-5)
    loss.backward()
    assert k.grad is None  # keys come from the momentum encoder


def test_swav_freezes_then_trains_its_unit_prototypes_and_fills_its_queue(make_method):
    swav, data = make_method(
        "swav",
        num_prototypes=16,
        proj_hidden_dim=32,
        proj_dim=8,
        freeze_prototypes=0.1,
        queue_size=48,
        queue_start=0.0,
    )  # total_steps 100: frozen for steps 0-9
    loss, metrics = swav.training_step(data.train_images[:32], 0)
    loss.backward()
    assert torch.allclose(swav.prototypes.weight.norm(dim=1), torch.ones(16), atol=1e-5)
    swav.before_optimizer_step(0)
    assert swav.prototypes.weight.grad is None
    assert swav.queue_filled.item() == 32 and 0 <= metrics["code_entropy"] <= math.log(16) + 1e-5
    swav.zero_grad()
    swav.training_step(data.train_images[32:64], 10)[0].backward()
    swav.before_optimizer_step(10)
    assert swav.prototypes.weight.grad is not None  # past the frozen part


@pytest.mark.parametrize("name", ["simsiam", "barlow_twins", "vicreg", "swav", "moco_v3"])
def test_each_baseline_is_listed_and_logs_the_collapse_monitor(make_method, name):
    from sslab.methods.registry import METHODS

    assert name in METHODS
    method, data = make_method(name)
    _, metrics = method.training_step(data.train_images[:16], 0)
    assert 0 < metrics["z_std"].item() < 1
