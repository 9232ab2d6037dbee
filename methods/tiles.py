"""Tiles of a grid with gaps and jitter, shared by jigsaw and relative patch location.

A trivial solution of both tasks follows edges and textures across tile borders; Doersch et al.
(2015, Sec. 3) and Noroozi & Favaro (2016, Sec. 3.2) leave a gap between tiles and jitter each
tile inside its cell. Every tile here keeps at least `min_gap` pixels from its neighbours.
"""

from __future__ import annotations

import torch


def tile_offsets(
    n: int, grid: int, cell: int, tile: int, min_gap: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left (row, column) of every tile [n, grid * grid], row-major: a tile sits at its cell's
    origin plus a jitter in [0, cell - tile - min_gap], so neighbours are min_gap apart or more."""
    jitter = cell - tile - min_gap
    if jitter < 0:
        raise ValueError(f"tile {tile} + gap {min_gap} does not fit a cell of {cell} pixels")
    cells = torch.arange(grid, device=device) * cell
    rows = cells.repeat_interleave(grid).expand(n, -1) + torch.randint(
        0, jitter + 1, (n, grid * grid), device=device
    )
    cols = cells.repeat(grid).expand(n, -1) + torch.randint(0, jitter + 1, (n, grid * grid), device=device)
    return rows, cols


def cut_tiles(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tile: int) -> torch.Tensor:
    """[n, C, H, W] images and [n, T] offsets -> [n, T, C, tile, tile] tiles."""
    span = torch.arange(tile, device=images.device)
    r = (rows[..., None] + span)[..., :, None]  # [n, T, tile, 1]
    c = (cols[..., None] + span)[..., None, :]  # [n, T, 1, tile]
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    return images.permute(0, 2, 3, 1)[batch, r, c].permute(0, 1, 4, 2, 3)


def grid_tiles(images: torch.Tensor, grid: int, tile_fraction: float, min_gap: int) -> torch.Tensor:
    """A random grid x grid tiling of each image: [n, grid * grid, C, tile, tile], row-major."""
    cell = images.shape[-1] // grid
    tile = max(1, min(cell - min_gap, round(cell * tile_fraction)))
    rows, cols = tile_offsets(len(images), grid, cell, tile, min_gap, images.device)
    return cut_tiles(images, rows, cols, tile)
