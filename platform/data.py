"""Datasets as uint8 tensors [N, 3, H, W], decoded once: the embedded default
(platform/synthetic.py), torchvision's, and image folders. A dataset may carry captions (a
capability image-text methods use); the others leave them None. Video datasets hold clips
[N, T, 3, H, W] instead, their test clips with per-frame instance masks [M, T, H, W]."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sslab.platform.config import DataConfig
from sslab.platform.dataset import DataError, Dataset, no_labels, read_image, resized
from sslab.platform.streaming import ImageFiles
from sslab.platform.synthetic import synthetic
from sslab.platform.synthetic_video import synthetic_video
from sslab.platform.workdir import atomic_torch_save


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` describes. A process keeps the last two generated ones: Tune reuses a
    trial's worker for the next trial, which then skips generating the same data again (data
    read from files is read again: the files may have changed; their decoded cache is on disk)."""
    if not DATASETS[cfg.name].generated:
        return _load(cfg)
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = _load(cfg)
        while len(_LOADED) > 2:
            _LOADED.pop(next(iter(_LOADED)))
    return dataclasses.replace(_LOADED[key])  # a caller may rebind its fields (e.g. to a GPU)


_LOADED: dict[str, Dataset] = {}


def _load(cfg: DataConfig) -> Dataset:
    data = DATASETS[cfg.name].load(cfg)
    data.train_images, data.train_labels, data.train_captions = _subset(
        data.train_images, data.train_labels, data.train_captions, cfg.subset, cfg.seed
    )
    if data.test_masks is not None and cfg.test_subset is not None and cfg.test_subset < len(data.test_masks):
        data.test_masks = data.test_masks[_subset_indices(len(data.test_masks), cfg.test_subset, cfg.seed)]
    data.test_images, data.test_labels, data.test_captions = _subset(
        data.test_images, data.test_labels, data.test_captions, cfg.test_subset, cfg.seed
    )
    if cfg.pretrain is not None:
        data.pretrain_images = load_pretrain_images(cfg)
    if cfg.source_size is not None:  # the same files, decoded larger for the crops (validated: files)
        data.pretrain_labelled = cfg.pretrain is None
        data.pretrain_images = data.ssl_images.at_size(cfg.source_size)
    return data


def _subset(
    images: torch.Tensor, labels: torch.Tensor, captions: list[str] | None, size: int | None, seed: int
):
    if size is None or size >= len(images):
        return images, labels, captions
    keep = _subset_indices(len(images), size, seed)
    return images[keep], labels[keep], captions and [captions[i] for i in keep.tolist()]


def subset_items(items: tuple, size: int | None, seed: int) -> tuple:
    """The `_subset_indices` of a tuple of files (or clip windows), taken before anything is
    decoded (`_load` then finds the split already small enough)."""
    if size is None or size >= len(items):
        return items
    return tuple(items[i] for i in _subset_indices(len(items), size, seed).tolist())


