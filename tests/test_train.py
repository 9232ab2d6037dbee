"""The training loop in-process: checkpoints, resume after a kill, failures, every method."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import for_method
from sslab.methods.registry import METHODS
from sslab.platform.build import build_method
from sslab.platform.checkpoint import CHECKPOINT_NAME
from sslab.platform.data import load_dataset
from sslab.platform.optim import LARS, learning_rate
from sslab.platform.spec import trial_spec
from sslab.platform.tracking import Tracker, TrialTracking
from sslab.platform.train import train_loop
from sslab.platform.validate import build_study


def test_two_epochs_write_checkpoint_and_metrics(tmp_path, tiny_raw):
    metrics = train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * (256 // 64)
    assert {"loss", "knn_top1", "knn_top5", "lr", "images_per_s", "epoch"} <= set(metrics)
    assert 0 <= metrics["knn_top1"] <= 1 and metrics["loss"] > 0


def test_step_lines_give_throughput_and_the_time_left(tmp_path, tiny_raw, capsys):
    import re

    train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    pattern = (
        r"epoch (\d)/2 step (\d)/4 loss [\d.]+ \| \d+ img/s \| "
        r"epoch (\d+):(\d\d) left, trial (\d+):(\d\d) left"
    )
    parsed = [re.search(pattern, line) for line in lines]
    assert len(parsed) == 4 and all(parsed), lines  # every 2 of 4 steps, 2 epochs
    last = parsed[-1].groups()
    assert last[:2] == ("2", "4") and last[2:] == ("0", "00", "0", "00")  # nothing left at the end
    first = parsed[0].groups()
    assert int(first[4]) * 60 + int(first[5]) >= int(first[2]) * 60 + int(first[3])  # trial >= epoch


def test_resume_continues_from_checkpoint(tmp_path, tiny_raw, capsys):
    train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    tiny_raw["train"]["epochs"] = 3
    metrics = train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    assert "resumed" in capsys.readouterr().out and metrics["epoch"] == 3
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 3


def test_non_finite_loss_fails_the_trial(tmp_path, tiny_raw):
    tiny_raw["train"]["lr"] = 1e30
    with pytest.raises(FloatingPointError):
        train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))


def test_warmup_then_cosine():
    lrs = [learning_rate(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_lars_scales_update_by_trust_ratio():
    p = torch.nn.Parameter(torch.full((4,), 2.0))  # ||p|| = 4
    p.grad = torch.full((4,), 0.5)  # ||g|| = 1
    LARS([p], lr=1.0, momentum=0.0, trust_coefficient=0.1).step()
    # update = lr * eta * ||p|| / ||g|| * g = 0.1 * 4 * 0.5 = 0.2
    assert torch.allclose(p.data, torch.full((4,), 1.8))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_two_steps(name, tiny_raw):
    study = build_study(for_method(tiny_raw, name))
    data = load_dataset(study.data)
    method = build_method(study, data, torch.device("cpu"), total_steps=2)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    for step in range(2):
        loss, metrics = method.training_step(data.train_images[:16], step, torch.arange(16))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step_end(step)
        assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    method.eval()
    assert method.features(data.example_images(4)).shape[0] == 4
    assert all(0 <= v <= 1 for v in method.evaluate(data).values())


KILL_SCRIPT = """
import json, sys
from sslab.platform.validate import build_study
from sslab.platform.train import train_loop
from sslab.platform.spec import trial_spec
from sslab.platform.tracking import TrialTracking
raw, trial_dir, tracking = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
train_loop(trial_spec(build_study(raw), trial_dir, TrialTracking(**tracking)))
"""


def test_killed_run_resumes_and_logs_each_epoch_once(tmp_path, tiny_raw, tracking_uri):
    """SIGKILL mid-run, start again: it resumes from the last checkpoint, finishes, and MLflow
    holds one child run with exactly one loss point per epoch."""
    import json

    tiny_raw["train"]["epochs"] = 8
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("kill-test", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "parent", {"sslab.role": "study"})
    tracking = TrialTracking(tracking_uri, experiment, parent, "seed=0")
    args = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        json.dumps(tiny_raw),
        str(tmp_path / "trial"),
        json.dumps(tracking.__dict__),
    ]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "trial" / CHECKPOINT_NAME
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= killed_at < 8, "the run was not killed mid-way"

    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"after epoch {killed_at}" in second.stdout
    runs = tracker.child_runs(experiment, parent)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in tracker.client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == list(range(1, 9))
    assert len(tracker.client.get_metric_history(runs[0].info.run_id, "random_init_knn_top1")) == 1


def train_tracked(tmp_path, raw: dict, tracking_uri: str) -> tuple[Tracker, str]:
    """Trains `raw` in-process as the one trial of a study in MLflow; (tracker, its run id)."""
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("test", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "parent", {"sslab.role": "study"})
    tracking = TrialTracking(tracking_uri, experiment, parent, "seed=0")
    train_loop(trial_spec(build_study(raw), tmp_path / "trial", tracking))
    return tracker, tracker.child_runs(experiment, parent)[0].info.run_id


def test_probes_log_every_protocol_at_their_fractions_of_training(tmp_path, tiny_raw, tracking_uri):
    tiny_raw["train"]["epochs"] = 4
    tiny_raw["eval"] = {"protocols": ["knn", "linear"], "probe_at": [0.25, 0.5]}
    tracker, run_id = train_tracked(tmp_path, tiny_raw, tracking_uri)
    for key in ("eval/knn_top1", "eval/linear_top1"):
        assert sorted(m.step for m in tracker.client.get_metric_history(run_id, key)) == [1, 2, 4]
    steps = {m.step: m.value for m in tracker.client.get_metric_history(run_id, "optimizer_steps")}
    assert steps == {1: 4, 2: 8, 3: 12, 4: 16}  # 256 images, batch 64
    # the training data as the run's MLflow dataset input (the runs table's Dataset column)
    (logged,) = tracker.client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "synthetic" and len(logged.dataset.digest) == 12
    assert json.loads(logged.dataset.profile) == {"train": 256, "test": 128, "image_size": 16, "classes": 10}
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]


def test_the_dataset_digest_changes_with_the_images_a_study_holds(tiny_raw):
    from sslab.platform.tracking import dataset_input

    digest = lambda change: dataset_input(
        build_study(tiny_raw | {"data": tiny_raw["data"] | change}).data, {}
    )
    assert digest({})["digest"] == digest({})["digest"]
    assert digest({"seed": 1})["digest"] != digest({})["digest"]
    assert digest({"train_size": 128})["digest"] != digest({})["digest"]


def test_bf16_autocast_and_channels_last_switches_train(tmp_path, tiny_raw):
    tiny_raw["train"].update(amp=True, channels_last=True, epochs=1)
    metrics = train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and 0 <= metrics["knn_top1"] <= 1


def test_bf16_falls_back_to_fp32_where_the_device_only_emulates_it(tmp_path, tiny_raw, monkeypatch, capsys):
    import sslab.platform.train as train_module

    autocast_states = []
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    monkeypatch.setattr(train_module, "train_step", lambda *a: autocast_states.append(a[-1]) or real_step(*a))
    tiny_raw["train"].update(amp=True, epochs=1)
    train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    assert autocast_states and not any(autocast_states)
    assert "no native bf16" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rule, batch, expected",
    [("none", 512, 0.3), ("linear", 512, 0.6), ("linear", 128, 0.15), ("sqrt", 1024, 0.6)],
)
def test_batch_size_scales_the_learning_rate_by_the_rule(tiny_raw, rule, batch, expected):
    from sslab.platform.optim import scaled_lr

    tiny_raw["train"].update(lr=0.3, lr_scaling=rule, batch_size=batch)
    tiny_raw["data"]["train_size"] = 1024
    assert scaled_lr(build_study(tiny_raw).train) == pytest.approx(expected)


def test_sample_images_are_logged_at_the_end(tmp_path, tiny_raw, tracking_uri):
    tiny_raw.update(method="context_encoder")
    tiny_raw["train"]["epochs"] = 1
    tracker, run_id = train_tracked(tmp_path, tiny_raw, tracking_uri)
    assert "samples/inpainting.png" in [a.path for a in tracker.client.list_artifacts(run_id, "samples")]


def test_the_monitor_follows_every_network_to_the_last_epoch(tmp_path, tiny_raw, tracking_uri):
    """DINO's student is scored beside its teacher from the random init to the end."""
    tiny_raw.update(method="dino", method_args={"out_dim": 32})
    tiny_raw["eval"] = {"knn_k": 20, "knn_every": 1, "protocols": ["knn"]}
    tracker, run_id = train_tracked(tmp_path, tiny_raw, tracking_uri)
    history = tracker.client.get_metric_history
    # every epoch, the last one's from the final evaluation; the random init only under its own
    # key, so that MLflow never shows it as a trained result
    for key in ("knn_top1", "student_knn_top1"):
        assert sorted(m.step for m in history(run_id, key)) == [1, 2]
        assert [m.step for m in history(run_id, f"random_init_{key}")] == [0]
    # the method's own collapse verdict on its last epoch, for the report's table
    assert tracker.client.get_run(run_id).data.tags["sslab.collapse"] in ("learning", "collapsed (uniform)")


def test_a_failed_trial_logs_the_time_it_trained(tmp_path, tiny_raw, tracking_uri):
    """The study's Ray accounting took a trial that failed at step 15 for 190 s of Ray overhead:
    its training time was never logged."""
    tiny_raw["train"]["lr"] = 1e30
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("test", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "parent", {"sslab.role": "study"})
    tracking = TrialTracking(tracking_uri, experiment, parent, "seed=0")
    with pytest.raises(FloatingPointError):
        train_loop(trial_spec(build_study(tiny_raw), tmp_path / "trial", tracking))
    run = tracker.child_runs(experiment, parent)[0]
    assert run.info.status == "FAILED" and run.data.metrics["trial_seconds"] > 0
