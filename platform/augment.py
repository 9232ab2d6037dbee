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
    """The views drawn at least once (validation skips the others too: SwAV's local crops at
    32 px, drawn 0 times, may hold a crop range a study's `augment.crop_scale_min` inverts)."""
    return {
        name: Augment(view.recipe, view.size or image_size, normalize)
        for name, view in resolve_views(declared, overrides).items()
        if view.count
    }


def channel_stats(images: torch.Tensor, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (or clips [N, T, 3, H, W]: their frames), in [0, 1]
    units (for normalisation), from up to `max_images` spread evenly over the set (an image
    folder is sorted by class: its first images are one class); image files: up to 2,000."""
    if not torch.is_tensor(images):
        max_images = min(max_images, 2000)  # decoded for this
    picked = torch.linspace(0, len(images) - 1, min(len(images), max_images)).round().long()
    sample = images[picked].flatten(0, -4).float().div_(255)
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
            # "resample": one batched warp rather than a crop-and-resize per image (1.5x faster).
            K.RandomResizedCrop(
                (size, size), scale=(recipe.crop_scale_min, recipe.crop_scale_max), cropping_mode="resample"
            ),
            K.RandomHorizontalFlip(p=recipe.flip_p),
        ]
        if recipe.jitter_p > 0 and s > 0:
            ops.append(ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5), p=recipe.jitter_p))
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


# ----------------------------------------------------------------------------- colour jitter

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor per image."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates each image's hue by `shift` turns, keeping value and saturation: torchvision's
    adjust_hue (RGB -> HSV -> RGB) without its per-case branches. A pixel's max and max - min
    (value and chroma) are kept; its hue sector and position come from which channel is max."""
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r_is_max, g_is_max = value == r, (value == g) & (value != r)
    hue = torch.where(
        r_is_max, (g - b) / safe, torch.where(g_is_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    hue = torch.remainder(hue / 6.0 + shift.view(-1, 1, 1), 1.0) * 6.0  # in sectors, [0, 6)
    # HSV -> RGB branch-free: channel n in (R: 5, G: 3, B: 1) is v - c * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6h) mod 6.
    offsets = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # made there
    k = torch.remainder(offsets + hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * ramp


class ColorJitter(nn.Module):
    """torchvision's ColorJitter on a batch: per image, with probability p, brightness, contrast,
    saturation and hue factors drawn as torchvision draws them, applied in a random order (one
    order per call, as kornia's), each op as torchvision's functional one."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0):
        super().__init__()
        ranges = [(max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast)]
        ranges += [(max(0.0, 1 - saturation), 1 + saturation), (-hue, hue)]
        # Buffers: they follow the module to its device, so drawing copies nothing from the host.
        self.register_buffer("low", torch.tensor([r[0] for r in ranges]), persistent=False)
        self.register_buffer("high", torch.tensor([r[1] for r in ranges]), persistent=False)
        self.p = p

    def draw(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(factors [n, 4] for brightness, contrast, saturation, hue; which images; the order)."""
        low, high = self.low.to(device), self.high.to(device)
        factors = low + (high - low) * torch.rand(n, 4, device=device)
        return factors, torch.rand(n, device=device) < self.p, torch.randperm(4).tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_params(x, *self.draw(len(x), x.device))

    @staticmethod
    def apply_params(x: torch.Tensor, factors: torch.Tensor, applied: torch.Tensor, order: list[int]):
        out = x.clamp(0, 1)
        for op in order:
            f = factors[:, op]
            if op == 0:
                out = blend(out, torch.zeros_like(out), f)
            elif op == 1:
                out = blend(out, grayscale(out).mean(dim=(1, 2, 3), keepdim=True), f)
            elif op == 2:
                out = blend(out, grayscale(out), f)
            else:
                out = shift_hue(out, f)
        return torch.where(applied.view(-1, 1, 1, 1), out, x)
