"""Colorization: Zhang, Isola & Efros 2016, Colorful Image Colorization.

Lightness L in, a distribution over quantised ab colours out, per pixel. Shared with the
split-brain autoencoder: the Lab conversion, the in-gamut ab bins and their encodings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Encoder, Method, MethodContext, image_grid
from sslab.methods.losses import in_fp32
from sslab.platform.augment import CROP_FLIP, AugmentRecipe
from sslab.platform.backbones import spatial_features
from sslab.platform.config import check


@in_fp32  # targets from exact colours: bf16 would misplace ab by ~0.5
def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] sRGB in [0, 1] -> Lab (L in [0, 100], a and b roughly in [-110, 110]), D65."""
    import kornia.color

    return kornia.color.rgb_to_lab(rgb.float())


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    import kornia.color

    return kornia.color.lab_to_rgb(lab, clip=True)


@functools.lru_cache(maxsize=4)
def ab_bins(grid: int = 10) -> torch.Tensor:
    """Centres [Q, 2] of the ab cells (side `grid`) that some sRGB colour falls in. Zhang et al.
    report Q = 313 at grid 10 from their gamut; kornia's D65 sRGB gives 261 cells (see tests)."""
    levels = torch.linspace(0, 1, 65)
    cube = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(1, 3, -1, 1)
    ab = rgb_to_lab(cube)[0, 1:].reshape(2, -1).T
    return torch.unique(torch.round(ab / grid), dim=0) * grid


