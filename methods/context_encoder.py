"""Context encoder inpainting: Pathak et al. 2016, Context Encoders: Feature Learning by Inpainting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sslab.methods.base import Method, MethodContext, image_grid
from sslab.platform.augment import CROP_FLIP, AugmentRecipe
from sslab.platform.config import check


def region_masks(n: int, size: int, kind: str, fraction: float, device) -> torch.Tensor:
    """[n, 1, size, size] masks, 1 where pixels are dropped (Pathak et al., Sec. 3.3):
    central: one centred square of `fraction` of the area; random_blocks: squares of 1/16 of
    the area at random places until `fraction` is covered; random_region: smoothed noise
    thresholded at its `fraction` quantile (arbitrary shapes, as the paper's segment masks)."""
    if kind == "central":
        side = round(size * math.sqrt(fraction))
        start = (size - side) // 2
        mask = torch.zeros(n, 1, size, size, device=device)
        mask[..., start : start + side, start : start + side] = 1
        return mask
    if kind == "random_blocks":
        return _random_blocks(n, size, fraction, device)
    noise = F.interpolate(
        torch.rand(n, 1, max(2, size // 8), max(2, size // 8), device=device),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    )
    threshold = noise.flatten(1).quantile(1 - fraction, dim=1).view(n, 1, 1, 1)
    return (noise >= threshold).float()


def _random_blocks(n: int, size: int, fraction: float, device) -> torch.Tensor:
    side = max(1, size // 4)
    mask = torch.zeros(n, 1, size, size, device=device)
    coords = torch.arange(size, device=device)
    for _ in range(64):  # 1/16 of the area each: a few blocks cover any fraction < 1
        todo = mask.mean(dim=(1, 2, 3)) < fraction
        if not todo.any():
            break
        top, left = torch.randint(0, size - side + 1, (2, n), device=device)
        rows = (coords >= top[:, None]) & (coords < top[:, None] + side)
        cols = (coords >= left[:, None]) & (coords < left[:, None] + side)
        block = (rows[:, :, None] & cols[:, None, :])[:, None] & todo[:, None, None, None]
        mask = torch.maximum(mask, block.float())
    return mask


def masked_l2(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_rec = ||M * (x - F((1 - M) * x))||^2 (Pathak et al., eq. 1), averaged over dropped pixels."""
    squared = (mask * (target - prediction)) ** 2
    return squared.sum() / (mask.sum() * target.shape[1]).clamp(min=1)


def upsampling_decoder(in_dim: int, size: int, channels: int = 64, out_channels: int = 3) -> nn.Module:
    """A pooled feature vector -> an image: a linear layer to a 4x4 map, then x2 up-convolutions."""
    stages = max(0, round(math.log2(size / 4)))
    layers: list[nn.Module] = [nn.Linear(in_dim, channels * 16), nn.Unflatten(1, (channels, 4, 4))]
    for _ in range(stages):
        layers += [
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1),
        ]
    layers += [nn.ReLU(inplace=True), nn.Conv2d(channels, out_channels, 3, padding=1)]
    if 4 * 2**stages != size:
        layers.append(nn.Upsample(size=(size, size), mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


def discriminator(channels: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 4, 2, 1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(channels, channels * 2, 4, 2, 1),
        nn.BatchNorm2d(channels * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels * 2, 1),
    )


@dataclass
class ContextEncoderArgs:
    mask: Literal["central", "random_blocks", "random_region"] = "random_blocks"
    mask_fraction: float = check(default=0.25, gt=0, lt=1)  # the paper's central block: 1/4 of the area
    # lambda_adv of eq. 3 (the paper: 0.001 against 0.999 for L2); 0: no discriminator, pure L2
    adversarial_weight: float = check(default=0.0, ge=0, lt=1)
    decoder_channels: int = check(default=64, gt=0)


class ContextEncoder(Method):
    """The backbone encodes an image with a region dropped; a decoder fills it in."""

    name = "context_encoder"
    Args = ContextEncoderArgs

    def __init__(self, args: ContextEncoderArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.decoder = upsampling_decoder(ctx.feature_dim, ctx.image_size, args.decoder_channels)
        self.discriminator = discriminator() if args.adversarial_weight > 0 else nn.Identity()

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return CROP_FLIP

    def inpaint(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the decoder's full prediction; dropped pixels enter as 0 (the mean)."""
        return self.decoder(self.backbone(images * (1 - mask)))

    def training_step(self, images, step, index=None):
        x = self.augment(images)
        mask = region_masks(len(x), x.shape[-1], self.args.mask, self.args.mask_fraction, x.device)
        prediction = self.inpaint(x, mask)
        rec = masked_l2(prediction, x, mask)
        lam = self.args.adversarial_weight
        if lam == 0:
            return rec, {"rec_loss": rec.detach()}
        filled = x * (1 - mask) + prediction * mask
        # One optimiser trains both players: the generator's term sees the discriminator through
        # detached weights (no gradient to D), the discriminator's own term sees a detached fake.
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fooled = functional_call(self.discriminator, frozen, (filled,))
        adv = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        real, fake = self.discriminator(x), self.discriminator(filled.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        loss = (1 - lam) * rec + lam * adv + d_loss  # eq. 3, plus the discriminator's objective
        return loss, {"rec_loss": rec.detach(), "adv_loss": adv.detach(), "d_loss": d_loss.detach()}

    @torch.no_grad()
    def artifacts(self, data):
        images = data.test_images[:8].to(self.normalize.mean.device)
        x = self.normalize(images)
        mask = region_masks(len(x), x.shape[-1], self.args.mask, self.args.mask_fraction, x.device)
        filled = x * (1 - mask) + self.inpaint(x, mask) * mask
        rows = [x * (1 - mask), filled, x]  # input, inpainted, original
        return {"inpainting": image_grid([self.normalize.invert(r) for r in rows])}
