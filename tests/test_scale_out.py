"""Beyond one machine, as users go there: a Ray cluster of two nodes started with `ray start`
(each on its own loopback address, token authentication on) and a team MLflow tracking server
(`mlflow server --serve-artifacts`). A study joins the cluster with `--ray-address`, its DDP
workers and its Ray Data decoding on both nodes, every run on the server; then another folder
with none of the trial's files evaluates, exports and reports from the server alone. Marked
`cluster`: `-m "not cluster"` skips it. Never `ray stop` here: it stops every Ray on the
machine (a study running beside the suite included); each node is stopped by its own process."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from test_streaming import write_folder

from conftest import TINY
from sslab.platform.cli import main
from sslab.platform.ray_cluster import free_loopback_port

pytestmark = [pytest.mark.ray, pytest.mark.cluster]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # two "machines": Linux routes all of 127/8 to lo


def _wait_until(ready, what: str, process: subprocess.Popen, log: Path, seconds: float = 120):
    deadline = time.time() + seconds
    while not ready():
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{what} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@dataclass
class Cluster:
    address: str  # what `--ray-address` takes: the head's GCS
    dashboard: str
    token: str
    env: dict

    def state(self, kind: str) -> list[dict]:
        """Ray's State API over HTTP (`/api/v0/nodes`, `actors`, `tasks`), with the token."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/{kind}?limit=10000", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())["data"]["result"]["result"]

    def alive_nodes(self) -> int:
        try:
            return sum(node["state"] == "ALIVE" for node in self.state("nodes"))
        except (OSError, ValueError, KeyError):
            return 0


