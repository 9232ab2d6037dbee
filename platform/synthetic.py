"""The embedded default dataset ("synthetic"): ten classes of shapes and textures drawn with
random colours, positions, sizes and noise, deterministic by seed, with a caption per image
(for image-text methods such as CLIP). Colour says nothing about the class, so a representation
must learn shape to separate them, which is what SSL augmentations are meant to teach.
"""

from __future__ import annotations

import math

import torch

from sslab.platform.config import DataConfig
from sslab.platform.dataset import Dataset

SYNTHETIC_CLASSES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "hbars",
    "vbars",
    "diagonal",
    "checker",
    "diamond",
)
# How captions name the classes and colours (for image-text methods such as CLIP).
SHAPE_WORDS = (
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal bars",
    "vertical bars",
    "diagonal stripes",
    "checkerboard",
    "diamond",
)
COLOUR_NAMES = {
    "red": (1, 0, 0),
    "orange": (1, 0.55, 0),
    "yellow": (1, 1, 0),
    "green": (0, 0.75, 0),
    "cyan": (0, 1, 1),
    "blue": (0, 0, 1),
    "purple": (0.5, 0, 0.6),
    "pink": (1, 0.5, 0.75),
    "white": (1, 1, 1),
    "black": (0, 0, 0),
    "gray": (0.5, 0.5, 0.5),
    "brown": (0.55, 0.3, 0.1),
}


def synthetic(cfg: DataConfig) -> Dataset:
    train_images, train_labels, train_captions = make_synthetic(cfg.train_size, cfg.image_size, seed=cfg.seed)
    test_images, test_labels, test_captions = make_synthetic(
        cfg.test_size, cfg.image_size, seed=cfg.seed + 1_000_003
    )
    prompts = [
        [caption(shape, fg, bg) for fg in COLOUR_NAMES for bg in COLOUR_NAMES if fg != bg]
        for shape in SHAPE_WORDS
    ]
    return Dataset(
        "synthetic",
        list(SYNTHETIC_CLASSES),
        train_images,
        train_labels,
        test_images,
        test_labels,
        train_captions,
        test_captions,
        prompts,
    )


def caption(shape: str, foreground: str, background: str) -> str:
    return f"a {foreground} {shape} on {background}"


def colour_names(rgb: torch.Tensor) -> list[str]:
    """The nearest named colour of each [N, 3] RGB row in [0, 1]."""
    names = list(COLOUR_NAMES)
    palette = torch.tensor(list(COLOUR_NAMES.values()), dtype=torch.float32)
    return [names[i] for i in torch.cdist(rgb.float(), palette).argmin(dim=1).tolist()]


def make_synthetic(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Draws `count` labelled, captioned images; the same seed gives the same images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % len(SYNTHETIC_CLASSES)
    labels = labels[torch.randperm(count, generator=g)]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=g)

    # Per-image geometry in [-1, 1] coordinates: centre, scale, rotation.
    centre = uniform(-0.3, 0.3, count, 2, 1, 1)
    scale = uniform(0.45, 0.8, count, 1, 1)
    angle = uniform(-0.5, 0.5, count, 1, 1)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    x, y = xx - centre[:, 0], yy - centre[:, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = (cos * x + sin * y) / scale, (-sin * x + cos * y) / scale
    freq = uniform(2.5, 4.5, count, 1, 1) * math.pi

    masks = torch.stack(
        [
            (u**2 + v**2 < 1.0),  # disk
            (u.abs() < 0.8) & (v.abs() < 0.8),  # square
            (v < 0.7) & (v > 1.6 * u.abs() - 0.9),  # triangle
            ((u**2 + v**2).sqrt() - 0.75).abs() < 0.22,  # ring
            ((u.abs() < 0.25) | (v.abs() < 0.25)) & (u.abs() < 1) & (v.abs() < 1),  # cross
            torch.sin(freq * v) > 0,  # horizontal bars
            torch.sin(freq * u) > 0,  # vertical bars
            torch.sin(freq * (u + v) / 1.4) > 0,  # diagonal stripes
            (torch.sin(freq * u) * torch.sin(freq * v)) > 0,  # checker
            (u.abs() + v.abs() < 1.0),  # diamond
        ],
        dim=1,
    )  # [count, 10, H, W]
    mask = masks[torch.arange(count), labels].unsqueeze(1).float()

    foreground = uniform(0, 1, count, 3, 1, 1)
    background = uniform(0, 1, count, 3, 1, 1)
    # Keep shapes visible: push the two colours apart where they are too close.
    too_close = (foreground - background).abs().sum(1, keepdim=True) < 0.6
    foreground = torch.where(too_close, 1 - background, foreground)
    gradient = uniform(-0.15, 0.15, count, 3, 1, 1) * yy
    image = mask * foreground + (1 - mask) * (background + gradient)
    image = image + 0.06 * torch.randn(count, 3, size, size, generator=g)
    captions = [
        caption(SHAPE_WORDS[label], fg, bg)
        for label, fg, bg in zip(
            labels.tolist(), colour_names(foreground.flatten(1)), colour_names(background.flatten(1))
        )
    ]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels, captions