def _subset_indices(total: int, size: int, seed: int) -> torch.Tensor:
    """The same `size` items for the same (total, seed), whatever else changes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:size].sort().values


# ----------------------------------------------------------------------------- torchvision


def _torchvision(cfg: DataConfig) -> Dataset:
    import torchvision.datasets as tvd

    root = str(Path(cfg.root).expanduser())
    if cfg.name == "stl10":
        train = tvd.STL10(root, split="train", download=cfg.download)
        test = tvd.STL10(root, split="test", download=cfg.download)
        to_tensor = lambda ds: torch.from_numpy(ds.data)  # already [N, 3, 96, 96]
        labels = lambda ds: torch.as_tensor(ds.labels, dtype=torch.long)
    else:
        cls = tvd.CIFAR10 if cfg.name == "cifar10" else tvd.CIFAR100
        train = cls(root, train=True, download=cfg.download)
        test = cls(root, train=False, download=cfg.download)
        to_tensor = lambda ds: torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = lambda ds: torch.as_tensor(ds.targets, dtype=torch.long)
    return Dataset(
        cfg.name, list(train.classes), to_tensor(train), labels(train), to_tensor(test), labels(test)
    )


# ----------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class FolderScan:
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]  # (file, label), sorted by class then name
    test: tuple[tuple[Path, int], ...]


@functools.lru_cache(maxsize=8)
def scan_image_folder(root: Path) -> FolderScan:
    """Lists `root/train/<class>/*` and `root/test/<class>/*` without decoding anything, and
    rejects what would only fail inside a trial: no classes, a test class that training lacks,
    a class with no images, an empty file. (Corrupt files are found when decoded, by name.)"""
    root = Path(root)
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/*)")
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    missing = [name for name in test_classes if name not in classes]
    if missing:
        raise DataError(f"{root / 'test' / missing[0]}: class {missing[0]!r} is not in {root / 'train'}")
    return FolderScan(
        classes,
        _list_split(root / "train", classes, required=True),
        _list_split(root / "test", classes, required=False),
    )


def _list_split(split_dir: Path, classes: tuple[str, ...], required: bool) -> tuple[tuple[Path, int], ...]:
    items = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        files = [f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if required and not files:
            raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            if f.stat().st_size == 0:
                raise DataError(f"{f} is an empty file")
            items.append((f, label))
    if not items:
        raise DataError(f"{split_dir} holds no images")
    return tuple(items)


STL10_UNLABELED = "stl10:train+unlabeled"


@functools.lru_cache(maxsize=8)
def scan_unlabelled_folder(root: Path) -> tuple[Path, ...]:
    """Every image file below `root` (recursively), sorted; an empty folder or file is an error."""
    files = tuple(
        sorted(f for f in Path(root).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    )
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}, in any subfolder)")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f} is an empty file")
    return files


def streams(cfg: DataConfig, count: int, pretraining: bool = False) -> bool:
    """Whether a split of `count` image files is decoded per batch rather than held in memory
    (the pretraining split always is where `data.source_size` asks for crops from the files)."""
    if cfg.loading != "auto":
        return cfg.loading == "stream"
    if pretraining and cfg.source_size is not None:
        return True
    return count * 3 * cfg.image_size**2 > cfg.memory_limit_mb * 2**20


def load_pretrain_images(cfg: DataConfig) -> torch.Tensor:
    """The unlabelled pretraining images `data.pretrain` names, uint8 at the study's size."""
    if cfg.pretrain == STL10_UNLABELED:
        import torchvision.datasets as tvd

        images = torch.from_numpy(tvd.STL10(str(Path(cfg.root).expanduser()), split="train+unlabeled").data)
        keep = _subset_indices(len(images), cfg.pretrain_subset, cfg.seed) if cfg.pretrain_subset else None
        images = images if keep is None else images[keep]
        return images if images.shape[-1] == cfg.image_size else _resize(images, cfg.image_size)
    root = Path(cfg.pretrain).expanduser().resolve()
    items = tuple((f, -1) for f in scan_unlabelled_folder(root))
    return _split(cfg, root, items, cfg.pretrain_subset, pretraining=True)[0]


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([resized(images[i : i + chunk], size) for i in range(0, len(images), chunk)])


def train_set_size(cfg: DataConfig) -> int | None:
    """How many images a training epoch draws from (after `subset`); None where unknown
    before loading (a torchvision dataset of unknown size)."""
    if cfg.pretrain is not None and cfg.pretrain != STL10_UNLABELED:
        total = len(scan_unlabelled_folder(Path(cfg.pretrain).expanduser().resolve()))
        return min(total, cfg.pretrain_subset or total)
    if cfg.pretrain == STL10_UNLABELED:
        return min(105_000, cfg.pretrain_subset or 105_000)
    total = DATASETS[cfg.name].train_size(cfg)
    return None if total is None else min(total, cfg.subset or total)


def pretrains_on_files(cfg: DataConfig) -> bool:
    """Whether pretraining reads image files (a `data.pretrain` folder, or a dataset of image
    files): they are decoded into a cache before a study starts, and may be streamed per batch."""
    if cfg.pretrain is not None:
        return cfg.pretrain != STL10_UNLABELED
    return DATASETS[cfg.name].image_files


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser().resolve()


