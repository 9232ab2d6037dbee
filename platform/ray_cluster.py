"""The Ray cluster a study runs on: a private local one (loopback only, token auth on) or one it
joins, and what a trial asks of it."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

from sslab.platform.config import ConfigError, StudyConfig


def init_ray(address: str | None, **local_options) -> None:
    """Joins `address` (or $RAY_ADDRESS) as Ray documents it, else starts a private local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    start_local_ray(**local_options)


def start_local_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """A local cluster nobody else can reach: every Ray process (GCS, raylet, dashboard and its
    agent, workers) listens on 127.0.0.1 only, and Ray's token authentication stays on, so the
    job API cannot run a command for another local user either."""
    # Ray's local-only mode (its default on macOS): the node address is the loopback one. The
    # environment reaches Ray's child processes; the constant covers a Ray imported before now.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"  # whatever the caller's shell says
    import ray
    from ray._private import ray_constants
    from ray._raylet import Config

    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")  # re-reads RAY_AUTH_MODE, as Ray itself does when it enables tokens
    # Ray's State API (Train's placement-group cleaner calls it from inside the cluster) finds its
    # cluster by listing this machine's GCS processes: beside a second local cluster it cannot
    # choose, and the cleaner's thread dies (a dead controller's placement group would then leak).
    # Naming this cluster's dashboard settles it for every child process; a taken port fails init.
    dashboard_port = free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        num_cpus=num_cpus,
        _temp_dir=temp_dir,
        object_store_memory=300 * 1024**2,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=True,
    )
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    _mark_session(session)
    removed, size, left = clean_earlier_sessions(session.parent, session)
    if removed:
        print(f"removed {removed} Ray session folder(s) of killed sslab studies ({size / 2**20:.0f} MB)")
    if left:
        print(f"could not remove what earlier sslab studies left: {'; '.join(left)}")


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trial_resources(study: StudyConfig, cluster_cpus: float) -> tuple[dict, float]:
    """Resources of the Tune trial itself and CPUs of each training worker.

    Without train.cpus_per_worker, the cluster's CPUs are shared by the concurrent workers.
    The driver of a multi-worker trial only waits on its TorchTrainer: it gets 0.01 CPU, and the
    workers leave room for it (else a 2-worker trial never fits on 2 CPUs and Train waits forever).
    """
    train = study.train
    cpus = train.cpus_per_worker
    if cpus is None:
        share = cluster_cpus / (study.max_concurrent_trials * train.num_workers)
        share -= 0.01 if train.num_workers > 1 else 0
        cpus = float(math.floor(share)) if share >= 1 else round(max(share, 0.01), 2)
    if train.num_workers == 1:
        return {"CPU": cpus, "GPU": train.gpus_per_worker if train.use_gpu else 0}, cpus
    return {"CPU": 0.01}, cpus


def local_cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the local cluster: the running one's, else what `ray.init` would detect."""
    import ray

    if ray.is_initialized():
        available = ray.cluster_resources()
        return available.get("CPU", 0), available.get("GPU", 0)
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


def check_fits_local_cluster(study: StudyConfig, source: str) -> None:
    """A trial that asks for more than the cluster has would wait PENDING forever."""
    cpus, gpus = local_cluster_resources()
    resources, per_worker = trial_resources(study, cpus)
    train = study.train
    workers = train.num_workers
    needed_cpus = resources["CPU"] + (per_worker * workers if workers > 1 else 0)
    if needed_cpus > cpus + 1e-9:
        raise ConfigError(
            source,
            "train.cpus_per_worker",
            f"a trial needs {needed_cpus:g} CPUs ({workers} worker(s)); the local cluster has {cpus:g}",
        )
    if train.use_gpu and train.gpus_per_worker * workers > gpus:
        raise ConfigError(
            source,
            "train.use_gpu",
            f"a trial needs {train.gpus_per_worker * workers:g} GPU(s); the local cluster has {gpus:g}",
        )


# ----------------------------------------------------------------------------- leftovers
# A local cluster's session folder under Ray's temp dir holds its logs; Ray never removes it. The
# driver marks the folders of the clusters it starts; a later `sslab run` removes those whose
# driver died without ending its study (killed), and stops any of their processes still running
# (measured: after a SIGKILLed driver, Ray's dashboard and runtime-env agents ran on for ~1 min).
SESSION_MARK = "sslab_driver.json"


def _process_ids() -> list[list]:
    import psutil

    me = psutil.Process()
    return [[p.pid, p.create_time()] for p in [me, *me.children(recursive=True)]]


def _mark_session(session: Path, keep: bool = False) -> None:
    """`keep`: a study that ended unfinished keeps its cluster's logs (its message names them)."""
    try:
        (session / SESSION_MARK).write_text(json.dumps({"processes": _process_ids(), "keep": keep}))
    except OSError:
        pass  # nothing to clean up later; the study itself is not affected


def local_session() -> Path | None:
    """This process's local cluster's session folder (None when it joined a cluster)."""
    import ray

    node = ray._private.worker._global_node if ray.is_initialized() else None
    session = Path(node.get_session_dir_path()) if node else None
    return session if session and (session / SESSION_MARK).exists() else None


def end_local_cluster(keep_logs: bool) -> Path | None:
    """Stops the local cluster this process started; removes its session folder unless
    `keep_logs`; returns the folder kept (None if removed or not ours)."""
    import ray

    session = local_session()
    if session is None:
        return None
    ray.shutdown()
    if keep_logs:
        _mark_session(session, keep=True)
        return session
    shutil.rmtree(session, ignore_errors=True)
    return None


def running_process(pid: int, created: float):
    """The process `pid` if it is still the one started at `created` (pids are reused)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process if abs(process.create_time() - created) < 1e-3 else None
    except psutil.Error:
        return None


def clean_earlier_sessions(root: Path, current: Path | None = None) -> tuple[int, int, list[str]]:
    """Removes the session folders under `root` of sslab clusters whose driver is gone and whose
    study did not ask to keep them, after stopping their processes still running. Returns
    (folders removed, bytes freed, what could not be cleaned)."""
    import psutil

    removed, freed, left = 0, 0, []
    for mark in sorted(root.glob(f"session_*/{SESSION_MARK}")):
        session = mark.parent
        if session.is_symlink():  # session_latest
            continue
        try:
            info = json.loads(mark.read_text())
        except (OSError, ValueError):
            continue
        (driver, *others) = info.get("processes") or [[0, 0]]
        if session == current or info.get("keep") or running_process(*driver):
            continue
        for pid, created in others:
            process = running_process(pid, created)
            try:
                if process:
                    process.kill()
            except psutil.Error as err:
                left.append(f"process {pid} of {session} ({err})")
        freed += sum(f.stat().st_size for f in session.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(session, ignore_errors=True)
        if session.exists():
            left.append(f"folder {session}")
        else:
            removed += 1
    return removed, freed, left
