"""Datasets that are not held in memory: image files decoded per batch.

`ImageFiles` stands where a uint8 tensor [N, 3, H, W] stands in a `Dataset` (it has `len`,
`shape`, and indexing by a slice or an index tensor decodes those images), so evaluation and
every method read it unchanged. Training reads it through `epoch_batches`, which decodes the
next batches in DataLoader worker processes while the current one trains. Memory then holds a
few batches, whatever the number of files.

A file that cannot be decoded is skipped with a warning naming it (its place in the batch is
taken by the batch's next readable image) and counted; past `max_bad_fraction` of the files the
run fails, naming the last one.

The decoding runs in DataLoader worker processes of each training process (`data.stream_engine:
dataloader`), or as Ray Data tasks anywhere on the cluster (`ray_data`, where the trial runs on
Ray; in-process it falls back to the plain iterator). Either way an epoch's order is the same
pure function of (seed, epoch) as the in-memory path's, sliced per rank, so a resumed epoch
continues exactly where it stopped and every image goes to one rank once per epoch. That is why
each rank hands Ray Data its own ordered batches rather than reading `ray.train.get_dataset_shard`:
a streaming split assigns blocks to ranks as they ask for them, in no fixed order, which gives
neither guarantee.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from sslab.platform.dataset import DataError, read_image


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

    def at_size(self, size: int) -> ImageFiles:
        """The same files decoded at `size` (the bad ones found so far stay known)."""
        other = ImageFiles([], size, self.max_bad_fraction)
        other.files, other.bad = self.files, self.bad
        return other

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
        return decode_files([self.files[i] for i in positions], self.size)

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


def decode_files(files: list[str], size: int) -> tuple[torch.Tensor, list[str]]:
    """(the files as uint8 [n, 3, size, size], the problems of those that could not be read)."""
    images, bad = [], []
    for file in files:
        try:
            images.append(read_image(Path(file), size))
        except (DataError, OSError, RuntimeError) as err:
            bad.append(str(err) if file in str(err) else f"{file}: {err}")
    if not images:
        raise TooManyBadFiles(f"no readable image in a batch: {'; '.join(bad)}")
    good = len(images)
    while len(images) < len(files):  # a bad file's place: the batch's next readable image
        images.append(images[len(images) % good])
    return torch.stack(images), bad


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


def epoch_batches(
    images,
    indices: list[torch.Tensor],
    workers: int = 2,
    device: torch.device | None = None,
    engine: str = "dataloader",
):
    """The batches `indices` names, in order: indexed at once from a tensor, or decoded from
    files a few batches ahead by `workers` DataLoader processes (0: in this process) or, with
    `engine="ray_data"` on a Ray cluster, by up to `workers` Ray Data tasks."""
    if not isinstance(images, ImageFiles):
        for index in indices:
            yield images[index.to(images.device)]
        return
    if stream_decoder(images, engine) == "ray_data":
        yield from _ray_data_batches(images, indices, workers)
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


def stream_decoder(images, engine: str) -> str | None:
    """Who decodes training batches of `images`: None (a tensor in memory), "dataloader" or
    "ray_data": asked for, or "auto" on a cluster of several nodes (whose other CPUs Ray Data
    can decode on; on one node local DataLoader processes cost less: benchmarks/README.md),
    and in both cases only where this process is on Ray (Ray Train and Tune workers are)."""
    if not isinstance(images, ImageFiles):
        return None
    if engine != "dataloader" and _on_ray() and (engine == "ray_data" or ray_nodes() > 1):
        return "ray_data"
    return "dataloader"


def _on_ray() -> bool:
    import ray

    return ray.is_initialized()


def ray_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _decode_row(row: dict, size: int) -> dict:
    images, bad = decode_files(list(row["files"]), size)
    return {"images": images.numpy(), "bad": "\n".join(bad)}


def _ray_data_batches(images: ImageFiles, indices: list[torch.Tensor], workers: int):
    """One Ray Data row per batch (its files), decoded by tasks and delivered in this order."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the epoch's order is ours, not arrival order
    context.enable_progress_bars = False
    rows = [{"files": [images.files[i] for i in index.tolist()]} for index in indices]
    if not rows:
        return
    # num_cpus=0: trials hold the cluster's CPUs, and a decode task waiting for one of them never
    # starts (measured: the epoch hangs); the task pool's size bounds them instead.
    batches = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        functools.partial(_decode_row, size=images.size),
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=max(1, workers)),
    )
    for batch in batches.iter_batches(batch_size=1, prefetch_batches=2, batch_format="numpy"):
        images.account([problem for problem in str(batch["bad"][0]).split("\n") if problem])
        yield torch.from_numpy(batch["images"][0].copy())  # Ray's arrays are read-only
