"""The embedded video default ("synthetic_video"): clips of textured, coloured shapes moving over
a textured background, bouncing off the borders and passing over one another, with the instance
mask of every frame (0: background, 1..n: the objects, the top-most one where they overlap).

What makes it a tracking problem: an object's colour says which object it is, but the grey frames
a colourisation model sees carry only its shape and texture, and objects move several pixels per
frame, so copying the first frame's mask in place goes wrong within a few frames.
Deterministic by seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslab.platform.config import DataConfig
from sslab.platform.dataset import Dataset, no_labels

SHAPES = ("disk", "square", "diamond")  # the unit balls of the L2, L-inf and L1 norms


def synthetic_video(cfg: DataConfig) -> Dataset:
    generator = torch.Generator().manual_seed(cfg.seed)
    train, _ = clips(cfg.train_size, cfg.clip_length, cfg.image_size, generator)
    test, test_masks = clips(cfg.test_size, cfg.clip_length, cfg.image_size, generator)
    return Dataset(
        "synthetic_video",
        [],
        train,
        no_labels(len(train)),
        test,
        no_labels(len(test)),
        test_masks=test_masks,
    )


def clips(
    count: int, length: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` clips: uint8 frames [count, length, 3, size, size] and masks [count, length, size, size]."""
    frames = torch.empty(count, length, 3, size, size, dtype=torch.uint8)
    masks = torch.empty(count, length, size, size, dtype=torch.uint8)
    for i in range(count):
        frames[i], masks[i] = one_clip(length, size, generator)
    return frames, masks


def one_clip(length: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rand = lambda *shape: torch.rand(*shape, generator=g)
    scale = size / 64
    frames = background(length, size, g)
    masks = torch.zeros(length, size, size, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    num_objects = 2 + int(rand(1) < 0.5)
    for obj in range(1, num_objects + 1):  # later objects pass over earlier ones
        radius = (7 + 5 * rand(1).item()) * scale
        centre = radius + rand(2) * (size - 2 * radius)
        angle, speed = 2 * math.pi * rand(1).item(), (1.5 + 2.0 * rand(1).item()) * scale
        velocity = torch.tensor([math.sin(angle), math.cos(angle)]) * speed
        shape = SHAPES[int(rand(1).item() * len(SHAPES))]
        colour = saturated_colour(g)
        stripe_angle, stripe_period = math.pi * rand(1).item(), (3 + 4 * rand(1).item()) * scale
        for t in range(length):
            dy, dx = ys - centre[0], xs - centre[1]
            inside = shape_mask(shape, dy, dx, radius)
            # stripes that move with the object: its texture, visible in grey
            phase = (dy * math.sin(stripe_angle) + dx * math.cos(stripe_angle)) * (
                2 * math.pi / stripe_period
            )
            shade = 0.65 + 0.35 * (0.5 + 0.5 * torch.sin(phase))
            frames[t][:, inside] = (colour[:, None] * shade[inside][None]).mul(255).round().byte()
            masks[t][inside] = obj
            centre, velocity = bounce(centre + velocity, velocity, radius, size)
    noise = (torch.randn(frames.shape, generator=g) * 4).round()
    return (frames.float() + noise).clamp(0, 255).byte(), masks


def shape_mask(shape: str, dy: torch.Tensor, dx: torch.Tensor, radius: float) -> torch.Tensor:
    if shape == "disk":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return torch.maximum(dy.abs(), dx.abs()) <= radius * 0.85
    return dy.abs() + dx.abs() <= radius * 1.2  # diamond


def bounce(centre: torch.Tensor, velocity: torch.Tensor, radius: float, size: int):
    """Reflects the motion off the frame's borders (the object stays whole in view)."""
    low, high = radius, size - 1 - radius
    out = (centre < low) | (centre > high)
    velocity = torch.where(out, -velocity, velocity)
    return centre.clamp(low, high), velocity


def saturated_colour(g: torch.Generator) -> torch.Tensor:
    """A random hue at high saturation and value, RGB in [0, 1]: colours a grey frame cannot tell apart."""
    hue = torch.rand(1, generator=g).item() * 6
    sector, f = int(hue), hue - int(hue)
    value, saturation = 0.75 + 0.25 * torch.rand(1, generator=g).item(), 0.85
    p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
    rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][
        sector % 6
    ]
    return torch.tensor(rgb)


def background(length: int, size: int, g: torch.Generator) -> torch.Tensor:
    """A still, smooth colour field with fine texture, the same in every frame of the clip."""
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 0.6 + 0.2
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    grain = F.interpolate(
        torch.rand(1, 1, size // 4, size // 4, generator=g), size=(size, size), mode="nearest"
    )[0]
    picture = (field * (0.8 + 0.2 * grain)).clamp(0, 1).mul(255).round().byte()
    return picture.expand(length, -1, -1, -1).clone()
