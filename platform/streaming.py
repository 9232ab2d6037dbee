"""Datasets that are not held in memory: image files decoded per batch.

`ImageFiles` stands where a uint8 tensor [N, 3, H, W] stands in a `Dataset` (it has `len`,
`shape`, and indexing by a slice or an index tensor decodes those images), so evaluation and
every method read it unchanged. Training reads it through `epoch_batches`, which decodes the
next batches in DataLoader worker processes while the current one trains. Memory then holds a
few batches, whatever the number of files.

A file that cannot be decoded is skipped with a warning naming it (its place in the batch is
taken by the batch's next readable image) and counted; past `max_bad_fraction` of the files the
run fails, naming the last one.

Not Ray Data, deliberately: an epoch's order here is the same pure function of (seed, epoch)
as the in-memory path's, sliced per rank, so a resumed epoch continues exactly where it stopped
and every image goes to one rank once per epoch; Ray Data's streaming split gives neither.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


class TooManyBadFiles(RuntimeError):
    pass


class ImageFiles:
    """Image files read on demand as uint8 [n, 3, size, size], resized exactly as the in-memory
    path resizes them (so both paths train on the same pixels)."""

    def __init__(self, files: list[Path], size: int, max_bad_fraction: float = 0.01):
        self.files = [str(f) for f in files]  # str: a third of a Path's memory per file
        self.size = size
        self.max_bad_fraction = max_bad_fraction
        self.bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 4

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            positions = range(*index.indices(len(self.files)))
        else:
            positions = torch.as_tensor(index).flatten().tolist()
        images, bad = self.decode(positions)
        self.account(bad)
        return images

    def decode(self, positions) -> tuple[torch.Tensor, list[str]]:
        """(the images at `positions`, the files among them that could not be read). Runs in
        DataLoader workers too: the accounting is the caller's (`account`), in one process."""
        from sslab.platform.data import DataError, _read_image

        images, bad = [], []
        for i in positions:
            try:
                images.append(_read_image(Path(self.files[i]), self.size))
            except (DataError, OSError, RuntimeError) as err:
                bad.append(str(err) if self.files[i] in str(err) else f"{self.files[i]}: {err}")
        if not images:
            raise TooManyBadFiles(f"no readable image in a batch: {'; '.join(bad)}")
        good = len(images)
        while len(images) < len(positions):  # a bad file's place: the batch's next readable image
            images.append(images[len(images) % good])
        return torch.stack(images), bad

    def account(self, bad: list[str]) -> None:
        """Warns about each unreadable file once and fails past `max_bad_fraction` of them."""
        for problem in bad:
            if problem in self.bad:
                continue
            self.bad.add(problem)
            print(
                f"warning: skipped {problem} ({len(self.bad)} unreadable so far)", file=sys.stderr, flush=True
            )
            if len(self.bad) > self.max_bad_fraction * len(self.files):
                raise TooManyBadFiles(
                    f"{len(self.bad)} of {len(self.files)} files are unreadable, more than "
                    f"data.max_bad_fraction={self.max_bad_fraction} (the last: {problem})"
                )


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of the training set: the same on every rank and after a resume."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def rank_batches(
    order: torch.Tensor, batch_size: int, steps: int, rank: int, world_size: int, start_step: int = 0
) -> list[torch.Tensor]:
    """This rank's slice of each global batch from `start_step` on: step i's global batch is
    order[i * B : (i + 1) * B], rank r takes its r-th part of B / world_size."""
    local = batch_size // world_size
    return [
        order[i * batch_size + rank * local : i * batch_size + (rank + 1) * local]
        for i in range(start_step, steps)
    ]


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images: ImageFiles, indices: list[torch.Tensor]):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.decode(self.indices[i].tolist())


def epoch_batches(images, indices: list[torch.Tensor], workers: int = 2, device: torch.device | None = None):
    """The batches `indices` names, in order: indexed at once from a tensor, or decoded from
    files by `workers` processes a few batches ahead (0: in this process)."""
    if not isinstance(images, ImageFiles):
        for index in indices:
            yield images[index.to(images.device)]
        return
    if workers == 0:
        for index in indices:
            yield images[index]
        return
    loader = torch.utils.data.DataLoader(
        _Batches(images, indices),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )
    for batch, bad in loader:
        images.account(bad)
        yield batch
