"""Real Ray runs (slow: one local cluster for all): parallel trials logging to one sqlite store,
and a 2-worker DDP trial through Ray Train's TorchTrainer."""

import json
import os
import re

import pytest
from test_streaming import write_folder

from sslab.platform.ray_cluster import trial_resources
from sslab.platform.report import build_report
from sslab.platform.study import ray_share, run_study
from sslab.platform.tracking import Tracker
from sslab.platform.validate import build_study

pytestmark = pytest.mark.ray


def _run(tmp_path, raw):
    study = build_study(raw)
    return run_study(
        study,
        raw,
        "# test\n",
        tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        command="sslab run tiny.yaml",
    )


def _children(result):
    tracker = Tracker(result["tracking_uri"])
    return tracker, tracker.child_runs(result["experiment_id"], result["parent_run_id"])


def test_parallel_seed_trials_each_get_a_finished_child_run(ray_cluster, tmp_path, tiny_raw, capfd):
    tiny_raw.update(seeds=[0, 1], max_concurrent_trials=2)
    tiny_raw["sweep"] = {"method_args.temperature": [0.2, 0.5]}
    result = _run(tmp_path, tiny_raw)
    out = capfd.readouterr().out
    assert "study tiny: trial temperature=0.2,seed=0 started" in out  # sslab's own lines
    assert "Trial status" not in out  # not Tune's table (sslab run --verbose brings it back)
    assert result["status"] == "FINISHED"
    tracker, runs = _children(result)
    names = sorted(r.data.tags["sslab.trial"] for r in runs)
    assert names == [
        "temperature=0.2,seed=0",
        "temperature=0.2,seed=1",
        "temperature=0.5,seed=0",
        "temperature=0.5,seed=1",
    ]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["method_args.temperature"] in ("0.2", "0.5")
        assert run.data.tags["method"] == "simclr" and run.data.tags["seed"] in ("0", "1")
        history = tracker.client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2]  # no metric lost to sqlite locking
        assert "random_init_knn_top1" in run.data.metrics and "knn_top1" in run.data.metrics
        assert run.data.metrics["trial_seconds"] > 0
        assert run.data.tags["sslab.torch_threads"] == "1"  # two trials at once on 2 CPUs: 1 thread each
    parent = tracker.client.get_run(result["parent_run_id"])
    share = parent.data.metrics
    assert share["trials_seconds"] == pytest.approx(sum(r.data.metrics["trial_seconds"] for r in runs))
    assert 0 <= share["ray_overhead_seconds"] < share["wall_seconds"]
    # the best point by its mean over the seeds; its best seed as the best trial
    mean = lambda t: sum(r.data.metrics["knn_top1"] for r in runs if t in r.data.tags["sslab.trial"]) / 2
    point = max(("temperature=0.2", "temperature=0.5"), key=mean)
    assert parent.data.tags["best_point"] == point and parent.data.tags["best_point_seeds"] == "2"
    best = max(
        (r for r in runs if point in r.data.tags["sslab.trial"]), key=lambda r: r.data.metrics["knn_top1"]
    )
    assert parent.data.tags["best_trial"] == best.data.tags["sslab.trial"]
    assert parent.info.status == "FINISHED"
    out = build_report("tiny", result["tracking_uri"], tmp_path / "reports" / "tiny")
    text = (out / "report.md").read_text()
    assert "temperature=0.2" in text and "±" in text and "`sslab run tiny.yaml`" in text
    assert (out / "report.html").read_text().count("data:image/png;base64") == 3  # sweep, loss, kNN


# Through Ray Train for real on 2 gloo workers: SimCLR gathers across ranks with gradients, MoCo
# gathers keys and shuffles BN across ranks. Every method's collectives (DINO's centre, CLIP's,
# the baselines' global statistics) run on 2 ranks in tests/test_ddp.py, without Ray's ~25 s a fit.
# SimCLR's also streams an image folder through Ray Data inside the two workers.
@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_two_worker_ddp_trial_through_torch_trainer(ray_cluster, tmp_path, tiny_raw, method):
    tiny_raw["train"].update(num_workers=2)
    tiny_raw["method"] = method
    if method == "simclr":
        write_folder(tmp_path / "folder", classes=2, per_class=64)
        tiny_raw["data"] = {
            "name": "imagefolder",
            "root": str(tmp_path / "folder"),
            "image_size": tiny_raw["data"]["image_size"],
            "loading": "stream",
            "stream_engine": "ray_data",
        }
    result = _run(tmp_path, tiny_raw)
    assert result["status"] == "FINISHED"
    tracker, runs = _children(result)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone logs
    assert sorted(m.step for m in tracker.client.get_metric_history(runs[0].info.run_id, "loss")) == [1, 2]
    config = tracker.client.download_artifacts(runs[0].info.run_id, "config.json")
    assert '"num_workers": 2' in open(config).read()
    assert runs[0].data.tags.get("sslab.stream_decoder") == ("ray_data" if method == "simclr" else None)


