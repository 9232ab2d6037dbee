"""Beyond one machine: a study tracked on a real MLflow tracking server over HTTP (proxied
artifacts), then evaluated, exported and reported from another folder that holds none of the
trial's files, from the server alone. Marked `cluster`: `-m "not cluster"` skips it."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import yaml

from sslab.platform.cli import main
from sslab.platform.ray_cluster import free_loopback_port

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


@pytest.fixture
def tracking_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with its own store and artifact root, serving the artifacts
    itself (`--serve-artifacts`: clients upload and download through it, as a team server does)."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_loopback_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError((root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_a_study_on_a_tracking_server_is_evaluated_exported_and_reported_from_it_alone(
    ray_cluster, tracking_server, tmp_path, tiny_raw, monkeypatch, capsys
):
    from mlflow import MlflowClient

    url, server_root = tracking_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(tiny_raw | {"seeds": [0], "log_model": True}))
    workdir = tmp_path / "runs"
    assert main(["run", str(study), "--workdir", str(workdir), "--tracking-uri", url, "--no-report"]) == 0

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("tiny")
    (trial,) = [r for r in client.search_runs([experiment.experiment_id]) if "sslab.trial" in r.data.tags]
    run_id = trial.info.run_id
    assert trial.info.status == "FINISHED" and "eval/knn_top1" in trial.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {"export", "checkpoint", "config.json"}
    assert client.search_logged_models([experiment.experiment_id]), "the logged model reached the server"
    assert trial.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: stored by the server
    assert any((server_root / "artifacts").rglob("encoder.pt"))

    # Another machine, as far as files go: no workdir, no trial folder, only the server.
    shutil.rmtree(workdir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", run_id, "--tracking-uri", url, "--protocol", "knn"]) == 0
    assert "eval/knn_top1" in capsys.readouterr().out
    assert not list(elsewhere.rglob("mlflow.db")), "eval fell back to a local store"
    assert main(["export", run_id, "--out", "exported", "--tracking-uri", url]) == 0
    assert not list(elsewhere.rglob("mlflow.db")), "export fell back to a local store"
    weights = torch.load(elsewhere / "exported" / "encoder.pt", weights_only=True)
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert main(["report", "tiny", "--tracking-uri", url, "--reports", "reports"]) == 0
    report = (elsewhere / "reports" / "tiny" / "report.md").read_text()
    assert f"({url}/#/experiments/{experiment.experiment_id}" in report  # links open the server's UI
    assert not list(elsewhere.rglob("mlflow.db"))  # nothing fell back to a local store
