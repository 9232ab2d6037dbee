import pytest
import torch
import torchvision

from sslab.platform.augment import Augment, AugmentRecipe, ColorJitter, Normalize, channel_stats
from sslab.platform.backbones import build_backbone
from sslab.platform.config import AugmentConfig, BackboneConfig
from sslab.platform.synthetic import make_synthetic


def test_augment_draws_parameters_per_sample():
    images, _, _ = make_synthetic(1, 32, seed=0)
    batch = images.repeat(16, 1, 1, 1)  # 16 copies of one image
    augment = Augment(AugmentRecipe(blur_p=0.5, solarize_p=0.2), 32, Normalize(*channel_stats(batch)))
    views = augment(batch)
    assert views.shape == (16, 3, 32, 32) and views.dtype == torch.float32
    distinct = {tuple(v.flatten()[:64].tolist()) for v in views}
    assert len(distinct) == 16  # a batch-wide crop would give 1


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
def test_color_jitter_is_torchvisions_per_image(order):
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 16, 16, generator=g)
    images[0] = 0.5  # grey: no hue
    images[1, :, :8] = images[1, :1, :8]  # channels equal on half of it
    images[2, 1] = images[2, 0]  # red and green tie for the max
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)
    factors, _, _ = jitter.draw(12, "cpu")
    applied = torch.arange(12) % 4 != 3  # p=0.8 leaves some images alone
    ours = ColorJitter.apply_params(images, factors, applied, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i, image in enumerate(images):
        expected = image
        for op in order if applied[i] else []:
            expected = ops[op](expected, factors[i, op].item())
        torch.testing.assert_close(ours[i], expected, atol=2e-5, rtol=0)


def test_recipe_overrides_only_fields_set():
    recipe = AugmentRecipe().with_overrides(AugmentConfig(blur_p=0.5))
    assert recipe.blur_p == 0.5 and recipe.crop_scale_min == AugmentRecipe().crop_scale_min


def test_normalize_gives_zero_mean_unit_std():
    images, _, _ = make_synthetic(256, 16, seed=1)
    x = Normalize(*channel_stats(images))(images)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_resnet18_matches_torchvision_parameter_count():
    ours, dim = build_backbone(BackboneConfig(name="resnet18", cifar_stem=False), 32)
    reference = torchvision.models.resnet18()
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    assert dim == 512 and sum(p.numel() for p in ours.parameters()) == expected


@pytest.mark.parametrize(
    "cfg, dim",
    [
        (BackboneConfig(name="resnet18", width=0.5), 256),
        (BackboneConfig(name="resnet50", width=0.125), 64 * 4),  # Bottleneck expansion 4
        (BackboneConfig(name="vit_tiny", patch_size=8), 192),
    ],
)
def test_backbones_map_images_to_features(cfg, dim):
    net, feature_dim = build_backbone(cfg, 32)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feature_dim) and feature_dim == dim


def test_cifar_stem_keeps_resolution():
    net, _ = build_backbone(BackboneConfig(width=0.125, cifar_stem=True), 32)
    assert net[0].stride == (1, 1) and not any(isinstance(m, torch.nn.MaxPool2d) for m in net)


def test_a_backbone_is_one_registry_entry_for_validation_and_building(tiny_raw, monkeypatch):
    from torch import nn

    from sslab.platform import backbones
    from sslab.platform.config import ConfigError
    from sslab.platform.validate import build_study

    tiny_raw["backbone"] = {"name": "linear_probe_net"}
    with pytest.raises(ConfigError, match="backbone.name"):
        build_study(tiny_raw)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7))
    entry = backbones.Backbone(lambda cfg, size: (net, 7))
    monkeypatch.setitem(backbones.BACKBONES, "linear_probe_net", entry)
    study = build_study(tiny_raw)
    assert backbones.build_backbone(study.backbone, 16) == (net, 7)
