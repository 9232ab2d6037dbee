"""`sslab export`: the encoder loads into torchvision / timm and gives sslab's own features."""

import json

import pytest
import torch

from sslab.platform.export import write_export


def _trained_a_step(make_method, name="simclr", **method_args):
    method, data = make_method(name, **method_args)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    loss, _ = method.training_step(data.train_images[:16], 0)
    loss.backward()
    optimizer.step()  # weights (and BN statistics) no longer at their initial values
    return method.eval(), data


def _run_lines(lines: list[str]):
    scope: dict = {}
    exec("\n".join(lines), scope)  # the lines `sslab export` prints, as a user pastes them
    return scope["model"]


def _normalized(info, images):
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_a_resnet18_export_loads_into_torchvision_and_gives_the_same_features(
    make_method, tiny_raw, tmp_path, cifar_stem
):
    from sslab.platform.export import load_lines

    tiny_raw["backbone"] = {"name": "resnet18", "width": 1.0, "cifar_stem": cifar_stem}
    method, data = _trained_a_step(make_method)
    info = write_export(method, _study(tiny_raw), tmp_path)
    assert info["architecture"] == "torchvision.models.resnet18"
    lines = load_lines(info, str(tmp_path))
    assert len(lines) == 3
    model = _run_lines(lines)
    images = data.test_images[:8]
    with torch.no_grad():
        theirs = model(_normalized(info, images))
    assert torch.allclose(theirs, method.features(images), atol=1e-5)


def test_a_narrow_resnet_loads_with_torchvision_blocks_through_load_py(make_method, tiny_raw, tmp_path):
    """Width 0.125 has no torchvision constructor: load.py builds torchvision's ResNet at the
    exported widths (its own _make_layer) and loads the weights strictly."""
    import runpy

    tiny_raw["backbone"] = {"name": "resnet18", "width": 0.125, "cifar_stem": True}
    method, data = _trained_a_step(make_method)
    info = write_export(method, _study(tiny_raw), tmp_path)
    model = runpy.run_path(str(tmp_path / "load.py"))["load"](tmp_path)
    assert type(model).__module__ == "torchvision.models.resnet"
    images = data.test_images[:8]
    with torch.no_grad():
        assert torch.allclose(model(_normalized(info, images)), method.features(images), atol=1e-5)


