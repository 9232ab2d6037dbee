"""Pretext tasks: labels and losses against the papers (Gidaris 2018, Noroozi & Favaro 2016,
Doersch 2015, Pathak 2016, Zhang 2016 and 2017)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sslab.methods.colorization import (
    ab_bins,
    annealed_mean,
    lab_to_rgb,
    rebalanced_cross_entropy,
    rebalancing_weights,
    rgb_to_lab,
    soft_encode,
)
from sslab.methods.context_encoder import masked_l2, region_masks
from sslab.methods.jigsaw import maximal_hamming_permutations
from sslab.methods.relative_patch import NEIGHBOURS
from sslab.methods.rotation import rotate_all
from sslab.methods.split_brain import lightness_bins
from sslab.methods.tiles import cut_tiles, tile_offsets


def test_rotations_and_their_labels():
    images = torch.rand(3, 3, 8, 8)
    rotated, labels = rotate_all(images)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert torch.equal(rotated[:3], images)
    # label 1 is 90 degrees counter-clockwise: the top-right pixel moves to the top-left
    assert torch.equal(rotated[3][:, 0, 0], images[0][:, 0, -1])
    assert torch.equal(rotated[6], images[0].flip(1).flip(2))  # 180 degrees


def test_rotation_loss_is_the_papers_average_over_rotations(make_method):
    # Gidaris et al. 2018, eq. 2: loss(X) = -1/K sum_y log F_y(g(X|y)), then averaged over images.
    method, data = make_method("rotation")
    method.augment = method.normalize  # no random crop: the same X in both computations
    method.eval()  # BN on running statistics: batch-independent
    images = data.train_images[:6]
    loss, _ = method.training_step(images, 0)
    expected = 0.0
    for x in method.normalize(images):
        for y in range(4):
            logits = method.classifier(method.backbone(torch.rot90(x, y, dims=(1, 2))[None]))
            expected += -F.log_softmax(logits, 1)[0, y] / 4
    assert torch.allclose(loss, expected / len(images), atol=1e-5)


def test_jigsaw_permutations_are_distinct_and_far_apart():
    permutations = maximal_hamming_permutations(100)
    assert len({tuple(p) for p in permutations.tolist()}) == 100
    assert all(sorted(p) == list(range(9)) for p in permutations.tolist())
    distances = (permutations[:, None] != permutations[None]).sum(-1) + 99 * torch.eye(100, dtype=torch.long)
    random = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i)) for i in range(100)])
    random_distances = (random[:, None] != random[None]).sum(-1) + 99 * torch.eye(100, dtype=torch.long)
    assert distances.min() >= 6 > random_distances.min()
    assert distances.float().mean() > 8.5  # the paper's maximal set: average 8.0 at 1000 (Table 3)


def test_each_jigsaw_permutation_is_the_greedy_max_min_choice():
    # Noroozi & Favaro, Algorithm 1, checked by brute force over all 5! permutations of 5 tiles.
    chosen = maximal_hamming_permutations(12, tiles=5, seed=3).tolist()
    everything = list(itertools.permutations(range(5)))
    for i in range(1, len(chosen)):

        def min_distance(p, earlier=chosen[:i]):
            return min(sum(a != b for a, b in zip(p, q)) for q in earlier)

        assert min_distance(chosen[i]) == max(min_distance(p) for p in everything)


def test_jigsaw_shuffle_places_tiles_by_the_labelled_permutation(make_method):
    method, _ = make_method("jigsaw", permutations=10)
    tiles = torch.arange(4 * 9).float().view(4, 9, 1, 1, 1).expand(-1, -1, 3, 2, 2)
    puzzles, labels = method.shuffle(tiles)
    for n in range(4):
        order = method.permutation_set[labels[n]]
        assert puzzles[n, :, 0, 0, 0].tolist() == [n * 9 + k for k in order.tolist()]


def test_tiles_are_image_crops_jittered_inside_their_cells_with_a_gap():
    images = torch.rand(16, 3, 30, 30)
    rows, cols = tile_offsets(16, 3, cell=10, tile=6, min_gap=2, device=images.device)
    tiles = cut_tiles(images, rows, cols, 6)
    assert tiles.shape == (16, 9, 3, 6, 6)
    n, k = 5, 7
    r, c = rows[n, k].item(), cols[n, k].item()
    assert torch.equal(tiles[n, k], images[n, :, r : r + 6, c : c + 6])
    grid_r, grid_c = torch.arange(9) // 3, torch.arange(9) % 3
    assert ((rows - grid_r * 10) >= 0).all() and ((rows - grid_r * 10) <= 2).all()  # jitter <= 10 - 6 - 2
    assert ((cols - grid_c * 10) >= 0).all() and ((cols - grid_c * 10) <= 2).all()
    # horizontally adjacent tiles: the right one starts >= min_gap after the left one ends
    left, right = [i for i in range(9) if i % 3 < 2], [i for i in range(9) if i % 3 > 0]
    assert (cols[:, right] - (cols[:, left] + 6) >= 2).all()


def test_relative_patch_labels_name_the_neighbours_cell(make_method):
    assert NEIGHBOURS == (0, 1, 2, 3, 5, 6, 7, 8)  # 3x3 row-major, centre (4) excluded
    method, _ = make_method("relative_patch", tile_fraction=0.5, min_gap=0)
    # an image whose every pixel holds its own cell index: a patch tells where it was cut
    cell = torch.arange(3).repeat_interleave(10)
    images = (cell[:, None] * 3 + cell[None, :]).float().expand(8, 3, 30, 30)
    centre, neighbour, labels = method.pairs(images)
    assert (centre == 4).all()
    for n in range(8):
        assert (neighbour[n] == NEIGHBOURS[labels[n]]).all()


def test_context_encoder_masks_and_reconstruction_loss():
    central = region_masks(2, 32, "central", 0.25, "cpu")
    assert central[0, 0, 8:24, 8:24].all() and central.sum() == 2 * 16 * 16
    blocks = region_masks(8, 32, "random_blocks", 0.25, "cpu")
    assert (blocks.mean(dim=(1, 2, 3)) >= 0.25).all()
    region = region_masks(8, 32, "random_region", 0.25, "cpu")
    assert torch.allclose(region.mean(dim=(1, 2, 3)), torch.full((8,), 0.25), atol=0.02)
    # Pathak et al. eq. 1: ||M (x - F((1 - M) x))||^2 over the dropped pixels only
    x, prediction = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    expected = ((x - prediction) ** 2 * central).sum() / (central.sum() * 3)
    assert torch.allclose(masked_l2(prediction, x, central), expected)
    prediction_outside = prediction + (1 - central) * 5  # what lies outside the mask is free
    assert torch.allclose(masked_l2(prediction_outside, x, central), expected)


def test_context_encoder_adversarial_term_trains_only_the_generator(make_method):
    # One optimiser serves both players (eq. 3 with lambda_adv = 0.001): the discriminator's
    # gradient must come from its own real-vs-fake objective alone.
    method, data = make_method("context_encoder", adversarial_weight=0.001)
    images = data.train_images[:16]
    torch.manual_seed(0)
    loss, _ = method.training_step(images, 0)
    loss.backward()
    combined = [p.grad.clone() for p in method.discriminator.parameters()]
    assert method.backbone[0].weight.grad is not None
    method.zero_grad()
    torch.manual_seed(0)  # the same augmentation and mask draws
    x = method.augment(images)
    mask = region_masks(len(x), x.shape[-1], "random_blocks", 0.25, x.device)
    filled = x * (1 - mask) + method.inpaint(x, mask) * mask
    real, fake = method.discriminator(x), method.discriminator(filled.detach())
    d_loss = F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    d_loss.backward()
    for grad, param in zip(combined, method.discriminator.parameters()):
        assert torch.allclose(grad, param.grad, atol=1e-6)


def test_lab_round_trip_and_the_in_gamut_bins():
    rgb = torch.rand(2, 3, 8, 8)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-3)
    bins = ab_bins(10)
    # Zhang et al. count 313 in-gamut bins at grid 10 with their gamut; kornia's sRGB (D65) gives 261
    assert len(bins) == 261 and (bins % 10 == 0).all()
    assert rgb_to_lab(torch.tensor([1.0, 1.0, 1.0]).view(1, 3, 1, 1))[0, 0].item() == pytest.approx(
        100, abs=0.01
    )


def test_soft_encoding_is_a_gaussian_over_the_five_nearest_bins():
    # Zhang et al. Sec. 2.1: 5 nearest neighbours, Gaussian kernel with sigma = 5.
    bins = ab_bins(10)
    ab = torch.tensor([13.0, -24.0]).view(1, 2, 1, 1)
    encoded = soft_encode(ab, bins)[0, :, 0, 0]
    assert (encoded > 0).sum() == 5 and encoded.sum().item() == pytest.approx(1.0)
    distances = ((bins - torch.tensor([13.0, -24.0])) ** 2).sum(1)
    nearest = distances.argsort()[:5]
    expected = torch.exp(-distances[nearest] / 50)
    assert torch.allclose(encoded[nearest], expected / expected.sum(), atol=1e-6)
    on_centre = soft_encode(bins[7].view(1, 2, 1, 1), bins)[0, :, 0, 0]
    assert on_centre.argmax() == 7


def test_rebalancing_weights_and_annealed_mean():
    torch.manual_seed(0)
    bins = ab_bins(10)
    probability = torch.rand(len(bins)) ** 4
    probability /= probability.sum()
    weights = rebalancing_weights(probability, bins, mix=0.5)
    kernel = torch.exp(-(torch.cdist(bins, bins) ** 2) / 50)
    smoothed = kernel @ probability
    smoothed /= smoothed.sum()
    assert (smoothed * weights).sum().item() == pytest.approx(1.0)  # E_p~[w] = 1 (eq. 4)
    assert weights[smoothed.argmin()] > weights[smoothed.argmax()]  # rare colours weigh more
    constant = weights * ((1 - 0.5) * smoothed + 0.5 / len(bins))  # w ~ 1 / ((1 - l) p~ + l / Q)
    assert torch.allclose(constant, constant[0].expand_as(constant), rtol=1e-4)
    z = torch.softmax(torch.randn(1, len(bins), 1, 1), 1)
    z[0, 5] += 0.2  # a clear mode
    z /= z.sum(1, keepdim=True)
    mean = (z[0, :, 0, 0, None] * bins).sum(0)
    assert torch.allclose(annealed_mean(z, bins, 1.0)[0, :, 0, 0], mean, atol=1e-4)  # T = 1: mean
    assert torch.allclose(
        annealed_mean(z, bins, 0.01)[0, :, 0, 0], bins[z.argmax()], atol=1e-2
    )  # T -> 0: mode


def test_colorization_loss_is_the_rebalanced_multinomial_cross_entropy():
    # Zhang et al. 2016, eq. 2, written out pixel by pixel.
    q = 6
    logits, target = torch.randn(2, q, 3, 3), torch.softmax(torch.randn(2, q, 3, 3), 1)
    weights = torch.rand(q) + 0.5
    expected = 0.0
    for n, h, w in itertools.product(range(2), range(3), range(3)):
        log_p = F.log_softmax(logits[n, :, h, w], 0)
        expected += -weights[target[n, :, h, w].argmax()] * (target[n, :, h, w] * log_p).sum()
    assert torch.allclose(rebalanced_cross_entropy(logits, target, weights), expected / 18, atol=1e-5)


def test_split_brain_targets_and_features(make_method):
    lab = torch.tensor([0.0, 1.9, 2.0, 50.0, 99.9, 100.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert lightness_bins(lab, 50).flatten().tolist() == [0, 0, 1, 25, 49, 49]
    method, data = make_method("split_brain")
    method.eval()
    assert method.features(data.test_images[:4]).shape == (4, 2 * method.feature_dim)


class FixedViews(torch.nn.Module):
    """No random augmentation: the loss must fall on a batch the method keeps seeing."""

    def __init__(self, normalize):
        super().__init__()
        self.normalize = normalize

    def forward(self, images):
        return self.normalize(images)

    def unit(self, images):
        return self.normalize.to_unit(images)


def fit(method, batch, steps):
    from sslab.platform.train import train_step

    method.augment = FixedViews(method.normalize)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = [
        train_step(method, method, optimizer, batch, step, None, amp=False)[0].item() for step in range(steps)
    ]
    assert all(math.isfinite(v) for v in losses)
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


@pytest.mark.parametrize("name", ["rotation", "context_encoder", "colorization", "split_brain"])
def test_pretext_loss_falls_on_the_embedded_data(make_method, name):
    method, data = make_method(name)
    torch.manual_seed(0)
    first, last = fit(method, data.train_images[:64], 25)
    assert last < 0.9 * first


@pytest.mark.parametrize("name", ["jigsaw", "relative_patch"])
def test_tile_tasks_learn_where_position_is_visible(make_method, name):
    # Shapes on flat backgrounds are too hard for a few steps; on colour ramps each tile shows
    # where it came from, so a labelling inconsistent with the tiles could not be learnt.
    method, _ = make_method(name, **({"permutations": 10} if name == "jigsaw" else {"color_dropping": False}))
    ramp = torch.linspace(0, 255, 16)
    image = torch.stack(
        [ramp[None].expand(16, 16), ramp[:, None].expand(16, 16), torch.full((16, 16), 128.0)]
    )
    torch.manual_seed(0)
    first, last = fit(method, image.to(torch.uint8)[None].repeat(64, 1, 1, 1), 40)
    assert last < 0.5 * first


def test_mae_masks_exactly_the_ratio_and_restores_the_order():
    from sslab.methods.mae import random_masking

    for ratio in (0.1, 0.5, 0.75, 0.9):
        kept, mask, restore = random_masking(8, 64, ratio, "cpu")
        masked = 64 - int(64 * (1 - ratio))  # MAE: len_keep = int(L * (1 - ratio))
        assert (mask.sum(1) == masked).all() and kept.shape == (8, 64 - masked)
        assert (torch.gather(mask, 1, kept) == 0).all()  # kept patches are the visible ones
        shuffled = torch.gather(torch.arange(64).expand(8, -1), 1, restore.argsort(1))
        assert torch.equal(torch.gather(shuffled, 1, restore), torch.arange(64).expand(8, -1))


def test_mae_loss_is_the_mse_on_masked_normalised_patches():
    from sslab.methods.mae import masked_patch_mse, patchify, unpatchify

    images = torch.rand(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48) and torch.equal(unpatchify(patches, 4), images)
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 4])  # patch 1 = top-right, pixel (0, 4)
    prediction, mask = torch.randn(2, 4, 48), torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    # He et al. 2022, Sec. 3: per-patch normalised target, MSE averaged over masked patches only
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((prediction - target) ** 2).mean(-1)
    expected = (per_patch[0, 0] + per_patch[0, 2] + per_patch[1, 3]) / 3
    assert torch.allclose(masked_patch_mse(prediction, patches, mask, True), expected)
    visible_changed = prediction + (1 - mask)[..., None] * 7
    assert torch.allclose(masked_patch_mse(visible_changed, patches, mask, True), expected)


def test_mae_needs_a_vit_and_learns(make_method, tiny_raw):
    from sslab.platform.config import ConfigError
    from sslab.platform.validate import build_study

    with pytest.raises(ConfigError, match="backbone.name.*needs one of vit_tiny"):
        build_study(tiny_raw | {"method": "mae"})
    tiny_raw["backbone"] = {"name": "vit_tiny", "width": 0.34}
    method, data = make_method("mae", mask_ratio=0.75)
    torch.manual_seed(0)
    _, metrics = method.training_step(data.train_images[:8], 0)
    assert metrics["masked_fraction"].item() == 0.75
    first, last = fit(method, data.train_images[:64], 25)
    assert last < 0.9 * first
    method.eval()
    assert method.artifacts(data)["reconstruction"].dtype == torch.uint8
