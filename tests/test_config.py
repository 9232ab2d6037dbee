"""Study validation: every error is one line naming the file and key, exit 2, nothing written."""

import pytest
import yaml

from conftest import REPO, apply_change
from sslab.platform.cli import main
from sslab.platform.config import ConfigError, flatten
from sslab.platform.validate import build_study, load_study


def write(tmp_path, raw):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_quickstart_is_valid():
    study, _ = load_study(REPO / "studies" / "quickstart.yaml")
    assert study.method == "simclr" and study.name == "quickstart"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"train": {"epoks": 2}}, "train.epoks"),
        ({"train": {"epochs": "two"}}, "train.epochs"),
        ({"train": {"batch_size": -8}}, "train.batch_size"),
        ({"method_args": {"temperature": 0}}, "method_args.temperature"),
        ({"method_args": {"temprature": 0.1}}, "method_args.temprature"),
        ({"method": "simclrr"}, "method"),
        ({"data": {"name": "imagefolder", "root": "/no/such/folder"}}, "data.root"),
        ({"data": {"name": "cifar10", "root": "/no/such/folder"}}, "data.root"),
        ({"backbone": {"name": "resnet19"}}, "backbone.name"),
        ({"sweep": {"method_args.temperature": [0.1, -1]}}, "sweep.method_args.temperature"),
        # A scheduler ranking on kNN that is not fresh at its rungs / perturbations.
        (
            {"scheduler": {"name": "asha"}, "eval": {"knn_every": 0}, "train": {"epochs": 12}},
            "scheduler.grace_period",
        ),
        (
            {
                "scheduler": {"name": "asha", "grace_period": 3},
                "eval": {"knn_every": 2},
                "train": {"epochs": 12},
            },
            "scheduler.grace_period",
        ),
        # ASHA's first rung after the last epoch: it would stop nothing (it asserted, after the parent run)
        (
            {"scheduler": {"name": "asha", "grace_period": 5, "metric": "loss", "mode": "min"}},
            "scheduler.grace_period",
        ),
        # seeds come from `seeds:`; a swept seed was dropped ("seed=0, seed=0") and the study failed
        ({"sweep": {"train.seed": [5, 6]}}, "sweep.train.seed"),
        # beyond sqlite's integers: it overflowed inside the trial, after 32 paths were written
        ({"seeds": [10000000000000000000]}, "seeds[0]"),
        ({"data": {"image_size": 1000000}}, "data.image_size"),
        (
            {"scheduler": {"name": "pbt", "mutations": {"train.lr": [0.1, 0.2]}}, "eval": {"knn_every": 0}},
            "scheduler.perturbation_interval",
        ),
    ],
)
def test_bad_study_exits_2_naming_file_and_key(tmp_path, tiny_raw, capsys, change, key):
    apply_change(tiny_raw, change)
    path = write(tmp_path, tiny_raw)
    workdir = tmp_path / "runs"
    code = main(["run", str(path), "--workdir", str(workdir), "--reports", str(tmp_path / "reports")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0, err
    assert str(path) in err and key in err
    assert not workdir.exists() and not (tmp_path / "reports").exists()


def test_bad_override_is_reported_with_its_key(tmp_path, tiny_raw, capsys):
    path = write(tmp_path, tiny_raw)
    assert main(["validate", str(path), "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_overrides_by_dotted_path(tmp_path, tiny_raw):
    path = write(tmp_path, tiny_raw)
    study, _ = load_study(path, ["train.epochs=7", "method_args.temperature=0.2", "data.subset=100"])
    assert (study.train.epochs, study.method_args["temperature"], study.data.subset) == (7, 0.2, 100)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path, tiny_raw):
    # PyYAML (YAML 1.1) would read `1e-5` as a string; lr and weight decay are written that way.
    path = tmp_path / "study.yaml"
    path.write_text(
        f"name: tiny\nmethod: simclr\ntrain: {{lr: 3e-2, weight_decay: 1e-5}}\ndata: {tiny_raw['data']}\n"
    )
    study, _ = load_study(path, ["train.warmup_epochs=5e-1"])
    assert (study.train.lr, study.train.weight_decay, study.train.warmup_epochs) == (0.03, 1e-5, 0.5)


def test_missing_file_and_invalid_yaml(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_method_args_filled_with_defaults_and_flattened(tiny_raw):
    study = build_study(tiny_raw)
    flat = flatten(study.to_dict())
    assert flat["method_args.temperature"] == 0.5
    assert flat["train.batch_size"] == 64


def test_int_accepted_for_float_but_bool_rejected(tiny_raw):
    tiny_raw["train"]["lr"] = 1
    assert build_study(tiny_raw).train.lr == 1.0
    tiny_raw["train"]["lr"] = True
    with pytest.raises(ConfigError, match="train.lr"):
        build_study(tiny_raw)


def test_sweep_points_cross_the_grid_and_carry_their_own_settings(tiny_raw):
    from sslab.platform.sweep import expand_trials

    tiny_raw["seeds"] = [0, 1]
    tiny_raw["sweep"] = {
        "train.batch_size": [32, 64],
        "points": [
            {"method": "simclr"},
            {"method": "moco_v2", "train.lr": 0.06, "method_args.queue_size": 128},
        ],
    }
    trials = expand_trials(build_study(tiny_raw), tiny_raw)
    assert len(trials) == 2 * 2 * 2
    moco = [t for t in trials if t.study.method == "moco_v2"]
    assert {t.study.train.lr for t in moco} == {0.06} and moco[0].study.method_args["queue_size"] == 128
    assert moco[0].name.startswith("method=moco_v2,")
    assert {t.study.train.lr for t in trials if t.study.method == "simclr"} == {0.1}


def test_bad_sweep_point_names_its_index(tiny_raw):
    tiny_raw["sweep"] = {"points": [{"method": "simclr"}, {"method": "byol", "method_args.tau_base": 2}]}
    with pytest.raises(ConfigError, match=r"sweep.points\[1\].*method_args.tau_base"):
        build_study(tiny_raw)


def test_resume_without_an_earlier_run_is_a_clear_error(tmp_path, tiny_raw, capsys):
    path = write(tmp_path, tiny_raw)
    code = main(["run", str(path), "--resume", "--workdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "no earlier run" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_validates(path):
    from sslab.platform.sweep import expand_trials

    study, raw = load_study(path)
    assert study.name == path.stem and expand_trials(study, raw)


def test_a_swept_data_seed_names_its_points_apart_from_the_trial_seed(tiny_raw):
    from sslab.platform.sweep import expand_trials

    tiny_raw.update(seeds=[0, 1])
    tiny_raw["sweep"] = {"data.seed": [3, 4], "method_args.temperature": [0.5]}
    names = [t.name for t in expand_trials(build_study(tiny_raw), tiny_raw)]
    assert names == [
        "data.seed=3,temperature=0.5,seed=0",
        "data.seed=3,temperature=0.5,seed=1",
        "data.seed=4,temperature=0.5,seed=0",
        "data.seed=4,temperature=0.5,seed=1",
    ]


def test_an_unknown_key_suggests_the_closest_known_one(tiny_raw):
    tiny_raw["method_args"] = {"temprature": 0.1}
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        build_study(tiny_raw)
    tiny_raw["method_args"] = {}
    tiny_raw["train"]["epoks"] = 3
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        build_study(tiny_raw)


def test_a_scheduler_on_a_fresh_knn_or_on_the_loss_is_accepted(tiny_raw):
    tiny_raw["train"]["epochs"] = 10
    tiny_raw["eval"] = {"knn_every": 2}
    tiny_raw["scheduler"] = {"name": "asha", "grace_period": 4}
    assert build_study(tiny_raw).scheduler.grace_period == 4
    tiny_raw["eval"] = {"knn_every": 0}
    tiny_raw["scheduler"] = {"name": "asha", "metric": "loss", "mode": "min"}
    assert build_study(tiny_raw).scheduler.metric == "loss"


def test_a_mistake_in_a_set_value_is_named_there_not_in_the_file(tmp_path, tiny_raw, capsys):
    path = write(tmp_path, tiny_raw)
    assert main(["validate", str(path), "--set", "train.epoks=2"]) == 2
    assert f"{path} --set: train.epoks: unknown key" in capsys.readouterr().err
    tiny_raw["train"]["epoks"] = 2  # the same mistake in the file is the file's
    path = write(tmp_path, tiny_raw)
    assert main(["validate", str(path)]) == 2
    assert f"{path}: train.epoks: unknown key" in capsys.readouterr().err