def _imagefolder(cfg: DataConfig) -> Dataset:
    root = _root(cfg)
    scan = scan_image_folder(root)
    train = _split(cfg, root / "train", scan.train, cfg.subset, pretraining=cfg.pretrain is None)
    test = _split(cfg, root / "test", scan.test, cfg.test_subset)
    return Dataset(f"imagefolder:{root.name}", list(scan.classes), *train, *test)


def _split(
    cfg: DataConfig,
    split_dir: Path,
    items: tuple[tuple[Path, int], ...],
    subset: int | None,
    pretraining: bool = False,
):
    """(images, labels) of a split's files (after `subset`): decoded into memory, or as
    `ImageFiles` read per batch where `data.loading` says to stream."""
    items = subset_items(items, subset, cfg.seed)
    if not streams(cfg, len(items), pretraining):
        return _decode_split(split_dir, items, cfg.image_size, None, cfg.seed)
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return ImageFiles([f for f, _ in items], cfg.image_size, cfg.max_bad_fraction), labels


def _decode_split(
    split_dir: Path, items: tuple[tuple[Path, int], ...], size: int, subset: int | None, seed: int
):
    """Decodes only the files the subset keeps, once; later runs read the cached tensor. The cache
    is keyed on each file's path, size and modification time: an image edited in place is read again."""
    files, labels = [f for f, _ in items], [label for _, label in items]
    if subset is not None and subset < len(files):
        keep = _subset_indices(len(files), subset, seed).tolist()
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    stats = [f.stat() for f in files]
    identity = [str(size)] + [f"{f}\t{st.st_size}\t{st.st_mtime_ns}" for f, st in zip(files, stats)]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    cache = cache_dir() / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["images"], saved["labels"]
    images = torch.stack([read_image(f, size) for f in files])
    label_tensor = torch.tensor(labels, dtype=torch.long)
    atomic_torch_save({"images": images, "labels": label_tensor}, cache)
    return images, label_tensor


# ----------------------------------------------------------------------------- video folders


@functools.lru_cache(maxsize=8)
def scan_video_folder(root: Path, clip_length: int) -> tuple[tuple, tuple]:
    """`root/train/<clip>/<frames>` and `root/test/<clip>/<frames>` with `root/test/<clip>/masks/`
    holding one mask per frame (same file stem; DAVIS's palette PNGs, or grey values = instance
    ids). Frames in name order; each clip cut into windows of `clip_length` frames. Returns the
    (train, test) windows: tuples of frame files (test: (frame, mask) pairs)."""
    return _clip_windows(root / "train", clip_length, masks=False), _clip_windows(
        root / "test", clip_length, masks=True
    )


