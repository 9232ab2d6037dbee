"""Reports group trials by the sweep point each child run carries (tags), not by parsing names."""

import json

import pytest

from sslab.platform.report import build_report
from sslab.platform.tracking import Tracker


def test_points_that_share_a_short_key_stay_apart(tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("seedsweep", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "seedsweep-1", {"sslab.role": "study"})
    for data_seed, seed, knn in [(3, 0, 0.40), (3, 1, 0.42), (4, 0, 0.30), (4, 1, 0.32)]:
        point = f"data.seed={data_seed}"
        run = tracker.client.create_run(
            experiment,
            run_name=f"{point},seed={seed}",
            tags={
                "mlflow.parentRunId": parent,
                "sslab.trial": f"{point},seed={seed}",
                "sslab.point": point,
                "sslab.point_values": json.dumps({"data.seed": data_seed}),
            },
        ).info.run_id
        tracker.log_params(run, {"train.seed": seed, "data.seed": data_seed})
        tracker.log_metrics(run, {"knn_top1": knn, "random_init_knn_top1": 0.2, "loss": 1.0}, step=1)
        tracker.end(run)
    text = (build_report("seedsweep", tracking_uri, tmp_path / "report") / "report.md").read_text()
    assert "| data.seed=3 | 2 | 41.0 ± 1.4" in text and "| data.seed=4 | 2 | 31.0 ± 1.4" in text
    assert "default" not in text


def test_probes_are_judged_through_training_with_the_budget_stated(tmp_path, tracking_uri):
    # temperature 0.1 beats 0.5 by 10 points at the end (3 seeds, spread 1 point) and not at all
    # at the first probe: the report must say agrees at the end and inconclusive early.
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("probes", tmp_path / "artifacts")
    paper = {"reference": "SimCLR Table 5", "claim": "0.1 beats 0.5", "expect": ["t=0.1 > t=0.5"]}
    parent = tracker.start_parent(experiment, "probes-1", {"sslab.role": "study"})
    tracker.log_dict(parent, {"paper": paper | {"metric": "eval/linear_top1"}}, "resolved_config.json")
    for point, seed, early, final in [
        ("t=0.1", 0, 0.30, 0.60),
        ("t=0.1", 1, 0.32, 0.61),
        ("t=0.1", 2, 0.31, 0.59),
        ("t=0.5", 0, 0.31, 0.50),
        ("t=0.5", 1, 0.30, 0.51),
        ("t=0.5", 2, 0.32, 0.49),
    ]:
        run = tracker.client.create_run(
            experiment,
            tags={"mlflow.parentRunId": parent, "sslab.trial": f"{point},seed={seed}", "sslab.point": point},
        ).info.run_id
        tracker.log_params(run, {"train.seed": seed})
        for epoch, steps, value in [(1, 75, early), (8, 600, final)]:
            tracker.log_metrics(
                run, {"eval/linear_top1": value, "optimizer_steps": steps, "loss": 1.0}, epoch
            )
        tracker.end(run)
    out = build_report("probes", tracking_uri, tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "**Verdict: reproduced (1 of 1 orderings agree" in text and "at 600 optimiser steps" in text
    assert "| 0.125 | 75 | inconclusive at this scale" in text
    assert "| 1 | 600 | reproduced" in text
    assert (out / "probes.png").exists()


def test_report_flags_collapse_marks_label_use_links_to_the_server_and_is_logged_to_the_parent(
    tmp_path, tracking_uri
):
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("flags", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "flags-1", {"sslab.role": "study"})
    for trial, metrics, tags in [
        ("method=dino", {}, {"sslab.collapse": "collapsed (uniform)"}),
        (
            "method=clip",
            {},
            {"sslab.collapse": "learning", "sslab.uses_labels": "captions from class labels"},
        ),
    ]:
        run = tracker.client.create_run(
            experiment, tags={"mlflow.parentRunId": parent, "sslab.trial": trial, **tags}
        ).info.run_id
        tracker.log_params(run, {"train.seed": 0, "method_args.out_dim": 1024})
        tracker.log_metrics(run, {"knn_top1": 0.3, "random_init_knn_top1": 0.2, "loss": 1.0, **metrics}, 1)
        tracker.log_metrics(run, {"student_knn_top1": 0.25}, 1)
        tracker.end(run)
    text = (build_report("flags", tracking_uri, tmp_path / "report") / "report.md").read_text()
    assert "collapsed (uniform)" in text and "| method=clip (uses labels) |" in text
    assert "captions from class labels" in text
    assert "(http://127.0.0.1:5000/#/experiments/" in text  # a local store: sslab ui's address
    assert (tmp_path / "report" / "monitored_knn.png").exists()  # the student's curve beside the teacher's
    logged = {a.path for a in tracker.client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html"} <= logged

    from sslab.platform.report import ui_address

    assert ui_address("https://mlflow.example.org/") == "https://mlflow.example.org"


def test_a_trial_stopped_before_its_first_knn_shows_no_trained_knn(tmp_path, tracking_uri):
    # Stores written before 2026-12-02 hold the random-init kNN under knn_top1 at epoch 0 as
    # well: a trial killed before epoch knn_every must not report that value as its result.
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("stopped", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "stopped-1", {"sslab.role": "study"})
    for point, trained, status in [("lr=0.1", 0.47, "FINISHED"), ("lr=0.9", None, "KILLED")]:
        run = tracker.client.create_run(
            experiment,
            tags={"mlflow.parentRunId": parent, "sslab.trial": f"{point},seed=0", "sslab.point": point},
        ).info.run_id
        tracker.log_params(run, {"train.seed": 0})
        tracker.log_metrics(run, {"random_init_knn_top1": 0.23, "knn_top1": 0.23}, step=0)
        tracker.log_metrics(run, {"loss": 1.0}, step=1)
        if trained is not None:
            tracker.log_metrics(run, {"knn_top1": trained}, step=5)
        tracker.end(run, status)
    text = (build_report("stopped", tracking_uri, tmp_path / "report") / "report.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| lr=")}
    assert "| 47.0 | 23.0 |" in rows["lr=0.1,seed=0"]
    assert "| KILLED | n/a | 23.0 |" in rows["lr=0.9,seed=0"]
    assert rows["lr=0.9"].startswith("| lr=0.9 | 0 | n/a |")  # no seed with a trained kNN


def test_knn_curves_start_at_the_random_init_logged_under_its_own_key(tmp_path, tracking_uri):
    from sslab.platform.report_runs import find_parent, load_study_runs

    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("curves", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "curves-1", {"sslab.role": "study"})
    run = tracker.client.create_run(
        experiment, tags={"mlflow.parentRunId": parent, "sslab.trial": "seed=0", "sslab.point": "default"}
    ).info.run_id
    tracker.log_metrics(run, {"random_init_knn_top1": 0.23}, step=0)
    for epoch, knn in [(5, 0.31), (10, 0.35)]:
        tracker.log_metrics(run, {"knn_top1": knn, "loss": 1.0}, step=epoch)
    tracker.end(run)
    trials, curves = load_study_runs(tracker, *find_parent(tracker, "curves"))
    knn = curves[curves["metric"] == "knn_top1"].sort_values("epoch")
    assert list(zip(knn["epoch"], knn["value"])) == [(0, 0.23), (5, 0.31), (10, 0.35)]
    assert trials.loc[0, "knn_top1"] == 0.35


def test_a_command_names_no_absolute_folder_of_this_machine(tmp_path, monkeypatch):
    from sslab.platform.report import portable_arg

    monkeypatch.chdir(tmp_path)
    data = tmp_path.parent / "shared" / "cifar"
    assert portable_arg(f"data.root={data}") == "data.root=../shared/cifar"
    assert portable_arg(str(data)) == "../shared/cifar"
    assert portable_arg("train.lr=0.1") == "train.lr=0.1"


def test_a_study_experiment_opens_on_its_runs_in_mlflow(tmp_path, tracking_uri):
    """MLflow 3's UI opens an experiment without a kind on its GenAI overview (traces, tokens)."""
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("kind", tmp_path / "artifacts")
    tags = tracker.client.get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_best_point_is_the_best_mean_over_seeds_not_one_lucky_seed(tmp_path, tracking_uri, tiny_raw):
    from sslab.platform.study import record_best
    from sslab.platform.validate import build_study

    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("best", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "best-1", {"sslab.role": "study"})
    rows = [  # point a has the single best seed; point b is better on average
        {"trial": "t=a,seed=0", "point": "t=a", "status": "FINISHED", "run_id": "r1", "knn_top1": 0.50},
        {"trial": "t=a,seed=1", "point": "t=a", "status": "FINISHED", "run_id": "r2", "knn_top1": 0.30},
        {"trial": "t=b,seed=0", "point": "t=b", "status": "FINISHED", "run_id": "r3", "knn_top1": 0.42},
        {"trial": "t=b,seed=1", "point": "t=b", "status": "FINISHED", "run_id": "r4", "knn_top1": 0.44},
        {"trial": "t=c,seed=0", "point": "t=c", "status": "FAILED", "run_id": "r5", "knn_top1": 0.90},
    ]
    record_best(tracker, parent, rows, build_study(tiny_raw))
    run = tracker.client.get_run(parent)
    assert run.data.tags["best_point"] == "t=b" and run.data.tags["best_trial"] == "t=b,seed=1"
    # mean 0.43, std 0.01414 over 2 seeds: 0.43 +- t(0.975, 1) * 0.01 = 0.43 +- 0.127
    assert run.data.tags["best_point_interval"] == "[0.3029, 0.5571]"
    assert run.data.metrics["best_point_knn_top1"] == pytest.approx(0.43)


def test_the_setup_says_which_method_arguments_are_swept():
    """A swept argument's value in the resolved config is only its default (temperature 0.5 was
    shown for a temperature sweep)."""
    from sslab.platform.report import _method_line

    config = {"method": "simclr", "method_args": {"temperature": 0.5, "proj_dim": 128}}
    grid = config | {"sweep": {"method_args.temperature": [0.1, 0.5]}}
    points = config | {"sweep": {"points": [{"method_args.temperature": 0.1}]}}
    for swept in (grid, points):
        assert _method_line(swept) == 'simclr {"temperature": "swept", "proj_dim": 128}'
    assert _method_line(config) == 'simclr {"temperature": 0.5, "proj_dim": 128}'


def test_a_point_below_its_random_init_beyond_noise_is_flagged(tmp_path, tracking_uri):
    """Two trials of a sweep trained to 7 points below random init and nothing said so."""
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("below", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "below-1", {"sslab.role": "study"})
    for temperature, seed, knn, start in [(0.1, 0, 0.18, 0.25), (0.1, 1, 0.19, 0.26), (0.5, 0, 0.35, 0.25)]:
        point = f"temperature={temperature}"
        run = tracker.client.create_run(
            experiment,
            tags={"mlflow.parentRunId": parent, "sslab.trial": f"{point},seed={seed}", "sslab.point": point},
        ).info.run_id
        tracker.log_params(run, {"train.seed": seed})
        tracker.log_metrics(run, {"knn_top1": knn, "random_init_knn_top1": start}, step=1)
        tracker.end(run)
    text = (build_report("below", tracking_uri, tmp_path / "report") / "report.md").read_text()
    # paired by seed: -7.0 twice, so the interval is a point; one seed of 0.5 cannot be judged
    assert "| temperature=0.1 | 2 |" in text and "-7.0 [-7.0, -7.0] below random init |" in text
    assert "| temperature=0.5 | 1 |" in text and "| +10.0 |" in text
    assert "Below random init beyond the seeds' noise on kNN top-1: temperature=0.1 (-7.0" in text
