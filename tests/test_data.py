from pathlib import Path

import pytest
import torch
from PIL import Image

from sslab.platform.config import ConfigError, DataConfig
from sslab.platform.data import DatasetEntry, load_dataset
from sslab.platform.synthetic import SYNTHETIC_CLASSES, make_synthetic


def test_synthetic_is_deterministic_balanced_and_varied():
    a, la, captions = make_synthetic(200, 24, seed=3)
    b, lb, _ = make_synthetic(200, 24, seed=3)
    c, _, _ = make_synthetic(200, 24, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == (200, 3, 24, 24)
    assert torch.bincount(la, minlength=10).tolist() == [20] * len(SYNTHETIC_CLASSES)
    assert a.float().std() > 20  # real structure, not a flat colour
    assert len(captions) == 200 and all(c.startswith("a ") and " on " in c for c in captions)


def test_synthetic_captions_name_the_shape_and_colours_drawn():
    from sslab.platform.synthetic import SHAPE_WORDS, colour_names

    _, labels, captions = make_synthetic(50, 16, seed=0)
    for label, text in zip(labels.tolist(), captions):
        assert f" {SHAPE_WORDS[label]} on " in text
    assert colour_names(torch.tensor([[0.95, 0.05, 0.0], [0.1, 0.1, 0.9]])) == ["red", "blue"]


def test_synthetic_train_and_test_differ_and_subset():
    data = load_dataset(DataConfig(train_size=300, test_size=100, subset=120, image_size=16))
    assert len(data.train_images) == 120 and len(data.test_images) == 100
    assert not torch.equal(data.train_images[:100], data.test_images)


def _image_tree(root, classes=("cat", "dog"), per_class=6, size=20):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 60 + 100 * c).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder_decodes_labels_resizes_and_caches(tmp_path):
    _image_tree(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=16)
    data = load_dataset(cfg)
    assert data.classes == ["cat", "dog"]
    assert data.train_images.shape == (12, 3, 16, 16) and data.train_images.dtype == torch.uint8
    assert data.train_labels.tolist() == [0] * 6 + [1] * 6
    assert data.train_images[6:].float().mean() > data.train_images[:6].float().mean()  # dogs brighter
    again = load_dataset(cfg)  # from the cache
    assert torch.equal(again.train_images, data.train_images)


def test_imagefolder_subset_is_deterministic(tmp_path):
    _image_tree(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=16, subset=5)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert len(a.train_images) == 5 and torch.equal(a.train_labels, b.train_labels)


def test_an_image_dataset_is_one_registry_entry(tmp_path, tiny_raw, monkeypatch):
    """A user's own format (one tensor file per split) added as one entry: validation checks its
    root through the entry, the batch against its size, and training data loads through it."""
    from sslab.platform import data as data_module
    from sslab.platform.dataset import DataError, Dataset
    from sslab.platform.validate import build_study

    def load(cfg):
        train, test = (torch.load(Path(cfg.root) / f"{split}.pt") for split in ("train", "test"))
        return Dataset("tensors", ["a", "b"], train["x"], train["y"], test["x"], test["y"])

    def check_root(cfg):
        if not (Path(cfg.root) / "train.pt").is_file():
            raise DataError(f"{Path(cfg.root) / 'train.pt'} is missing")

    entry = DatasetEntry(load, train_size=lambda cfg: 96, check_root=check_root)
    monkeypatch.setitem(data_module.DATASETS, "tensors", entry)
    tiny_raw["data"] = {"name": "tensors", "root": str(tmp_path), "image_size": 16}
    with pytest.raises(ConfigError, match="data.root.*train.pt is missing"):
        build_study(tiny_raw)
    for split, count in (("train", 96), ("test", 32)):
        images = torch.randint(0, 256, (count, 3, 16, 16), dtype=torch.uint8)
        torch.save({"x": images, "y": torch.arange(count) % 2}, tmp_path / f"{split}.pt")
    tiny_raw["train"]["batch_size"] = 128
    with pytest.raises(ConfigError, match="train.batch_size.*96 training images"):
        build_study(tiny_raw)
    tiny_raw["train"]["batch_size"] = 32
    data = load_dataset(build_study(tiny_raw).data)
    assert data.train_images.shape == (96, 3, 16, 16) and data.kind == "images"
