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
    train = study.train  # main_vicreg.py's ImageNet recipe, not solo-learn's CIFAR one
    assert (train.optimizer, train.lr, train.weight_decay, train.warmup_epochs) == ("lars", 0.2, 1e-6, 10)
    study, _ = load_study(QUICKSTART, ["method=rotation", "data.image_size=96"])
    assert study.train.optimizer == "sgd"  # no recipe declared: sslab's default


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


def test_simsiam_optimises_as_its_authors_code_does(make_method):
    """main_simsiam.py (Chen & He 2021): weight decay on every parameter, BatchNorm and biases
    included, and the predictor kept at the peak learning rate (--fix-pred-lr; the paper's Table 1:
    68.1% with it, 67.7% decayed). Other methods keep norms and biases undecayed."""
    from sslab.platform.optim import build_optimizer, set_learning_rate
    from sslab.platform.validate import build_study

    method, _ = make_method("simsiam")
    train = build_study({"name": "s", "method": "simsiam", "data": {"name": "synthetic"}}).train
    assert (train.lr, train.weight_decay, train.warmup_epochs) == (0.03, 5e-4, 0)  # CIFAR: App. D
    optimizer = build_optimizer(method, train)
    decay = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == train.weight_decay for p in g["params"]
    }
    assert decay == {id(p) for p in method.parameters() if p.requires_grad}
    set_learning_rate(optimizer, lr=0.001, peak=0.03)  # late in the cosine decay
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {rates[id(p)] for p in method.predictor.parameters()} == {0.03}
    assert {rates[id(p)] for p in method.backbone.parameters()} == {0.001}

    simclr, _ = make_method("simclr")
    groups = build_optimizer(simclr, train).param_groups
    norms = {id(p) for p in simclr.parameters() if p.ndim <= 1}
    assert all(g["weight_decay"] == 0 for g in groups if {id(p) for p in g["params"]} & norms)


def test_dino_rises_its_weight_decay_on_a_cosine_and_clips_each_gradient(make_method, tiny_raw):
    """main_dino.py: weight decay from 0.04 to 0.4 on a cosine (biases and norms stay at 0), and
    each parameter's gradient norm capped at 3.0 on its own (`clip_gradients`, not the global norm)."""
    import torch

    from sslab.platform.optim import build_optimizer, scale_weight_decay
    from sslab.platform.train import Trainer
    from sslab.platform.validate import build_study

    large = build_study(
        {"name": "l", "method": "dino", "data": {"name": "synthetic", "image_size": 96}}
    ).train
    assert (large.optimizer, large.lr, large.weight_decay, large.weight_decay_end) == (
        "adamw",
        5e-4,
        0.04,
        0.4,
    )
    study = build_study(tiny_raw | {"method": "dino", "train": tiny_raw["train"] | {"weight_decay_end": 0.4}})
    method, _ = make_method("dino")
    optimizer = build_optimizer(method, study.train)
    trainer = Trainer(method, method, optimizer, None, study, None, steps_per_epoch=10)
    decays = []
    for step in (0, 10, trainer.total_steps):
        trainer.step = step
        scale_weight_decay(optimizer, trainer.weight_decay_factor())
        decays.append(sorted({g["weight_decay"] for g in optimizer.param_groups}))
    base, end = study.train.weight_decay, 0.4
    assert decays[0] == [0.0, base] and decays[-1] == [0.0, pytest.approx(end)]
    assert decays[1][1] == pytest.approx(end + (base - end) * 0.5 * (1 + math.cos(math.pi / 2)))  # halfway

    large_grad, small_grad = [p for p in method.head.mlp.parameters() if p.requires_grad][:2]
    for p in method.parameters():
        p.grad = None
    large_grad.grad = torch.full_like(large_grad, 30 / large_grad.numel() ** 0.5)  # norm 30
    small_grad.grad = torch.full_like(small_grad, 1 / small_grad.numel() ** 0.5)  # norm 1
    method.before_optimizer_step(step=10**6)  # past the frozen prototypes
    assert large_grad.grad.norm() == pytest.approx(3.0, rel=1e-4)
    assert small_grad.grad.norm() == pytest.approx(1.0, rel=1e-4)  # untouched: not a global-norm clip


