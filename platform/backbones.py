"""Backbones: ResNet-18/34/50 from torchvision's blocks (CIFAR stem, width multiplier) and
ViT-Tiny/Small from timm, whose ViT exposes patch_embed / blocks / norm for MAE and DINO.
Every backbone maps normalised images [N, 3, H, W] to features [N, dim].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision.models.resnet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sslab.platform.config import BackboneConfig


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how the network is built, and the facts validation and export ask of it."""

    build: Callable[[BackboneConfig, int], tuple[nn.Module, int]]  # (cfg, image size) -> (net, dim)
    # "resnet": exported in torchvision's layout; "vit": in timm's; anything else: sslab's own.
    family: str = "custom"
    resnet_block: str = ""  # torchvision.models.resnet's block class: "BasicBlock" or "Bottleneck"
    resnet_depths: tuple[int, ...] = ()  # blocks per stage
    vit_size: dict = field(default_factory=dict)  # embed_dim, depth, num_heads at width 1


def build_backbone(cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
    """Returns (backbone, feature dimension), built by the name's entry in BACKBONES."""
    return BACKBONES[cfg.name].build(cfg, image_size)


def resnet_widths(cfg: BackboneConfig) -> list[int]:
    """Channels of the four stages' blocks, torchvision's scaled by the width multiplier."""
    return [max(8, round(c * cfg.width)) for c in (64, 128, 256, 512)]


def _resnet(block_name: str, depths: tuple[int, ...], cfg: BackboneConfig, image_size: int):
    """torchvision's BasicBlock/Bottleneck stacked as in torchvision's ResNet, widths scaled."""
    block = getattr(torchvision.models.resnet, block_name)
    widths = resnet_widths(cfg)
    if cfg.cifar_stem:  # CIFAR variant (SimCLR App. B.9): 3x3 stride-1 conv, no max-pool
        stem = [
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
    else:
        stem = [
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
    layers, channels = list(stem), widths[0]
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            out = width * block.expansion
            downsample = None
            if stride != 1 or channels != out:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                )
            layers.append(block(channels, width, stride, downsample))
            channels = out
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _torchvision_init(net)
    return net, channels


def _torchvision_init(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(VisionTransformer):
    """timm's ViT, with the steps masked image modelling runs one by one as public methods."""

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> patch tokens with positions added, prefix (class) tokens first: [N, prefix + L, C]."""
        return self._pos_embed(self.patch_embed(x))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Any subset of `tokens(x)` (e.g. the visible patches) through the blocks and final norm."""
        return self.norm(self.blocks(self.norm_pre(tokens)))


def _vit(vit_size: dict, cfg: BackboneConfig, image_size: int) -> tuple[nn.Module, int]:
    size = dict(vit_size)
    size["embed_dim"] = max(
        size["num_heads"], round(size["embed_dim"] * cfg.width / size["num_heads"]) * size["num_heads"]
    )
    net = ViT(
        img_size=image_size,
        patch_size=cfg.patch_size,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        **size,
    )  # any crop size (multi-crop)
    return net, net.num_features


def resnet(block: str, depths: tuple[int, ...]) -> Backbone:
    return Backbone(functools.partial(_resnet, block, depths), "resnet", block, depths)


def vit(embed_dim: int, depth: int, num_heads: int) -> Backbone:
    size = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    return Backbone(functools.partial(_vit, size), "vit", vit_size=size)


# name -> entry: validation, building and export all read this table, so another ResNet depth or
# ViT size is one line here.
BACKBONES = {
    "resnet18": resnet("BasicBlock", (2, 2, 2, 2)),
    "resnet34": resnet("BasicBlock", (3, 4, 6, 3)),
    "resnet50": resnet("Bottleneck", (3, 4, 6, 3)),
    "vit_tiny": vit(embed_dim=192, depth=12, num_heads=3),
    "vit_small": vit(embed_dim=384, depth=12, num_heads=6),
}


def spatial_features(backbone: nn.Module, x):
    """The backbone's last feature map [N, C, h, w] before pooling, for dense pretext tasks
    (colorization, split-brain): a ResNet's last stage, or a ViT's patch tokens as a grid."""
    if hasattr(backbone, "forward_features"):  # timm ViT
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens :]
        n, length, c = tokens.shape
        side = int(round(length**0.5))
        return tokens.transpose(1, 2).reshape(n, c, side, length // side)
    return backbone[:-2](x)  # drop AdaptiveAvgPool2d and Flatten
