"""Batched augmentations on the training device, with per-sample random parameters.

Built on kornia.augmentation: every op draws its parameters per sample (a batch-wide crop would
not be SimCLR's augmentation), runs on whatever device the batch is on, and needs no DataLoader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sslab.platform.config import AugmentConfig, AugmentOverrides


@dataclass
class AugmentRecipe:
    """One view's augmentation; defaults are SimCLR's CIFAR-10 recipe (Chen et al. 2020, App. B.9)."""

    crop_scale_min: float = 0.08
    crop_scale_max: float = 1.0
    flip_p: float = 0.5
    jitter_strength: float = 0.5  # s: brightness/contrast/saturation 0.8s, hue 0.2s
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # SimCLR drops blur on CIFAR-10's 32x32 images
    solarize_p: float = 0.0

    def with_overrides(self, overrides: AugmentOverrides) -> AugmentRecipe:
        fields = {f.name for f in dataclasses.fields(AugmentOverrides)}
        changes = {k: getattr(overrides, k) for k in fields if getattr(overrides, k) is not None}
        return dataclasses.replace(self, **changes)


# Geometry only, no colour changes: the pretext tasks whose target is colour or position.
CROP_FLIP = AugmentRecipe(crop_scale_min=0.5, jitter_p=0.0, grayscale_p=0.0)


@dataclass(frozen=True)
class View:
    """A kind of view a method trains on: its augmentation, its side in pixels (None: the
    images' own), and how many per image. Methods declare them; the platform builds them and
    applies the study's `augment:` overrides to every one."""

    recipe: AugmentRecipe
    size: int | None = None
    count: int = 1


def resolve_views(declared: dict[str, View], overrides: AugmentConfig) -> dict[str, View]:
    """Each declared view with the study's overrides: those for all views, then its own."""
    resolved = {}
    for name, view in declared.items():
        recipe = view.recipe.with_overrides(overrides)
        if name in overrides.views:
            recipe = recipe.with_overrides(overrides.views[name])
        resolved[name] = dataclasses.replace(view, recipe=recipe)
    return resolved


def build_views(
    declared: dict[str, View], overrides: AugmentConfig, image_size: int, normalize: Normalize
) -> dict[str, Augment]:
    return {
        name: Augment(view.recipe, view.size or image_size, normalize)
        for name, view in resolve_views(declared, overrides).items()
    }


def channel_stats(images: torch.Tensor, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (for normalisation)."""
    sample = images[:max_images].float().div_(255)
    return sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).tolist()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


class Normalize(nn.Module):
    """uint8 [N, 3, H, W] -> normalised float, the input every backbone sees."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels_last = channels_last

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        return to_unit(images)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> [0, 1] RGB (unclamped), e.g. to show reconstructions."""
        return x * self.std + self.mean

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.to_unit(images) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class Augment(nn.Module):
    """uint8 batch -> one augmented, normalised view per image (fresh random parameters per call)."""

    def __init__(self, recipe: AugmentRecipe, size: int, normalize: Normalize | None):
        super().__init__()
        import kornia.augmentation as K

        s = recipe.jitter_strength
        ops = [
            K.RandomResizedCrop((size, size), scale=(recipe.crop_scale_min, recipe.crop_scale_max)),
            K.RandomHorizontalFlip(p=recipe.flip_p),
        ]
        if recipe.jitter_p > 0 and s > 0:
            ops.append(K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5), p=recipe.jitter_p))
        if recipe.grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=recipe.grayscale_p))
        if recipe.blur_p > 0:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the side, odd (SimCLR)
            ops.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=recipe.blur_p))
        if recipe.solarize_p > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=recipe.solarize_p))
        self.ops = nn.Sequential(*ops)
        self.normalize = normalize
        self.recipe = recipe

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.unit(images))

    def unit(self, images: torch.Tensor) -> torch.Tensor:
        """The augmented view in [0, 1] RGB, not normalised (for colour-space pretext tasks)."""
        return self.ops(to_unit(images))
