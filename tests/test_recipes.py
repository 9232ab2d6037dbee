"""Each method owns its training recipe: a study's silence takes it, a study's or --set's value
wins, `sslab validate` says where each value came from, and every image method trains an epoch
of the quickstart on its own recipe to a finite loss."""

import math
from pathlib import Path

import pytest

from conftest import REPO
from sslab.methods.registry import METHODS
from sslab.platform.backbones import BACKBONES
from sslab.platform.cli import main
from sslab.platform.spec import trial_spec
from sslab.platform.train import train_loop
from sslab.platform.validate import load_study, train_sources

QUICKSTART = str(REPO / "studies" / "quickstart.yaml")


def test_a_study_silent_on_the_optimiser_takes_the_methods_recipe():
    study, raw = load_study(QUICKSTART, ["method=vicreg"])
    assert study.train.optimizer == "lars" and study.train.lr == 0.3 and study.train.lars_eta == 0.02
    assert study.train.epochs == 15  # the quickstart's own value
    sources = train_sources(study, raw)
    assert sources["optimizer"] == "vicreg small-image recipe"
    assert sources["momentum"] == "sslab default"


def test_the_study_and_set_win_over_the_recipe(tmp_path):
    overrides = ["method=vicreg", "train.lr=0.1"]
    study, raw = load_study(QUICKSTART, overrides)
    assert study.train.lr == 0.1 and study.train.optimizer == "lars"
    assert train_sources(study, raw, overrides)["lr"] == "--set"
    named = tmp_path / "named.yaml"
    text = Path(QUICKSTART).read_text()
    named.write_text(text.replace("  epochs: 15\n", "  epochs: 15\n  optimizer: adamw\n"))
    explicit, raw = load_study(named, ["method=vicreg"])
    assert explicit.train.optimizer == "adamw" and explicit.train.lr == 0.3
    assert train_sources(explicit, raw)["optimizer"] == "study"


def test_the_recipe_is_for_small_images_only_where_the_method_says_so():
    study, _ = load_study(QUICKSTART, ["method=vicreg", "data.image_size=96"])
    assert study.train.optimizer == "sgd"  # no ImageNet-size recipe declared: sslab's default


def test_validate_prints_where_each_value_came_from(capsys):
    overrides = ["--set", "method=vicreg", "--set", "train.lr=0.2"]
    assert main(["validate", QUICKSTART, *overrides, "--no-estimate"]) == 0
    recipe_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "optimizer lars" in recipe_line and "(vicreg small-image recipe)" in recipe_line
    assert "lr 0.2 (--set)" in recipe_line


IMAGE_METHODS = sorted(name for name, cls in METHODS.items() if cls.data_kind == "images")


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_every_image_method_trains_an_epoch_of_the_quickstart_on_its_recipe(name, tmp_path):
    """The quickstart with --set method=NAME, on 512 images at batch 128: 4 steps, the warm-up
    reaching the peak rate at the last (where SGD at SimCLR's lr 0.5 made VICReg's loss diverge)."""
    overrides = [f"method={name}", "train.epochs=1", "seeds=[0]", "train.batch_size=128"]
    overrides += ["data.train_size=512", "data.test_size=128", "eval.protocols=[knn]"]
    overrides += ["eval.random_init_baseline=false", "log_model=false"]
    family = METHODS[name].backbone_family
    if family:
        overrides.append(f"backbone.name={next(b for b, e in BACKBONES.items() if e.family == family)}")
    study, _ = load_study(QUICKSTART, overrides)
    metrics = train_loop(trial_spec(study, tmp_path, None))
    assert math.isfinite(metrics["loss"])