@in_fp32
def nearest_bin(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """[N, 2, H, W] ab -> [N, H, W] index of the nearest bin centre."""
    return _squared_distances(ab, bins).argmin(1)


def _squared_distances(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    return ((ab[:, None] - bins.to(ab)[None, :, :, None, None]) ** 2).sum(2)  # [N, Q, H, W]


@in_fp32
def soft_encode(
    ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0
) -> torch.Tensor:
    """Zhang et al. Sec. 2.1: each pixel's ab spread over its 5 nearest bins, weighted by a
    Gaussian (sigma 5) of the distance and normalised. [N, 2, H, W] -> [N, Q, H, W]."""
    distances, nearest = _squared_distances(ab, bins).topk(neighbours, dim=1, largest=False)
    weights = torch.softmax(-distances / (2 * sigma**2), dim=1)
    return torch.zeros(ab.shape[0], len(bins), *ab.shape[2:], device=ab.device).scatter_(1, nearest, weights)


def rebalancing_weights(
    bin_probability: torch.Tensor, bins: torch.Tensor, mix: float = 0.5, sigma: float = 5.0
) -> torch.Tensor:
    """Zhang et al. eq. 4: w ~ ((1 - lambda) p~ + lambda / Q)^-1 with p~ the empirical bin
    distribution smoothed by a Gaussian (sigma 5), normalised so that E_p~[w] = 1."""
    kernel = torch.exp(-(torch.cdist(bins.float(), bins.float()) ** 2) / (2 * sigma**2))
    smoothed = kernel @ bin_probability
    smoothed = smoothed / smoothed.sum()
    weights = 1 / ((1 - mix) * smoothed + mix / len(bins))
    return weights / (smoothed * weights).sum()


def annealed_mean(probabilities: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Zhang et al. eq. 5: re-sharpen the distribution as exp(log z / T) and take its mean ab
    (T = 1: the mean; T -> 0: the mode). [N, Q, H, W] -> [N, 2, H, W]."""
    sharpened = torch.softmax(torch.log(probabilities.clamp(min=1e-12)) / temperature, dim=1)
    return torch.einsum("nqhw,qc->nchw", sharpened, bins.to(probabilities))


def rebalanced_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, bin_weights: torch.Tensor
) -> torch.Tensor:
    """Zhang et al. eq. 2: -sum_hw v(Z_hw) sum_q Z_hwq log Z^_hwq, with v the weight of the
    target's most likely bin; averaged over pixels and images. [N, Q, H, W] logits and target."""
    pixel_weight = bin_weights[target.argmax(1)]
    return -(pixel_weight * (target * F.log_softmax(logits.float(), dim=1)).sum(1)).mean()


def lightness_input(lab: torch.Tensor) -> torch.Tensor:
    """L (0..100) -> a centred 3-channel grey image the backbone can take."""
    return (lab[:, :1] / 50 - 1).expand(-1, 3, -1, -1)


def dense_head(in_channels: int, out_channels: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )


def dense_logits(backbone: nn.Module, head: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-pixel logits at `size` x `size` from the backbone's last feature map."""
    logits = head(spatial_features(backbone, x))
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def empirical_bin_probability(
    images: torch.Tensor, bins: torch.Tensor, max_images: int = 2000
) -> torch.Tensor:
    """How often each ab bin is the nearest to a pixel of (up to `max_images`) training images."""
    lab = rgb_to_lab(images[:max_images].float().div(255))
    counts = torch.bincount(nearest_bin(lab[:, 1:], bins).flatten(), minlength=len(bins)).float()
    return counts / counts.sum()


@dataclass
class ColorizationArgs:
    grid: int = check(default=10, gt=0)  # ab quantisation step
    rebalance: bool = True  # class rebalancing (eq. 4)
    rebalance_mix: float = check(default=0.5, ge=0, le=1)  # lambda
    temperature: float = check(default=0.38, gt=0)  # annealed-mean T
    output_stride: int = check(default=2, ge=1)  # targets at 1/stride of the image side


class Colorization(Method):
    """Multinomial cross-entropy between soft-encoded ab targets and the predicted distribution,
    each pixel weighted by its colour's rarity (eq. 2)."""

    name = "colorization"
    Args = ColorizationArgs

    def __init__(self, args: ColorizationArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.register_buffer("bins", ab_bins(args.grid).clone())
        self.head = dense_head(ctx.feature_dim, len(self.bins))  # last map's channels = pooled dim
        weights = torch.ones(len(self.bins))
        if args.rebalance and ctx.dataset is not None:
            probability = empirical_bin_probability(ctx.dataset.ssl_images, self.bins)
            weights = rebalancing_weights(probability.cpu(), self.bins.cpu(), args.rebalance_mix)
        self.register_buffer("bin_weights", weights)
        self.target_size = ctx.image_size // args.output_stride

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return CROP_FLIP  # colour is the target

    def training_step(self, images, step, index=None):
        lab = rgb_to_lab(self.augment.unit(images))
        logits = dense_logits(self.backbone, self.head, lightness_input(lab), self.target_size)
        target_ab = F.interpolate(lab[:, 1:], size=logits.shape[-2:], mode="area")
        target = soft_encode(target_ab, self.bins)
        loss = rebalanced_cross_entropy(logits, target, self.bin_weights)
        return loss, {"target_entropy": -(target * target.clamp(min=1e-12).log()).sum(1).mean()}

    @torch.no_grad()
    def colourise(self, rgb: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(rgb)
        logits = dense_logits(self.backbone, self.head, lightness_input(lab), self.target_size)
        ab = annealed_mean(torch.softmax(logits.float(), 1), self.bins, self.args.temperature)
        ab = F.interpolate(ab, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))

    @torch.no_grad()
    def artifacts(self, data):
        rgb = self.normalize.to_unit(data.test_images[:8].to(self.bins.device))
        grey = lab_to_rgb(torch.cat([rgb_to_lab(rgb)[:, :1], torch.zeros_like(rgb[:, :2])], 1))
        return {"colorization": image_grid([grey, self.colourise(rgb), rgb])}

    def encoder(self) -> Encoder:
        return Encoder(self.backbone, self.feature_dim, self.lightness)  # the network sees L only

    def lightness(self, images: torch.Tensor) -> torch.Tensor:
        return lightness_input(rgb_to_lab(self.normalize.to_unit(images)))