def test_ray_share_is_the_slot_time_outside_the_trials():
    rows = [{"trial_seconds": 10.0}, {"trial_seconds": 20.0}]
    one_slot = ray_share(40.0, rows, concurrency=1, ray_start_seconds=5.0)
    assert one_slot["ray_overhead_seconds"] == 10.0 and one_slot["ray_overhead_seconds_per_trial"] == 5.0
    assert ray_share(40.0, rows, concurrency=2, ray_start_seconds=5.0)["ray_overhead_seconds"] == 25.0


def test_a_resumed_study_counts_only_what_ran_in_this_invocation(tiny_raw, capsys):
    """After --resume the progress line said "0 done, 18 pending of 19" though Tune restored the
    finished trials, and their training time was set against this invocation's wall time."""
    from types import SimpleNamespace

    from sslab.platform.study import ended_since
    from sslab.platform.tune_run import study_progress

    trial = lambda i, status: SimpleNamespace(trial_id=str(i), status=status, config={"trial": f"t{i}"})
    trials = [trial(0, "TERMINATED"), trial(1, "TERMINATED"), trial(2, "RUNNING"), trial(3, "PENDING")]
    study_progress(build_study(tiny_raw), total=4).on_trial_start(0, trials, trials[2])
    assert "trial t2 started (2 done, 1 running, 1 pending of 4)" in capsys.readouterr().out
    rows = [{"trial_seconds": 50.0, "ended_ms": 1_000_000}, {"trial_seconds": 20.0, "ended_ms": 3_000_000}]
    assert ended_since(rows, started=2_000.0) == rows[1:]


def test_two_workers_fit_on_two_cpus_beside_their_driver(tiny_raw):
    tiny_raw["train"]["num_workers"] = 2
    driver, per_worker = trial_resources(build_study(tiny_raw), cluster_cpus=2)
    assert driver["CPU"] + 2 * per_worker <= 2


def test_gpu_fractions_let_trials_share_a_gpu(tiny_raw):
    tiny_raw["train"].update(use_gpu=True, gpus_per_worker=0.25)
    tiny_raw["max_concurrent_trials"] = 4
    resources, _ = trial_resources(build_study(tiny_raw), cluster_cpus=16)
    assert resources == {"CPU": 4.0, "GPU": 0.25}


def test_asha_stops_weak_trials_and_leaves_no_run_running(ray_cluster, tmp_path, tiny_raw):
    tiny_raw["train"]["epochs"] = 4
    tiny_raw["eval"] = {"knn_k": 20, "knn_every": 1, "protocols": ["knn"]}
    tiny_raw["sweep"] = {"method_args.temperature": [0.05, 0.1, 0.5, 1.0]}
    tiny_raw["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": 2}
    result = _run(tmp_path, tiny_raw)
    tracker, runs = _children(result)
    assert len(runs) == 4
    epochs = {
        r.data.tags["sslab.trial"]: len(tracker.client.get_metric_history(r.info.run_id, "loss"))
        for r in runs
    }
    assert min(epochs.values()) < 4 and max(epochs.values()) == 4  # some stopped early
    assert all(r.info.status != "RUNNING" for r in runs)
    stopped = [r for r in runs if epochs[r.data.tags["sslab.trial"]] < 4]
    assert [r.info.status for r in stopped] == ["KILLED"] * len(stopped)


