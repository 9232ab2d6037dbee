"""Datasets as uint8 tensors [N, 3, H, W], decoded once: the embedded default
(platform/synthetic.py), torchvision's, and image folders. A dataset may carry captions (a
capability image-text methods use); the others leave them None."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sslab.platform.config import DataConfig


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train_images: torch.Tensor  # uint8 [N, 3, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_captions: list[str] | None = None  # one per image, where the data has them
    test_captions: list[str] | None = None
    class_prompts: list[list[str]] | None = None  # per class, captions that describe it (zero-shot)
    # Unlabelled images pretraining draws from instead of train_images (`data.pretrain`); the
    # labelled splits then serve evaluation only.
    pretrain_images: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def ssl_images(self) -> torch.Tensor:
        """What self-supervised training draws its batches from."""
        return self.train_images if self.pretrain_images is None else self.pretrain_images

    def describe(self) -> str:
        pretrain = (
            "" if self.pretrain_images is None else f"pretraining on {len(self.pretrain_images)} unlabelled, "
        )
        return (
            f"{self.name}: {pretrain}{len(self.train_images)} train / {len(self.test_images)} test, "
            f"{len(self.classes)} classes, {self.image_size}px"
        )


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` describes. A process keeps the last two generated ones: Tune reuses a
    trial's worker for the next trial, which then skips generating the same data again (data
    read from files is read again: the files may have changed; their decoded cache is on disk)."""
    if cfg.name not in GENERATED:
        return _load(cfg)
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = _load(cfg)
        while len(_LOADED) > 2:
            _LOADED.pop(next(iter(_LOADED)))
    return dataclasses.replace(_LOADED[key])  # a caller may rebind its fields (e.g. to a GPU)


_LOADED: dict[str, Dataset] = {}


def _load(cfg: DataConfig) -> Dataset:
    data = DATASETS[cfg.name](cfg)
    data.train_images, data.train_labels, data.train_captions = _subset(
        data.train_images, data.train_labels, data.train_captions, cfg.subset, cfg.seed
    )
    data.test_images, data.test_labels, data.test_captions = _subset(
        data.test_images, data.test_labels, data.test_captions, cfg.test_subset, cfg.seed
    )
    if cfg.pretrain is not None:
        data.pretrain_images = load_pretrain_images(cfg)
    return data


def _subset(
    images: torch.Tensor, labels: torch.Tensor, captions: list[str] | None, size: int | None, seed: int
):
    if size is None or size >= len(images):
        return images, labels, captions
    keep = _subset_indices(len(images), size, seed)
    return images[keep], labels[keep], captions and [captions[i] for i in keep.tolist()]


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
TORCHVISION_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "stl10": 5_000}


class DataError(ValueError):
    """Bad data on disk; the message names the file or folder."""


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
    return _decode_split(root, items, cfg.image_size, cfg.pretrain_subset, cfg.seed)[0]


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([_resized(images[i : i + chunk], size) for i in range(0, len(images), chunk)])


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    resized = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).byte()


def train_set_size(cfg: DataConfig) -> int | None:
    """How many images a training epoch draws from (after `subset`); None where unknown
    before loading (a torchvision dataset of unknown size)."""
    if cfg.pretrain is not None and cfg.pretrain != STL10_UNLABELED:
        total = len(scan_unlabelled_folder(Path(cfg.pretrain).expanduser().resolve()))
        return min(total, cfg.pretrain_subset or total)
    if cfg.pretrain == STL10_UNLABELED:
        return min(105_000, cfg.pretrain_subset or 105_000)
    if cfg.name == "synthetic":
        total = cfg.train_size
    elif cfg.name == "imagefolder":
        total = len(scan_image_folder(Path(cfg.root).expanduser().resolve()).train)
    else:
        total = TORCHVISION_TRAIN_SIZES.get(cfg.name)
    return None if total is None else min(total, cfg.subset or total)


def _imagefolder(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root).expanduser().resolve()
    scan = scan_image_folder(root)
    train = _decode_split(root / "train", scan.train, cfg.image_size, cfg.subset, cfg.seed)
    test = _decode_split(root / "test", scan.test, cfg.image_size, cfg.test_subset, cfg.seed)
    return Dataset(f"imagefolder:{root.name}", list(scan.classes), *train, *test)


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
    images = torch.stack([_read_image(f, size) for f in files])
    label_tensor = torch.tensor(labels, dtype=torch.long)
    atomic_torch_save({"images": images, "labels": label_tensor}, cache)
    return images, label_tensor


def _read_image(path: Path, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as err:  # torchvision's messages end with the reason after the last comma
        raise DataError(f"{path}: cannot decode ({str(err).rsplit(',', 1)[-1].strip()})") from None
    return image if image.shape[-2:] == (size, size) else _resized(image[None], size)[0]


def synthetic_dataset(cfg: DataConfig) -> Dataset:
    from sslab.platform.synthetic import synthetic

    return synthetic(cfg)


GENERATED = {"synthetic"}  # a pure function of the config: kept in memory by `load_dataset`
# name -> loader(cfg) -> Dataset: validation and loading both read this table.
DATASETS = {
    "synthetic": synthetic_dataset,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "stl10": _torchvision,
    "imagefolder": _imagefolder,
}


def cache_dir() -> Path:
    path = Path(os.environ.get("SSLAB_CACHE", Path.home() / ".cache" / "sslab")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_torch_save(obj, path: Path) -> None:
    """Writes to a temporary file, then renames: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