def _clip_windows(split: Path, length: int, masks: bool) -> tuple:
    if not split.is_dir():
        raise DataError(f"{split} is not a folder (expected {split.name}/<clip>/<frames>)")
    windows = []
    for clip in sorted(p for p in split.iterdir() if p.is_dir()):
        frames = [f for f in sorted(clip.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if len(frames) < length:
            raise DataError(f"{clip} has {len(frames)} frames, fewer than data.clip_length={length}")
        if masks:
            pairs = []
            for f in frames:
                mask = next(
                    (m for m in (clip / "masks").glob(f"{f.stem}.*") if m.suffix.lower() == ".png"), None
                )
                if mask is None:
                    raise DataError(f"{clip / 'masks'} has no mask {f.stem}.png for frame {f.name}")
                pairs.append((f, mask))
            frames = pairs
        windows += [tuple(frames[i : i + length]) for i in range(0, len(frames) - length + 1, length)]
    if not windows:
        raise DataError(f"{split} holds no clip folders")
    return tuple(windows)


def _videofolder(cfg: DataConfig) -> Dataset:
    root = _root(cfg)
    train, test = scan_video_folder(root, cfg.clip_length)
    train = subset_items(train, cfg.subset, cfg.seed)
    test = subset_items(test, cfg.test_subset, cfg.seed)
    frames = lambda files: torch.stack([read_image(f, cfg.image_size) for f in files])
    test_frames = torch.stack([frames([f for f, _ in w]) for w in test])
    test_masks = torch.stack([torch.stack([_read_mask(m, cfg.image_size) for _, m in w]) for w in test])
    train_frames = torch.stack([frames(w) for w in train])
    return Dataset(
        f"videofolder:{root.name}",
        [],
        train_frames,
        no_labels(len(train)),
        test_frames,
        no_labels(len(test)),
        test_masks=test_masks,
    )


def _read_mask(path: Path, size: int) -> torch.Tensor:
    """A mask PNG -> uint8 instance ids [size, size] (nearest-neighbour resize): palette indices
    (DAVIS) or grey values as they are; an RGB mask's distinct colours numbered, black first."""
    import numpy as np
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except OSError as err:
        raise DataError(f"{path}: cannot decode ({err})") from None
    if image.mode in ("P", "L", "I", "I;16"):
        ids = torch.from_numpy(np.array(image).astype(np.int64))
    else:
        rgb = torch.from_numpy(np.array(image.convert("RGB")).astype(np.int64))
        code = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
        ids = torch.unique(code, return_inverse=True)[1]  # black (0) sorts first
    ids = F.interpolate(ids[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    return ids.clamp(0, 255).byte()


def _check_image_root(cfg: DataConfig) -> None:
    root = Path(cfg.root).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is not a directory")
    scan_image_folder(root.resolve())


def _check_torchvision_root(cfg: DataConfig) -> None:
    root = Path(cfg.root).expanduser()
    if not cfg.download and not root.is_dir():
        raise DataError(f"{root} does not exist (set data.download: true to fetch it)")


@dataclass(frozen=True)
class DatasetEntry:
    """A registry entry: how a dataset loads, and the facts the rest of sslab asks of it."""

    load: Callable[[DataConfig], Dataset]
    train_size: Callable[[DataConfig], int | None]  # before `subset`; None: unknown until loaded
    kind: str = "images"  # "images" ([N, 3, H, W]) or "video" (clips [N, T, 3, H, W])
    generated: bool = False  # a pure function of the config: no root, kept by `load_dataset`
    image_files: bool = False  # image files on disk: decoded into a cache, or streamed per batch
    # Checks `data.root` before anything runs (raises DataError or OSError naming the file).
    check_root: Callable[[DataConfig], None] = lambda cfg: None


def _fixed_size(images: int) -> Callable[[DataConfig], int]:
    return lambda cfg: images


# name -> entry: validation, loading, streaming and the study driver all read this table, so a new
# dataset is one loader and one line here.
DATASETS = {
    "synthetic": DatasetEntry(synthetic, lambda cfg: cfg.train_size, generated=True),
    "cifar10": DatasetEntry(_torchvision, _fixed_size(50_000), check_root=_check_torchvision_root),
    "cifar100": DatasetEntry(_torchvision, _fixed_size(50_000), check_root=_check_torchvision_root),
    "stl10": DatasetEntry(_torchvision, _fixed_size(5_000), check_root=_check_torchvision_root),
    "imagefolder": DatasetEntry(
        _imagefolder,
        lambda cfg: len(scan_image_folder(_root(cfg)).train),
        image_files=True,
        check_root=_check_image_root,
    ),
    "synthetic_video": DatasetEntry(
        synthetic_video, lambda cfg: cfg.train_size, kind="video", generated=True
    ),
    "videofolder": DatasetEntry(
        _videofolder,
        lambda cfg: len(scan_video_folder(_root(cfg), cfg.clip_length)[0]),
        kind="video",
        check_root=lambda cfg: scan_video_folder(_root(cfg), cfg.clip_length),
    ),
}


def cache_dir() -> Path:
    path = Path(os.environ.get("SSLAB_CACHE", Path.home() / ".cache" / "sslab")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
