"""MAE: He et al. 2022, Masked Autoencoders Are Scalable Vision Learners."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslab.methods.base import Method, MethodContext, image_grid
from sslab.platform.augment import AugmentRecipe
from sslab.platform.config import check


def random_masking(
    n: int, length: int, ratio: float, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting noise (MAE Sec. 3): exactly length - int(length *
    (1 - ratio)) patches masked in every sample. Returns (indices kept [n, keep], mask [n, length]
    with 1 = masked, restore [n, length]: argsort that undoes the shuffle)."""
    keep = int(length * (1 - ratio))
    shuffle = torch.rand(n, length, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], torch.gather(mask, 1, restore), restore


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, patch * patch * C], patches row-major."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    n, length, _ = patches.shape
    side = int(round(length**0.5))
    x = patches.reshape(n, side, side, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, side * patch, side * patch)


def masked_patch_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalise_target: bool
) -> torch.Tensor:
    """MSE per patch, averaged over the masked patches only (MAE Sec. 3 'Reconstruction target');
    with `normalise_target`, each target patch is standardised by its own mean and variance."""
    if normalise_target:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class MAEArgs:
    mask_ratio: float = check(default=0.75, ge=0.05, le=0.95)
    norm_pix_loss: bool = True  # per-patch normalised targets (the paper's default)
    decoder_dim: int = check(default=128, gt=0)
    decoder_depth: int = check(
        default=2, ge=1
    )  # the paper: 8 blocks, but 1 already fine-tunes as well (Table 1a)
    decoder_heads: int = check(default=4, ge=1)


class MAE(Method):
    """The ViT encoder sees only the visible patches; a light decoder, given mask tokens at the
    masked positions, reconstructs their pixels."""

    name = "mae"
    Args = MAEArgs
    backbone_family = "vit"
    # The authors' main_pretrain.py: AdamW at 1.5e-4 per 256 images scaled linearly, betas (0.9,
    # 0.95), weight decay 0.05 on weights only (timm's add_weight_decay: biases and norms at 0,
    # the platform's groups), 40 warm-up epochs of 400-1,600. At 32 px no recipe of theirs:
    # mae_mask_ratio's short-budget one (lr 1e-3, 2 warm-up epochs) with their betas.
    train_recipe = {
        "optimizer": "adamw",
        "lr": 1.5e-4,
        "lr_scaling": "linear",
        "weight_decay": 0.05,
        "adamw_beta2": 0.95,
        "warmup_epochs": 40,
    }
    small_image_train_recipe = {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "adamw_beta2": 0.95,
        "warmup_epochs": 2,
    }

    def __init__(self, args: MAEArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        from timm.models.vision_transformer import Block

        vit = ctx.backbone
        self.patch = vit.patch_embed.patch_size[0]
        length = (ctx.image_size // self.patch) ** 2
        self.decoder = nn.ModuleDict(
            {
                "embed": nn.Linear(ctx.feature_dim, args.decoder_dim),
                "blocks": nn.Sequential(
                    *[Block(args.decoder_dim, args.decoder_heads) for _ in range(args.decoder_depth)]
                ),
                "norm": nn.LayerNorm(args.decoder_dim),
                "predict": nn.Linear(args.decoder_dim, self.patch**2 * 3),
            }
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, args.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, vit.num_prefix_tokens + length, args.decoder_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return AugmentRecipe(
            crop_scale_min=0.2, jitter_p=0.0, grayscale_p=0.0
        )  # crop and flip only (Sec. A.1)

    def encode_visible(self, x: torch.Tensor, ratio: float):
        """Embeds all patches (with positions), keeps the unmasked ones, runs the encoder on them."""
        vit = self.backbone
        tokens = vit.tokens(x)  # [N, prefix + L, C], positions added
        prefix, patches = tokens[:, : vit.num_prefix_tokens], tokens[:, vit.num_prefix_tokens :]
        kept, mask, restore = random_masking(len(x), patches.shape[1], ratio, x.device)
        visible = torch.gather(patches, 1, kept[..., None].expand(-1, -1, patches.shape[-1]))
        encoded = vit.encode_tokens(torch.cat([prefix, visible], dim=1))
        return encoded, mask, restore

    def decode(self, encoded: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Visible tokens + mask tokens, unshuffled to image order -> per-patch pixels [N, L, p*p*3]."""
        d, prefix = self.decoder, self.backbone.num_prefix_tokens
        x = d["embed"](encoded)
        masked = restore.shape[1] - (x.shape[1] - prefix)
        patches = torch.cat([x[:, prefix:], self.mask_token.expand(len(x), masked, -1)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos
        return d["predict"](d["norm"](d["blocks"](x)))[:, prefix:]

    def training_step(self, images, step, index=None):
        x = self.augment(images)
        encoded, mask, restore = self.encode_visible(x, self.args.mask_ratio)
        prediction = self.decode(encoded, restore)
        loss = masked_patch_mse(prediction, patchify(x, self.patch), mask, self.args.norm_pix_loss)
        return loss, {"masked_fraction": mask.mean()}

    @torch.no_grad()
    def artifacts(self, data):
        x = self.normalize(data.test_images[:8].to(self.mask_token.device))
        encoded, mask, restore = self.encode_visible(x, self.args.mask_ratio)
        prediction, target = self.decode(encoded, restore), patchify(x, self.patch)
        if self.args.norm_pix_loss:  # back to pixels with each target patch's own statistics
            prediction = prediction * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(
                -1, keepdim=True
            )
        keep = (1 - mask)[..., None]
        masked_input = unpatchify(target * keep, self.patch)
        pasted = unpatchify(target * keep + prediction * (1 - keep), self.patch)
        rows = [masked_input, pasted, x]  # masked input, reconstruction with visible patches, original
        return {"reconstruction": image_grid([self.normalize.invert(r) for r in rows])}
