import copy
import os
import tempfile
from pathlib import Path

import pytest

# `sslab validate` caches measured step times under the user's cache folder: not the tester's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sslab-cache-")
REPO = Path(__file__).resolve().parents[1]

# A tiny study that trains in about a second per epoch on a CPU.
TINY = {
    "name": "tiny",
    "method": "simclr",
    "data": {"name": "synthetic", "train_size": 256, "test_size": 128, "image_size": 16},
    "backbone": {"name": "resnet18", "width": 0.125},
    # fp32, NCHW: on a 2-core AMX CPU (2026-12-02, torch 2.14.1) this tiny network's narrow
    # layers hit oneDNN faults: in bf16 a non-finite conv weight gradient (16 px, batch 32, after
    # other models ran in the process), in fp32 channels_last a heap corruption in backward
    # (64 px: "double free", or a segfault; gone with torch.backends.mkldnn.enabled = False).
    # tests/test_train.py runs the bf16 and channels_last switches themselves.
    "train": {
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.1,
        "report_every_steps": 2,
        "amp": False,
        "channels_last": False,
    },
    "eval": {"knn_k": 20},
    "log_model": False,  # ~3 s per trial; tests/test_export.py logs and registers one
}


# The tiny study's data for a video method: 16 clips of 4 frames (the embedded synthetic video).
TINY_VIDEO_DATA = {
    "name": "synthetic_video",
    "train_size": 16,
    "test_size": 2,
    "image_size": 32,
    "clip_length": 4,
}


def for_method(raw: dict, name: str) -> dict:
    """The tiny study `raw` made fit for method `name`: a ViT for ViT-only methods (MAE), clips
    for video methods, a batch the clips fill."""
    from sslab.methods.registry import METHODS
    from sslab.platform.backbones import BACKBONES

    raw["method"] = name
    family = METHODS[name].backbone_family
    if family:
        first = next(b for b, entry in BACKBONES.items() if entry.family == family)
        raw["backbone"] = {"name": first, "width": 0.34}
    if METHODS[name].data_kind == "video":
        raw["data"] = dict(TINY_VIDEO_DATA)
        raw["train"]["batch_size"] = 8
    return raw


def apply_change(raw: dict, change: dict) -> None:
    """Merges `change` into a study dict: mapping sections key by key, anything else replaced."""
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section].update(value)
        else:
            raw[section] = value


@pytest.fixture
def tiny_raw():
    return copy.deepcopy(TINY)


@pytest.fixture
def make_method(tiny_raw):
    """make_method("dino", out_dim=8) -> (method built on the tiny study's data, that data)."""
    import torch

    from sslab.platform.build import build_method
    from sslab.platform.data import load_dataset
    from sslab.platform.validate import build_study

    def make(name, **method_args):
        tiny_raw.update(method=name, method_args=method_args)
        study = build_study(tiny_raw)
        data = load_dataset(study.data)
        return build_method(study, data, torch.device("cpu"), total_steps=100), data

    return make


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["SSLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """One sqlite store for the session: creating one costs seconds (migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the tests that need it, started as `sslab run` starts it (loopback only,
    token auth); a short temp dir keeps socket paths < 107 bytes."""
    ray = pytest.importorskip("ray")
    from sslab.platform.ray_cluster import start_local_ray

    os.environ.pop("RAY_ADDRESS", None)
    start_local_ray(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="sslabray", dir="/tmp"))
    yield ray
    ray.shutdown()