def test_a_vit_export_loads_into_timm(make_method, tiny_raw, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from sslab.platform.export import load_lines

    tiny_raw["backbone"] = {"name": "vit_tiny", "patch_size": 4, "width": 0.25}
    method, data = _trained_a_step(make_method)
    info = write_export(method, _study(tiny_raw), tmp_path)
    model = _run_lines(load_lines(info, str(tmp_path)))
    assert type(model) is VisionTransformer
    images = data.test_images[:4]
    with torch.no_grad():
        assert torch.allclose(model(_normalized(info, images)), method.features(images), atol=1e-5)


def test_a_network_that_is_not_a_plain_backbone_exports_in_sslab_layout(make_method, tiny_raw, tmp_path):
    """SimCLR evaluated on z (backbone + head) is no torchvision model: the export says so and
    loads back through sslab with its input transform."""
    from sslab.platform.export import load_sslab_export

    method, data = _trained_a_step(make_method, eval_on="z")
    tiny_raw["method_args"] = {"eval_on": "z"}
    info = write_export(method, _study(tiny_raw), tmp_path)
    assert info["architecture"] == "sslab"
    assert json.loads((tmp_path / "encoder.json").read_text())["feature_dim"] == info["feature_dim"]
    model = load_sslab_export(tmp_path)
    images = data.test_images[:8]
    with torch.no_grad():
        assert torch.allclose(model(images), method.features(images), atol=1e-5)


def _study(raw):
    from sslab.platform.validate import build_study

    return build_study(raw)


def test_a_trial_logs_its_encoder_checkpoint_and_model_and_export_and_eval_work_remotely(
    tmp_path, tiny_raw, tracking_uri, capsys, monkeypatch
):
    """At its end a trial logs export/ and checkpoint/ to its run and the encoder as a registered
    MLflow model; `sslab export` and `sslab eval` then need only the tracking store (the
    trial's own folder is deleted first, as on a colleague's machine)."""
    import shutil

    import mlflow
    from test_train import train_tracked

    from sslab.platform.cli import main
    from sslab.platform.export import load_lines

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tiny_raw.update(log_model=True, register_model="tiny-encoder")
    tiny_raw["train"]["epochs"] = 1
    tracker, run_id = train_tracked(tmp_path, tiny_raw, tracking_uri)
    run = tracker.client.get_run(run_id)
    artifacts = {
        a.path for folder in ("export", "checkpoint") for a in tracker.client.list_artifacts(run_id, folder)
    }
    assert {
        "export/encoder.pt",
        "export/encoder.json",
        "export/load.py",
        "checkpoint/checkpoint.pt",
    } <= artifacts
    assert any(k.startswith("system/") for k in run.data.metrics)  # MLflow's system metrics
    versions = tracker.client.search_model_versions("name = 'tiny-encoder'")
    assert [v.run_id for v in versions] == [run_id]
    assert "simclr encoder of study tiny" in versions[0].description
    assert versions[0].tags["git_commit"] == run.data.tags.get("mlflow.source.git.commit", "unknown")

    shutil.rmtree(tmp_path / "trial")  # no local checkpoint any more
    out = tmp_path / "export"
    assert main(["export", run_id, "--out", str(out), "--tracking-uri", tracking_uri]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "encoder.json").read_text())
    lines = load_lines(info, str(out))
    assert all(line in printed for line in lines)
    model = runpy_load(out)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        exported = model(_normalized(info, images))
        mlflow.set_tracking_uri(tracking_uri)
        served = mlflow.pyfunc.load_model(run.data.tags["sslab.model_uri"]).predict(
            images.float().numpy() / 255
        )
    assert torch.allclose(torch.as_tensor(served), exported, atol=1e-4)

    assert main(["eval", run_id, "--protocol", "knn", "--tracking-uri", tracking_uri]) == 0
    assert "eval/knn_top1" in capsys.readouterr().out


def runpy_load(folder):
    import runpy

    return runpy.run_path(str(folder / "load.py"))["load"](folder)


def test_export_of_a_run_without_encoder_artifacts_rebuilds_it_from_the_checkpoint(
    tmp_path, tiny_raw, tracking_uri, capsys
):
    """Runs logged before trials wrote an export export from their checkpoint instead."""
    import shutil
    from pathlib import Path
    from urllib.parse import urlparse

    from test_train import train_tracked

    from sslab.platform.cli import main

    tiny_raw["train"]["epochs"] = 1
    tracker, run_id = train_tracked(tmp_path, tiny_raw, tracking_uri)
    artifacts = Path(urlparse(tracker.client.get_run(run_id).info.artifact_uri).path)
    shutil.rmtree(artifacts / "export")  # as an older run: no export logged
    out = tmp_path / "export"
    assert main(["export", run_id, "--out", str(out), "--tracking-uri", tracking_uri]) == 0
    info = json.loads((out / "encoder.json").read_text())
    assert info["architecture"] == "torchvision.models.resnet18" and info["run_id"] == run_id
    assert runpy_load(out) is not None


def test_another_resnet_depth_is_one_registry_entry(make_method, tiny_raw, tmp_path, monkeypatch):
    """A depth torchvision has no constructor for (ResNet-26 of bottlenecks), added as one line:
    validated, built, exported in torchvision's layout and loaded back by load.py."""
    import runpy

    from sslab.platform import backbones

    monkeypatch.setitem(backbones.BACKBONES, "resnet26", backbones.resnet("Bottleneck", (2, 2, 2, 2)))
    tiny_raw["backbone"] = {"name": "resnet26", "width": 0.125, "cifar_stem": True}
    method, data = _trained_a_step(make_method)
    info = write_export(method, _study(tiny_raw), tmp_path)
    assert info["architecture"] == "torchvision.models.resnet.ResNet" and info["depths"] == [2, 2, 2, 2]
    model = runpy.run_path(str(tmp_path / "load.py"))["load"](tmp_path)
    images = data.test_images[:8]
    with torch.no_grad():
        assert torch.allclose(model(_normalized(info, images)), method.features(images), atol=1e-5)
