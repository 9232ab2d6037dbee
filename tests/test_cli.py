import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from sslab.platform.cli import main


def test_methods_lists_simclr_with_its_arguments(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "simclr:" in out and "temperature" in out and "projection" in out


def test_validate_names_the_trials(tmp_path, tiny_raw, capsys):
    tiny_raw.update(seeds=[0, 1])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["validate", str(path)]) == 0
    assert "2 trial(s): seed=0, seed=1" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "sslab.platform.cli", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "validate" in out.stdout


@pytest.mark.ray
def test_run_then_report_from_the_command_line(ray_cluster, tmp_path, tiny_raw, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    common = ["--workdir", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
    tiny_raw["description"] = "Does a tiny SimCLR learn?"
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(path), "--set", "train.epochs=1", *common]) == 0
    out = capsys.readouterr().out
    # The study's cost first; then when each trial starts and ends, with the counts (and the time
    # left: estimated until a trial has ended).
    assert out.startswith("  cost: 1 trial(s) x 4 optimiser steps = 4 steps")
    assert "study tiny: trial seed=0 started (0 done, 1 running, 0 pending of 1; about " in out
    assert " left (estimated))" in out
    assert "study tiny: trial seed=0 finished after" in out and "(1 done, 0 running, 0 pending of 1" in out
    # It ends with the answer: the point's kNN against random init, from MLflow.
    answer = out[out.index("study tiny: kNN top-1 by point, mean ± std over 1 seed(s)") :]
    assert answer.splitlines()[1].split() == [
        "point",
        "kNN",
        "top-1",
        "(%)",
        "random",
        "init",
        "(%)",
        "gain",
    ] + ["(pts,", "95%", "CI)"]
    assert answer.splitlines()[2].startswith("  default ") and answer.rstrip().endswith("one point: default")
    assert main(["compare", "tiny", *common[:2]]) == 0  # the same table from the store, any time
    assert capsys.readouterr().out.strip() == answer.strip()
    from sslab.platform.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [parent] = tracker.client.search_runs(
        [tracker.client.get_experiment_by_name("tiny").experiment_id], "tags.sslab.role = 'study'"
    )
    assert parent.data.tags["mlflow.note.content"] == "Does a tiny SimCLR learn?"
    assert parent.data.tags["mlflow.source.git.commit"] == parent.data.tags["git_commit"]
    report = tmp_path / "reports" / "tiny" / "report.md"
    first = report.read_text()
    assert "random init" in first and "seed=0" in first
    report.unlink()
    assert main(["report", str(path), *common]) == 0  # rebuilt from MLflow alone
    assert report.read_text() == first
    assert (tmp_path / "runs" / "mlflow.db").exists()


def test_ui_serves_the_study_store_on_localhost(tmp_path, monkeypatch, capsys):
    called = {}
    monkeypatch.setattr("os.execv", lambda exe, argv: called.update(argv=argv))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    main(["ui", "--workdir", str(tmp_path), "--port", "5123"])
    argv = called["argv"]
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "5123" in argv


def test_git_commit_says_when_the_tree_differs_from_it(tmp_path):
    from sslab.platform.tracking import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    assert git_commit(tmp_path) == "unknown"
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    clean = git_commit(tmp_path)
    assert len(clean) >= 7 and not clean.endswith("-dirty")
    (tmp_path / "untracked.txt").write_text("runs")  # e.g. sslab-runs/: not a change to the code
    assert git_commit(tmp_path) == clean
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == clean + "-dirty"


def test_run_register_names_the_model_of_every_trial(tmp_path, tiny_raw, monkeypatch):
    seen = {}

    def fake_run_study(study, *args, **kwargs):
        seen["register_model"] = study.register_model
        return {"status": "FINISHED", "tracking_uri": "", "parent_run_id": ""}

    monkeypatch.setattr("sslab.platform.study.run_study", fake_run_study)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(path), "--register", "tiny-encoder", "--no-report"]) == 0
    assert seen["register_model"] == "tiny-encoder"
    assert main(["run", str(path), "--register", "no/slashes", "--no-report"]) == 2


def test_an_unfinished_study_says_how_to_finish_it(tmp_path, tiny_raw, monkeypatch, capsys):
    """Ctrl-C or a failed trial: rerunning without --resume would start every trial again."""
    failed = {"status": "FAILED", "tracking_uri": "", "parent_run_id": ""}
    monkeypatch.setattr("sslab.platform.study.run_study", lambda *args, **kwargs: failed)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    for extra in ([], ["--resume"]):
        assert main(["run", str(path), "--no-report", *extra]) == 1
        hint = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"`sslab run {path} --no-report --resume` runs those" in hint, hint


def test_methods_lists_the_small_image_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    dino = out.split("\ndino:")[1].split("\njigsaw:")[0]  # methods are listed by name
    assert "images <= 64 px default to: local_crops=0" in dino
    for name in ("simsiam", "barlow_twins", "vicreg", "swav", "moco_v3", "cpc"):
        assert f"\n{name}:" in "\n" + out


def test_a_run_with_set_writes_its_report_beside_its_runs(tmp_path, tiny_raw, monkeypatch):
    """A variation of a study (--set) wrote over the study's own report in the checkout."""
    written = []
    monkeypatch.setattr(
        "sslab.platform.study.run_study",
        lambda *args, **kwargs: {"status": "FINISHED", "tracking_uri": "", "parent_run_id": ""},
    )
    monkeypatch.setattr(
        "sslab.platform.report.build_report", lambda name, uri, out, **kw: written.append(out) or out
    )
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    runs = ["--workdir", str(tmp_path / "runs")]
    assert main(["run", str(path), *runs]) == 0
    assert main(["run", str(path), *runs, "--set", "train.epochs=1"]) == 0
    assert main(["run", str(path), *runs, "--set", "train.epochs=1", "--reports", "mine"]) == 0
    assert written == [Path("reports/tiny"), tmp_path / "runs" / "reports" / "tiny", Path("mine/tiny")]


def test_version_and_help_answer_without_loading_torch():
    """`sslab --help` took 21-23 s under load: the parser imported the bench harness and torch."""
    code = (
        "import sys; from sslab.platform.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'ray' in sys.modules, 'mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
    version = subprocess.run(
        [sys.executable, "-m", "sslab.platform.cli", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("sslab 0.")


def test_ui_starts_one_worker_without_mlflows_job_runner(tmp_path, monkeypatch):
    """MLflow's default UI started 10-15 processes (1.5-3.2 GB): its GenAI job runner's six
    consumers among them. Side by side here: 2 processes, 0.5 GB, answering in half the time."""
    started = {}
    monkeypatch.setattr("os.execv", lambda path, argv: started.update(argv=argv))
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "unset")  # restored after the test
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
    main(["ui", "--workdir", str(tmp_path), "--port", "5077"])
    argv = started["argv"]
    assert argv[argv.index("--workers") + 1] == "1" and argv[argv.index("--port") + 1] == "5077"
    assert os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