def test_a_weight_decay_schedule_from_zero_is_refused(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmethod: dino\ntrain: {weight_decay: 0, weight_decay_end: 0.4}\n")
    assert main(["validate", str(path), "--no-estimate"]) == 2
    assert (
        "train.weight_decay_end: scales the decay from train.weight_decay, which is 0"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("name", ["moco_v1", "moco_v2", "swav"])
def test_moco_and_swav_decay_every_parameter_as_their_authors_code(name, make_method):
    """facebookresearch/moco and /swav build their optimiser over `model.parameters()`: biases
    and BatchNorm are decayed (and, in SwAV's LARC, adapted) like the weights."""
    from sslab.platform.optim import build_optimizer
    from sslab.platform.validate import build_study

    method, _ = make_method(name)
    for size in (32, 96):
        train = build_study(
            {"name": "s", "method": name, "data": {"name": "synthetic", "image_size": size}}
        ).train
        groups = build_optimizer(method, train).param_groups
        decayed = {id(p) for g in groups if g["weight_decay"] == train.weight_decay for p in g["params"]}
        assert decayed == {id(p) for p in method.parameters() if p.requires_grad}
        assert not any(g.get("lars_exclude") for g in groups)


def test_the_moco_recipes_are_their_authors_code(make_method):
    """MoCo v2 (main_moco.py): SGD 0.03 per 256, decay 1e-4; its CIFAR-10 demo 5e-4. MoCo v3
    (main_moco.py): LARS 0.6 per 256, decay 1e-6, 10 warm-up epochs, biases and norms out of
    LARS and of the decay (`p.ndim > 1`)."""
    from sslab.platform.optim import build_optimizer
    from sslab.platform.validate import build_study

    def train(name, size):
        return build_study(
            {"name": "s", "method": name, "data": {"name": "synthetic", "image_size": size}}
        ).train

    large, small = train("moco_v2", 96), train("moco_v2", 32)
    assert (large.optimizer, large.lr, large.lr_scaling, large.weight_decay) == ("sgd", 0.03, "linear", 1e-4)
    assert (small.lr, small.weight_decay, small.warmup_epochs) == (0.03, 5e-4, 0)
    v3 = train("moco_v3", 96)
    assert (v3.optimizer, v3.lr, v3.weight_decay, v3.warmup_epochs) == ("lars", 0.6, 1e-6, 10)
    method, _ = make_method("moco_v3")
    groups = build_optimizer(method, v3).param_groups
    norms_and_biases = {id(p) for p in method.parameters() if p.requires_grad and p.ndim <= 1}
    excluded = {id(p) for g in groups if g["lars_exclude"] and g["weight_decay"] == 0 for p in g["params"]}
    assert excluded == norms_and_biases


def test_mae_and_clip_take_their_adamw_betas_and_keep_the_temperature_undecayed(make_method):
    """MAE's main_pretrain.py: AdamW betas (0.9, 0.95), decay 0.05 on weights only; CLIP (Sec.
    2.5): betas (0.9, 0.98), decay 0.2, none on gains, biases or the learned temperature."""
    from sslab.platform.optim import build_optimizer
    from sslab.platform.validate import build_study

    mae = build_study(
        {
            "name": "m",
            "method": "mae",
            "backbone": {"name": "vit_tiny"},
            "data": {"name": "synthetic", "image_size": 96},
        }
    )
    assert (mae.train.lr, mae.train.weight_decay, mae.train.warmup_epochs) == (1.5e-4, 0.05, 40)
    clip = build_study({"name": "c", "method": "clip", "data": {"name": "synthetic"}})
    method, _ = make_method("clip")
    optimizer = build_optimizer(method, clip.train)
    assert {g["betas"] for g in optimizer.param_groups} == {(0.9, 0.98)}
    undecayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(method.logit_scale) in undecayed and clip.train.weight_decay == 0.2
