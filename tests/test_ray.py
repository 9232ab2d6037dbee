"""Real Ray runs (slow: one local cluster for all): parallel trials logging to one sqlite store,
and a 2-worker DDP trial through Ray Train's TorchTrainer."""
import pytest

from sslab.platform.config import build_study
from sslab.platform.report import build_report
from sslab.platform.study import run_study, trial_resources
from sslab.platform.tracking import Tracker

pytestmark = pytest.mark.ray


def _run(tmp_path, raw):
    study = build_study(raw)
    return run_study(study, raw, "# test\n", tmp_path / "runs",
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _children(result):
    tracker = Tracker(result["tracking_uri"])
    return tracker, tracker.child_runs(result["experiment_id"], result["parent_run_id"])


def test_parallel_seed_trials_each_get_a_finished_child_run(ray_cluster, tmp_path, tiny_raw):
    tiny_raw.update(seeds=[0, 1], max_concurrent_trials=2)
    tiny_raw["sweep"] = {"method_args.temperature": [0.2, 0.5]}
    result = _run(tmp_path, tiny_raw)
    assert result["status"] == "FINISHED"
    tracker, runs = _children(result)
    names = sorted(r.data.tags["sslab.trial"] for r in runs)
    assert names == ["temperature=0.2,seed=0", "temperature=0.2,seed=1",
                     "temperature=0.5,seed=0", "temperature=0.5,seed=1"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["method_args.temperature"] in ("0.2", "0.5")
        assert run.data.tags["method"] == "simclr" and run.data.tags["seed"] in ("0", "1")
        history = tracker.client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2]     # no metric lost to sqlite locking
        assert "random_init_knn_top1" in run.data.metrics and "knn_top1" in run.data.metrics
    out = build_report("tiny", result["tracking_uri"], tmp_path / "reports" / "tiny")
    text = (out / "report.md").read_text()
    assert "temperature=0.2" in text and "±" in text
    assert (out / "report.html").read_text().count("data:image/png;base64") == 2


# SimCLR and CLIP gather across ranks with gradients, MoCo gathers keys and shuffles BN across
# ranks, DINO all-reduces its centre: each collective path runs for real on 2 gloo workers.
@pytest.mark.parametrize("method", ["simclr", "moco_v2", "dino", "clip"])
def test_two_worker_ddp_trial_through_torch_trainer(ray_cluster, tmp_path, tiny_raw, method):
    tiny_raw["train"].update(num_workers=2)
    tiny_raw["method"] = method
    result = _run(tmp_path, tiny_raw)
    assert result["status"] == "FINISHED"
    tracker, runs = _children(result)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"   # rank 0 alone logs
    assert sorted(m.step for m in tracker.client.get_metric_history(runs[0].info.run_id, "loss")) == [1, 2]
    config = tracker.client.download_artifacts(runs[0].info.run_id, "config.json")
    assert '"num_workers": 2' in open(config).read()


def test_two_workers_fit_on_two_cpus_beside_their_driver(tiny_raw):
    tiny_raw["train"]["num_workers"] = 2
    driver, per_worker = trial_resources(build_study(tiny_raw), cluster_cpus=2)
    assert driver["CPU"] + 2 * per_worker <= 2


def test_asha_stops_weak_trials_and_leaves_no_run_running(ray_cluster, tmp_path, tiny_raw):
    tiny_raw["train"]["epochs"] = 4
    tiny_raw["eval"] = {"knn_k": 20, "knn_every": 1, "protocols": ["knn"]}
    tiny_raw["sweep"] = {"method_args.temperature": [0.05, 0.1, 0.5, 1.0]}
    tiny_raw["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": 2}
    result = _run(tmp_path, tiny_raw)
    tracker, runs = _children(result)
    assert len(runs) == 4
    epochs = {r.data.tags["sslab.trial"]: len(tracker.client.get_metric_history(r.info.run_id, "loss"))
              for r in runs}
    assert min(epochs.values()) < 4 and max(epochs.values()) == 4      # some stopped early
    assert all(r.info.status != "RUNNING" for r in runs)
    stopped = [r for r in runs if epochs[r.data.tags["sslab.trial"]] < 4]
    assert all(r.info.status == "KILLED" for r in stopped)
