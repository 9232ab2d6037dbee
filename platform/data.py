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
    # Images pretraining draws from instead of train_images: unlabelled ones (`data.pretrain`; the
    # labelled splits then serve evaluation only), or the training files larger (`data.source_size`).
    pretrain_images: torch.Tensor | None = None
    pretrain_labelled: bool = False  # pretrain_images are train_images' files (`data.source_size`)
    # Video only: the instance id of every pixel of every test frame (0: background), uint8
    # [M, T, H, W]; evaluation propagates the first frame's through the clip.
    test_masks: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def kind(self) -> str:
        """ "video" (clips [N, T, 3, H, W]) or "images" ([N, 3, H, W])."""
        return "video" if self.train_images.dim() == 5 else "images"

    @property
    def ssl_images(self) -> torch.Tensor:
        """What self-supervised training draws its batches from."""
        return self.train_images if self.pretrain_images is None else self.pretrain_images

    def example_images(self, count: int) -> torch.Tensor:
        """`count` test images as an encoder takes them (of a video: frames of the first clip)."""
        return self.test_images[0, :count] if self.kind == "video" else self.test_images[:count]

    def describe(self) -> str:
        if self.kind == "video":
            return (
                f"{self.name}: {len(self.train_images)} train / {len(self.test_images)} test clips of "
                f"{self.train_images.shape[1]} frames, {self.image_size}px"
            )
        pretrain = ""
        if self.pretrain_images is not None:
            what = (
                "the training images" if self.pretrain_labelled else f"{len(self.pretrain_images)} unlabelled"
            )
            source = self.pretrain_images.shape[-1]
            crops = "" if source == self.image_size else f" (crops from {source}px)"
            pretrain = f"pretraining on {what}{crops}, "
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


def no_labels(count: int) -> torch.Tensor:
    """Labels of data that has none (clips have masks, not classes): -1 each."""
    return torch.full((count,), -1, dtype=torch.long)


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
    if cfg.name in GENERATED:
        total = cfg.train_size
    elif cfg.name == "videofolder":
        total = len(scan_video_folder(Path(cfg.root).expanduser().resolve(), cfg.clip_length)[0])
    elif cfg.name == "imagefolder":
        total = len(scan_image_folder(Path(cfg.root).expanduser().resolve()).train)
    else:
        total = TORCHVISION_TRAIN_SIZES.get(cfg.name)
    return None if total is None else min(total, cfg.subset or total)


def _imagefolder(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root).expanduser().resolve()
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
    from sslab.platform.streaming import ImageFiles

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
    root = Path(cfg.root).expanduser().resolve()
    train, test = scan_video_folder(root, cfg.clip_length)
    train = subset_items(train, cfg.subset, cfg.seed)
    test = subset_items(test, cfg.test_subset, cfg.seed)
    frames = lambda files: torch.stack([_read_image(f, cfg.image_size) for f in files])
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


def synthetic_dataset(cfg: DataConfig) -> Dataset:
    from sslab.platform.synthetic import synthetic

    return synthetic(cfg)


def synthetic_video_dataset(cfg: DataConfig) -> Dataset:
    from sslab.platform.synthetic_video import synthetic_video

    return synthetic_video(cfg)


GENERATED = {"synthetic", "synthetic_video"}  # pure functions of the config: kept by `load_dataset`
VIDEO = {"synthetic_video", "videofolder"}  # datasets of clips (checked against a method's data_kind)
# name -> loader(cfg) -> Dataset: validation and loading both read this table.
DATASETS = {
    "synthetic": synthetic_dataset,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "stl10": _torchvision,
    "imagefolder": _imagefolder,
    "synthetic_video": synthetic_video_dataset,
    "videofolder": _videofolder,
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
