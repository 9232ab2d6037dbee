"""Pretraining on a folder of unlabelled images, evaluated on a labelled set."""

import pytest
import torch
import yaml
from torchvision.io import write_png

from sslab.platform.cli import main
from sslab.platform.config import ConfigError
from sslab.platform.data import load_dataset
from sslab.platform.spec import trial_spec
from sslab.platform.train import train_loop
from sslab.platform.validate import build_study


def _unlabelled_folder(root, count=96, size=20):
    """Images of several sizes in nested folders, as a user's own photos would be."""
    torch.manual_seed(0)
    for i in range(count):
        folder = root / f"day{i % 3}" / ("raw" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.randint(0, 256, (3, size + i % 5, size), dtype=torch.uint8), str(folder / f"{i}.png"))
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_study_pretrains_on_an_unlabelled_folder_and_evaluates_on_the_labelled_set(
    tmp_path, tiny_raw, capsys
):
    folder = _unlabelled_folder(tmp_path / "photos")
    tiny_raw["data"]["pretrain"] = str(folder)
    tiny_raw["train"].update(epochs=1, batch_size=32)
    study = build_study(tiny_raw)
    data = load_dataset(study.data)
    assert data.pretrain_images.shape == (96, 3, 16, 16) and data.pretrain_images.dtype == torch.uint8
    assert len(data.train_images) == 256  # the labelled split, for evaluation
    metrics = train_loop(trial_spec(study, tmp_path / "trial", None))
    assert metrics["optimizer_steps"] == 96 // 32  # an epoch is a pass over the pretraining folder
    assert 0 <= metrics["knn_top1"] <= 1  # measured on the labelled set
    assert "pretraining on 96 unlabelled" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda root: root.mkdir(), "holds no images"),
        (lambda root: None, "is not a directory"),
        (lambda root: (root.mkdir(), (root / "a.png").write_bytes(b"")), "is an empty file"),
    ],
)
def test_a_bad_pretraining_folder_is_a_one_line_exit_2(tmp_path, tiny_raw, capsys, make, problem):
    folder = tmp_path / "photos"
    make(folder)
    tiny_raw["data"]["pretrain"] = str(folder)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(path), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.pretrain" in err and problem in err and err.count("\n") == 0
    assert not (tmp_path / "runs").exists()


def test_clip_cannot_pretrain_on_images_without_captions(tmp_path, tiny_raw):
    tiny_raw.update(method="clip")
    tiny_raw["data"]["pretrain"] = str(_unlabelled_folder(tmp_path / "photos", count=8))
    with pytest.raises(ConfigError, match="data.pretrain: method 'clip' pairs each training image"):
        build_study(tiny_raw)
