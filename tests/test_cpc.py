"""CPC v2: the context network cannot see the future, the loss is CPC's InfoNCE written out,
and at initialisation it is chance, log(number of candidates)."""

import math

import pytest
import torch

from sslab.methods.cpc import ContextNetwork, cpc_info_nce, patch_grid
from sslab.platform.config import ConfigError
from sslab.platform.validate import build_study


def test_patch_grid_is_row_major_overlapping_patches():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).view(2, 1, 8, 8)
    patches, rows, cols = patch_grid(images, size=4, stride=2)
    assert (rows, cols) == (3, 3) and patches.shape == (18, 1, 4, 4)
    assert torch.equal(patches[1], images[0, :, 0:4, 2:6])  # row 0, col 1
    assert torch.equal(patches[9 + 3], images[1, :, 2:6, 0:4])  # image 1, row 1, col 0


def test_the_context_at_row_r_does_not_depend_on_rows_below():
    """The masking check: d c[:, :, r] / d z[:, :, r'] = 0 for every r' > r, and != 0 for r' = r."""
    torch.manual_seed(0)
    net = ContextNetwork(dim=6, layers=3, kernel=3)
    z = torch.randn(2, 6, 7, 7, requires_grad=True)
    for r in range(7):
        (grad,) = torch.autograd.grad(net(z)[:, :, r].sum(), z)
        assert grad[:, :, r + 1 :].abs().sum() == 0, r
        assert grad[:, :, r].abs().max() > 0, r


def test_info_nce_is_cpc_eq4_written_out():
    """-log exp(p.z+) / (exp(p.z+) + sum_negatives exp(p.z)); a drawn negative that is the
    query's own target is not counted twice."""
    g = torch.Generator().manual_seed(1)
    predictions, candidates = torch.randn(5, 3, generator=g), torch.randn(12, 3, generator=g)
    positive = torch.tensor([0, 3, 5, 7, 11])
    negative = torch.tensor([1, 3, 8, 11, 2])  # holds queries 1's and 4's own targets
    expected = 0.0
    for q in range(5):
        score = lambda j, q=q: sum(a * b for a, b in zip(predictions[q].tolist(), candidates[j].tolist()))
        others = [j for j in negative.tolist() if j != positive[q].item()]
        expected += -score(positive[q]) + math.log(
            math.exp(score(positive[q])) + sum(math.exp(score(j)) for j in others)
        )
    assert cpc_info_nce(predictions, candidates, positive, negative).item() == pytest.approx(
        expected / 5, rel=1e-5
    )


def test_cpc_starts_at_chance(make_method):
    """Zero-initialised predictions score every candidate alike: the loss is the mean over the
    queries of log(1 + their negatives), log(1 + M) but for the rare draw of a query's own target."""
    torch.manual_seed(0)
    cpc, data = make_method("cpc", num_negatives=64, prediction_steps=2)
    loss, _ = cpc.training_step(data.train_images[:32], 0)
    # 32 images x 49 patches: a drawn negative is a query's own target with probability 1/1568
    assert loss.item() == pytest.approx(math.log(65), abs=0.01)


def test_prediction_steps_beyond_the_grid_are_a_validation_error(tiny_raw):
    tiny_raw.update(method="cpc", method_args={"prediction_steps": 7})  # 16 px: a 7-row grid
    with pytest.raises(ConfigError, match="method_args: prediction_steps=7 needs a grid"):
        build_study(tiny_raw)
    tiny_raw["method_args"] = {"prediction_steps": 6}
    assert build_study(tiny_raw).method_args["prediction_steps"] == 6


def test_colour_dropping_keeps_one_channel_of_the_dropped_patches():
    # CPC v2's patch-based augmentation (Hénaff et al. 2019): patches lose two of three colour channels
    from sslab.methods.cpc import drop_colours

    torch.manual_seed(0)
    patches = torch.randn(400, 3, 4, 4)
    out = drop_colours(patches, 0.5)
    zeroed = (out.abs().flatten(2).sum(-1) == 0).sum(1)  # channels set to 0, per patch
    assert set(zeroed.tolist()) == {0, 2}
    assert 150 < (zeroed == 2).sum() < 250  # about half the patches
    untouched = zeroed == 0
    assert torch.equal(out[untouched], patches[untouched])
    assert torch.equal(drop_colours(patches, 0.0), patches)


def test_a_patch_embedding_does_not_depend_on_the_rest_of_the_batch(make_method):
    """CPC v2's layer normalisation (Hénaff et al. 2019, replacing batch norm): in training mode
    an image's patch embeddings are the same whatever else is in the batch. With batch norm they
    are not: the batch statistics are the coupling between patches the paper removes."""
    torch.manual_seed(0)
    cpc, data = make_method("cpc", colour_dropping=0.0)
    cpc.train()
    x = cpc.normalize(data.train_images[:8])
    alone, together = cpc.embeddings(x[:2]), cpc.embeddings(x)[:2]
    assert torch.allclose(alone, together, atol=1e-5)
    with_batch_norm, _ = make_method("cpc", colour_dropping=0.0, layer_norm=False)
    with_batch_norm.train()
    alone, together = with_batch_norm.embeddings(x[:2]), with_batch_norm.embeddings(x)[:2]
    assert not torch.allclose(alone, together, atol=1e-3)