def test_killed_driver_resumes_only_unfinished_trials(tmp_path, tiny_raw):
    """`sslab run` SIGKILLed (with its Ray) after the first trial finished; `--resume` finishes the
    rest: one child run per trial, all FINISHED, each epoch logged once, the parent FINISHED."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import yaml

    tiny_raw.update(seeds=[0, 1, 2])
    tiny_raw["train"]["epochs"] = 3
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, RAY_ADDRESS="", RAY_TMPDIR=tempfile.mkdtemp(prefix="sslabk", dir="/tmp"))
    command = [
        sys.executable,
        "-m",
        "sslab.platform.cli",
        "run",
        str(path),
        "--workdir",
        str(tmp_path / "runs"),
        "--tracking-uri",
        uri,
        "--reports",
        str(tmp_path / "reports"),
    ]
    driver = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tracker, deadline = Tracker(uri), time.time() + 600  # a watchdog: a loaded machine takes >240 s
    finished = []
    while time.time() < deadline and driver.poll() is None:
        experiment = (
            tracker.client.get_experiment_by_name("tiny") if (tmp_path / "mlflow.db").exists() else None
        )
        runs = tracker.client.search_runs([experiment.experiment_id]) if experiment else []
        finished = [r for r in runs if r.data.tags.get("sslab.trial") and r.info.status == "FINISHED"]
        if finished:
            break
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert len(finished) == 1, "the driver was not killed between trials"

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    experiment = tracker.client.get_experiment_by_name("tiny")
    parents = tracker.client.search_runs([experiment.experiment_id], "tags.sslab.role = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    runs = tracker.child_runs(experiment.experiment_id, parents[0].info.run_id)
    assert sorted(r.data.tags["sslab.trial"] for r in runs) == ["seed=0", "seed=1", "seed=2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == [1, 2, 3]
    # the trial that had finished before the kill was not run again
    first = next(r for r in runs if r.info.run_id == finished[0].info.run_id)
    assert first.info.end_time == finished[0].info.end_time


def test_optuna_proposes_points_and_each_runs_once_per_seed(ray_cluster, tmp_path, tiny_raw):
    tiny_raw.update(seeds=[0, 1], max_concurrent_trials=2)
    tiny_raw["train"]["epochs"] = 1
    tiny_raw["search"] = {"name": "optuna", "num_samples": 2, "seed": 3}
    tiny_raw["sweep"] = {"method_args.temperature": {"loguniform": [0.05, 1.0]}}
    result = _run(tmp_path, tiny_raw)
    assert result["status"] == "FINISHED"
    _, runs = _children(result)
    by_point: dict = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        temperature = float(run.data.params["method_args.temperature"])
        assert 0.05 <= temperature <= 1.0
        assert run.data.tags["sslab.trial"] == f"temperature={temperature},seed={run.data.tags['seed']}"
        by_point.setdefault(temperature, set()).add(run.data.tags["seed"])
    assert len(by_point) == 2 and all(seeds == {"0", "1"} for seeds in by_point.values())


def test_pbt_copies_the_better_trial_and_mutates_its_temperature(ray_cluster, tmp_path, tiny_raw):
    tiny_raw.update(max_concurrent_trials=2)
    tiny_raw["train"]["epochs"] = 4
    tiny_raw["eval"] = {"knn_k": 20, "knn_every": 1, "protocols": ["knn"]}
    tiny_raw["sweep"] = {"method_args.temperature": [0.2, 0.5]}
    # metric: loss (continuous, no ties: one trial always ranks below the other at epoch 2)
    tiny_raw["scheduler"] = {
        "name": "pbt",
        "perturbation_interval": 2,
        "quantile_fraction": 0.5,
        "metric": "loss",
        "mode": "min",
        "resample_probability": 0.0,
        "mutations": {"method_args.temperature": [0.1, 0.2, 0.5, 1.0]},
    }
    result = _run(tmp_path, tiny_raw)
    assert result["status"] == "FINISHED"
    tracker, runs = _children(result)
    assert len(runs) == 2
    key = "hp/method_args.temperature"
    schedules = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        loss = tracker.client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in loss) == [1, 2, 3, 4]  # each epoch once, across the copy
        history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in history] == [1, 2, 3, 4]
        schedules[run.data.tags["sslab.trial"]] = [value for _, value in history]
    # Tune's own record of each exploit: [trial, donor, ..., old config, new config]. The trial
    # that copied the better one's checkpoint at epoch 2 logs the new temperature from epoch 3.
    [log] = (tmp_path / "runs").rglob("pbt_global.txt")
    exploits = [json.loads(line) for line in log.read_text().splitlines()]
    assert exploits, "the worse half never copied the better one"
    target, donor, *_, new_config = exploits[0]
    [name] = [n for n in schedules if re.sub(r"[^\w]", "_", n) in target]
    [donor_name] = [n for n in schedules if re.sub(r"[^\w]", "_", n) in donor]
    assert name != donor_name
    assert schedules[name][2] == new_config["method_args.temperature"]
    assert schedules[name][:2] == [float(name.split("=")[1].split(",")[0])] * 2


def _listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold (from /proc)."""
    import socket
    from pathlib import Path

    listening = {}
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            listening[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found += [(pid, *listening[link[8:-1]]) for link in links if link[8:-1] in listening]
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def test_local_cluster_listens_on_loopback_only_and_requires_a_token(ray_cluster):
    """The embedded cluster (as `sslab run` starts it) must not be reachable from another machine,
    and its job APIs must refuse a request without Ray's token (it would run any command)."""
    import urllib.error
    import urllib.request

    @ray_cluster.remote
    def pid():
        return os.getpid()

    worker = ray_cluster.get(pid.remote())
    processes = _descendants(os.getpid())
    assert worker in processes  # workers too are Ray's children
    sockets = _listening_sockets(processes)
    assert len({p for p, _, _ in sockets}) >= 4  # GCS, raylet, dashboard, agents, workers
    exposed = [(p, a, port) for p, a, port in sockets if a not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, exposed
    node = ray_cluster._private.worker._global_node
    urls = [(f"http://{node.address_info['webui_url']}/api/jobs/", None)]
    # The agent's job API too; -1 when its port was taken (by another local cluster): no HTTP server then
    agent_port = ray_cluster.nodes()[0]["DashboardAgentListenPort"]
    if agent_port > 0:
        urls.append((f"http://127.0.0.1:{agent_port}/api/job_agent/jobs/", b'{"entrypoint": "true"}'))
    for url, data in urls:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10)
        assert refused.value.code == 401, url


def test_the_state_api_finds_this_cluster_beside_another_local_one(ray_cluster):
    """Train's placement-group cleaner asks Ray's State API from inside the cluster; with a second
    local cluster running, the API could not choose between them and the cleaner's thread died."""
    import subprocess
    import sys
    import tempfile

    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ray, sys; ray.init(num_cpus=0, include_dashboard=False, "
            f"_temp_dir={tempfile.mkdtemp(prefix='sslabray', dir='/tmp')!r}); print('up', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    )
    try:
        assert other.stdout.readline().strip() == "up"

        @ray_cluster.remote
        def nodes_seen_from_inside():
            from ray.util.state import list_nodes

            return [node.node_id for node in list_nodes()]

        assert ray_cluster.get(nodes_seen_from_inside.remote()) == [ray_cluster.nodes()[0]["NodeID"]]
    finally:
        other.stdin.close()
        other.wait(timeout=60)


def test_an_interrupted_study_skips_the_trials_that_never_started():
    """Ctrl-C: Tune returns the trials it never started without a config; they get no status
    (was: a TypeError that left the parent run open)."""
    from types import SimpleNamespace

    from sslab.platform.tune_run import trial_statuses

    ran = SimpleNamespace(config=None, metrics={"sslab_trial": "seed=0"}, error=None)
    never_started = SimpleNamespace(config=None, metrics={}, error=None)
    assert trial_statuses([ran, never_started], factory=None) == {"seed=0": "TERMINATED"}


def test_ray_data_decodes_the_batches_in_the_epochs_order_and_counts_bad_files(ray_cluster, tmp_path):
    import torch

    from sslab.platform.streaming import ImageFiles, epoch_batches

    write_folder(tmp_path, classes=2, per_class=8)
    files = sorted(str(f) for f in (tmp_path / "train").rglob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files[5] = str(tmp_path / "broken.png")
    streamed = ImageFiles(files, 16, max_bad_fraction=0.5)
    indices = [torch.tensor([3, 1, 4]), torch.tensor([15, 9, 2]), torch.tensor([6, 5, 0])]
    batches = list(epoch_batches(streamed, indices, workers=2, engine="ray_data"))
    expected = [ImageFiles(files, 16).decode(index.tolist())[0] for index in indices]
    assert all(torch.equal(got, want) for got, want in zip(batches, expected))
    assert len(batches) == 3 and len(streamed.bad) == 1 and "broken.png" in next(iter(streamed.bad))