@pytest.fixture(scope="module")
def two_nodes():
    """Head on 127.0.0.2 and a worker node on 127.0.0.3, 1 CPU each, started as on two
    machines. `--block` keeps each node's processes under its `ray start`, so stopping that
    process group stops that node and nothing else."""
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # What the suite's own local cluster left in this process's environment: its local-only mode
    # (a second node would refuse to join) and the address of its dashboard.
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    temp = Path(tempfile.mkdtemp(prefix="sslabnodes", dir="/tmp"))  # short: socket paths < 107 bytes
    ray = str(Path(sys.executable).parent / "ray")
    gcs, dashboard = free_loopback_port(), free_loopback_port()
    nodes = []

    def start(name: str, *args: str) -> subprocess.Popen:
        ports = [
            f"--{option}={free_loopback_port()}"
            for option in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ]
        log = open(temp / f"{name}.log", "wb")
        command = [ray, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *ports, *args]
        node = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        nodes.append((node, log))
        return node

    cluster = Cluster(f"{HEAD_IP}:{gcs}", f"http://{HEAD_IP}:{dashboard}", token, env)
    try:
        head = start(
            "head",
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs}",
            "--include-dashboard=true",
            f"--dashboard-host={HEAD_IP}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_loopback_port()}",
            f"--temp-dir={temp}",
        )
        _wait_until(lambda: cluster.alive_nodes() == 1, "the head node", head, temp / "head.log")
        worker = start("worker", f"--address={cluster.address}", f"--node-ip-address={WORKER_IP}")
        _wait_until(lambda: cluster.alive_nodes() == 2, "the worker node", worker, temp / "worker.log")
        yield cluster
    finally:
        for node, log in reversed(nodes):
            _stop_group(node)
            log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(process: subprocess.Popen, seconds: float = 5) -> None:
    """SIGTERM to the process group a fixture started, SIGKILL if it is still there after `seconds`
    (a node's processes all share its group; Ray's own shutdown of a node took 15-20 s)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=seconds)
    except ProcessLookupError:
        process.wait()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    try:
        _wait_until(healthy, "mlflow server", server, root / "server.log")
        yield url, root
    finally:
        _stop_group(server)
        log.close()


def test_a_study_on_two_nodes_tracked_on_a_server_then_read_from_the_server_alone(
    two_nodes, tracking_server, tmp_path, monkeypatch, capsys
):
    from mlflow import MlflowClient

    url, server_root = tracking_server
    with pytest.raises(urllib.error.HTTPError) as refused:  # the cluster's API wants the token
        urllib.request.urlopen(f"{two_nodes.dashboard}/api/v0/nodes", timeout=10)
    assert refused.value.code == 401

    write_folder(tmp_path / "images", classes=2, per_class=32, size=16)
    raw = TINY | {"seeds": [0], "max_concurrent_trials": 1, "log_model": True}
    raw["sweep"] = {"method_args.temperature": [0.1, 0.5]}  # two trials, one after the other
    raw["data"] = {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 16}
    raw["data"] |= {"loading": "stream", "stream_engine": "ray_data", "stream_workers": 1}
    raw["train"] = TINY["train"] | {"num_workers": 2, "epochs": 1, "batch_size": 32}
    raw["eval"] = {"knn_k": 5, "protocols": ["knn"], "random_init_baseline": False}
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(raw))
    workdir = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "sslab.platform.cli",
        "run",
        str(study),
        "--ray-address",
        two_nodes.address,
    ]
    command += ["--workdir", str(workdir), "--tracking-uri", url, "--no-report", "--no-estimate"]
    done = subprocess.run(command, env=two_nodes.env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    # Each trial's two DDP workers ran one on each node, and so did the Ray Data decoding tasks.
    ips = {node["node_id"]: node["node_ip"] for node in two_nodes.state("nodes")}
    workers = [a for a in two_nodes.state("actors") if a["class_name"] == "RayTrainWorker"]
    assert len(workers) == 4 and sorted(ips[a["node_id"]] for a in workers) == [HEAD_IP] * 2 + [WORKER_IP] * 2
    decoded_on = {ips.get(t["node_id"]) for t in two_nodes.state("tasks") if t["name"] == "Map(_decode_row)"}
    assert decoded_on == {HEAD_IP, WORKER_IP}

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("tiny")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if "sslab.trial" in r.data.tags]
    names = ["temperature=0.1,seed=0", "temperature=0.5,seed=0"]
    assert sorted(r.data.tags["sslab.trial"] for r in trials) == names
    assert {r.info.status for r in trials} == {"FINISHED"} and all(
        "eval/knn_top1" in r.data.metrics for r in trials
    )
    run_id = trials[0].info.run_id
    assert {a.path for a in client.list_artifacts(run_id)} >= {"export", "checkpoint", "config.json"}
    assert len(client.search_logged_models([experiment.experiment_id])) == 2
    assert trials[0].info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: kept by the server
    assert len(list((server_root / "artifacts").rglob("encoder.pt"))) == 2

    _check_what_the_ui_reads(url, experiment.experiment_id)

    # Another machine, as far as files go: no workdir, no trial folder, only the server.
    shutil.rmtree(workdir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    assert main(["eval", run_id, "--tracking-uri", url, "--protocol", "knn"]) == 0
    assert "eval/knn_top1" in capsys.readouterr().out
    assert main(["export", run_id, "--out", "exported", "--tracking-uri", url]) == 0
    weights = torch.load(elsewhere / "exported" / "encoder.pt", weights_only=True)
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert main(["report", "tiny", "--tracking-uri", url, "--reports", "reports"]) == 0
    report = (elsewhere / "reports" / "tiny" / "report.md").read_text()
    assert f"({url}/#/experiments/{experiment.experiment_id}" in report  # links open the server's UI
    assert not list(elsewhere.rglob("mlflow.db"))  # nothing fell back to a local store


def _rest(url: str, endpoint: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _check_what_the_ui_reads(url: str, experiment_id: str) -> None:
    """The MLflow UI's own REST calls: the experiment opens on its runs (its kind tag), the parent's
    params are the swept keys (as swept) and the shared setup, a child's params its resolved
    config without the study-level noise (description, seeds, sweep, unset values)."""
    experiment = _rest(url, f"experiments/get?experiment_id={experiment_id}")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _rest(url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    by_role = {}
    for run in runs:
        run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        by_role.setdefault(run_tags.get("sslab.role", "trial"), []).append((run["info"], params))
    ((parent_info, parent_params),) = by_role["study"]
    assert parent_info["run_name"].startswith("tiny")
    assert parent_params["method_args.temperature"] == "swept: [0.1, 0.5]"
    assert parent_params["train.num_workers"] == "2" and parent_params["method"] == "simclr"
    children = by_role["trial"]
    assert sorted(info["run_name"] for info, _ in children) == [
        "temperature=0.1,seed=0",
        "temperature=0.5,seed=0",
    ]
    for _, params in children:
        assert params["method_args.temperature"] in ("0.1", "0.5") and params["train.seed"] == "0"
        assert not {"description", "seeds", "sweep"} & set(params) and "None" not in params.values()
