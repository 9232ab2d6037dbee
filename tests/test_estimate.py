"""A study's cost before it runs: steps and evaluation passes counted from the study, wall time
from measured steps (cached per model and machine)."""

from types import SimpleNamespace

import pytest

from conftest import REPO
from sslab.platform import estimate as est
from sslab.platform.cli import main
from sslab.platform.sweep import expand_trials
from sslab.platform.validate import build_study, load_study


def test_steps_and_evaluation_passes_are_counted_from_the_study():
    study, _ = load_study(REPO / "studies" / "quickstart.yaml")
    assert est.total_steps(study) == 4000 // 256 * 15  # 225
    assert est.eval_passes(study) == 1 + 3  # random init, kNN at epochs 5, 10 and 15
    head, _ = load_study(REPO / "studies" / "simclr_projection_head.yaml")
    assert est.total_steps(head) == 4000 // 64 * 8
    assert est.eval_passes(head) == 1 + 4  # random init, probes at epochs 1, 2, 4 and the end


def test_trials_run_in_rounds_paced_by_the_longest(monkeypatch, tiny_raw):
    raw = tiny_raw | {"seeds": [0, 1, 2]}
    trials = expand_trials(build_study(raw), raw)
    asked = []
    monkeypatch.setattr(
        est, "step_seconds", lambda study, threads, sharing: asked.append(sharing) or (2.0, 0, 0)
    )
    costs, wall = est.estimate(trials, concurrency=2)
    assert set(asked) == {2}  # the step is measured as two trials share the machine
    per_trial = est.total_steps(trials[0].study) * 2.0 + est.TRIAL_OVERHEAD_SECONDS
    assert [c.seconds for c in costs] == [per_trial] * 3
    assert wall == pytest.approx(est.RAY_START_SECONDS + 2 * per_trial)  # two rounds: 2 + 1 trials


def test_a_model_is_measured_once_per_machine(monkeypatch, tiny_raw):
    monkeypatch.setattr(est, "machine_busy", lambda: False)
    study = build_study(tiny_raw)
    step, forward, step_mb = est.step_seconds(study, threads=1)  # measured: a few real steps
    assert step > 0 and forward > 0 and step_mb > 0
    monkeypatch.setattr(est, "_measure", lambda *a: pytest.fail("measured again"))
    assert est.step_seconds(study, threads=1) == (step, forward, step_mb)


def test_a_shared_step_is_measured_with_its_copies_stepping_together(monkeypatch, tiny_raw, tmp_path):
    """Two processes on one thread each, their timed steps started at a barrier; cached apart
    from the unshared measurement of the same model."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(est, "machine_busy", lambda: False)
    study = build_study(tiny_raw)
    shared = est.step_seconds(study, threads=2, sharing=2)
    assert all(value > 0 for value in shared)
    monkeypatch.setattr(est, "_measure", lambda *a: [9.0, 9.0, 9.0])
    assert est.step_seconds(study, threads=2, sharing=2) == shared  # from the cache
    assert est.step_seconds(study, threads=2) == (9.0, 9.0, 9.0)  # another key: measured alone


def test_a_step_measured_on_a_busy_machine_serves_until_it_is_idle(monkeypatch, tiny_raw, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    study = build_study(tiny_raw)
    measurements = iter([[2.0, 0.2, 50.0], [1.0, 0.1, 50.0]])
    monkeypatch.setattr(est, "_measure", lambda *a: next(measurements))
    monkeypatch.setattr(est, "machine_busy", lambda: True)
    assert est.step_seconds(study, threads=2) == (2.0, 0.2, 50.0)  # measured, marked busy
    assert est.step_seconds(study, threads=2) == (2.0, 0.2, 50.0)  # still busy: no new measurement
    monkeypatch.setattr(est, "machine_busy", lambda: False)
    assert est.step_seconds(study, threads=2) == (1.0, 0.1, 50.0)  # idle now: measured again
    assert est.step_seconds(study, threads=2) == (1.0, 0.1, 50.0)  # and kept


def test_a_steps_peak_memory_grows_with_the_batch(tiny_raw):
    """The measured peak of a step: activations scale with the batch (4x the images, more MB)."""
    small = build_study(tiny_raw | {"train": tiny_raw["train"] | {"batch_size": 16}})
    large = build_study(tiny_raw | {"train": tiny_raw["train"] | {"batch_size": 64}})
    small_mb = est.step_seconds(small, threads=1)[2]  # first: the larger one cannot reuse its memory
    assert est.step_seconds(large, threads=1)[2] > small_mb


def test_data_held_in_memory_counts_uint8_pixels(tiny_raw):
    study = build_study(tiny_raw)
    data = study.data
    pixels = (data.train_size + data.test_size) * 3 * data.image_size**2
    assert est.data_mb(data) == pytest.approx(pixels / 2**20)


def test_concurrency_is_what_fits_beside_rays_processes():
    costs = [est.TrialCost("a", 10, 1, memory_mb=2000.0), est.TrialCost("b", 10, 1, memory_mb=3000.0)]
    assert est.fitting_concurrency(costs, est.RAY_PROCESSES_MB + 6500) == 2  # paced by the largest
    assert est.fitting_concurrency(costs, est.RAY_PROCESSES_MB + 2999) == 0


def test_validate_prints_the_cost(tmp_path, tiny_raw, capsys):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["validate", str(path)]) == 0
    cost, memory = capsys.readouterr().out.strip().splitlines()[-2:]
    assert cost.startswith("  cost: 1 trial(s) x 8 optimiser steps = 8 steps, 2 evaluation passes per trial")
    assert "on this machine at 1 trial(s) at a time" in cost
    assert memory.startswith("  memory: about 1.") and "GB available now" in memory


def test_a_study_whose_trials_do_not_fit_in_memory_is_refused_before_anything_is_written(
    tmp_path, tiny_raw, capsys, monkeypatch
):
    import psutil
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw | {"seeds": [0, 1, 2], "max_concurrent_trials": 3}))
    trial_mb = est.estimate(expand_trials(*load_study(path)), 3)[0][0].memory_mb
    room = est.RAY_PROCESSES_MB + 2.5 * trial_mb  # two trials fit, not three
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=room * 2**20))
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir), "--no-report"]) == 2
    error = capsys.readouterr().err
    assert f"{path}: max_concurrent_trials: 3 trial(s) at a time need about" in error
    assert "--set max_concurrent_trials=2 fits" in error
    assert not workdir.exists()
    # on a cluster it joins, this machine's memory says nothing about where the trials run
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert main(["validate", str(path)]) == 0


def test_run_estimate_only_prints_the_cost_and_starts_nothing(tmp_path, tiny_raw, capsys):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw | {"seeds": [0, 1]}))
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir), "--estimate-only", "--no-report"]) == 0
    assert capsys.readouterr().out.strip().startswith("cost: 2 trial(s) x 8 optimiser steps = 16 steps")
    assert not workdir.exists()


def test_the_time_left_uses_the_estimate_until_a_trial_has_ended(tiny_raw, capsys):
    from sslab.platform.tune_run import study_progress

    trials = [SimpleNamespace(trial_id=str(i), status="PENDING", config={"trial": f"t{i}"}) for i in range(3)]
    study = build_study(tiny_raw | {"max_concurrent_trials": 1})
    study_progress(study, total=3, trial_seconds=60.0).on_trial_start(0, trials, trials[0])
    # two pending and the one just started, one at a time, at the estimated 60 s each
    assert "(0 done, 1 running, 2 pending of 3; about 3:00 left (estimated))" in capsys.readouterr().out
