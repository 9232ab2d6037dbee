"""A study on Ray Tune: one trial per sweep point x seed, one MLflow child run per trial.

A trial with one worker runs the training loop inside the Tune trial; with N > 1 workers the
trial is a thin function that fits a TorchTrainer (DDP) and forwards its reports to Tune.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import random
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from sslab.platform.config import (
    ConfigError,
    SearchConfig,
    StudyConfig,
    as_distribution,
    build_study,
    flatten,
    get_dotted,
    point_keys,
    set_dotted,
)
from sslab.platform.tracking import (
    TRIAL_TAG,
    Tracker,
    TrialTracking,
    default_tracking_uri,
    git_commit,
    require_store,
)
from sslab.platform.train import CHECKPOINT_NAME, clock, train_loop, trial_config
from sslab.platform.workdir import atomic_write_json, check_writable, inside, locked, safe_dirname

SEED_KEY = "train.seed"
POINT_TAG, POINT_VALUES_TAG = "sslab.point", "sslab.point_values"
POINTS_KEY = "points"


@dataclass
class Trial:
    name: str
    values: dict  # swept dotted key -> value, including train.seed
    study: StudyConfig  # resolved


def sweep_points(sweep: dict, search: SearchConfig | None = None) -> list[dict]:
    """The sweep as a list of {dotted key: value}. grid: every `key: [values]` entry crossed with
    each other and with the `points` entry (a list of override sets, e.g. per-method settings).
    random: `num_samples` points drawn from each key's list or distribution (seeded)."""
    if search is not None and search.name == "random":
        return _random_points(sweep, search)
    grid_keys = [k for k in sweep if k != POINTS_KEY]
    points = sweep.get(POINTS_KEY) or [{}]
    return [
        dict(zip(grid_keys, values)) | point
        for point in points
        for values in itertools.product(*(sweep[k] for k in grid_keys))
    ]


def _random_points(sweep: dict, search: SearchConfig) -> list[dict]:
    rng = random.Random(search.seed)
    keys = [k for k in sweep if k != POINTS_KEY]
    points = []
    for _ in range(search.num_samples):
        point = {k: draw(sweep[k], rng) for k in keys}
        points.append(point | (rng.choice(sweep[POINTS_KEY]) if POINTS_KEY in sweep else {}))
    return points


def draw(spec, rng: random.Random):
    """One value from a list or a {uniform|loguniform|choice: ...} spec; floats to 4 significant
    digits, so that trial names stay readable and name the value that actually ran."""
    distribution = as_distribution(spec)
    if distribution is None:
        return rng.choice(spec)
    kind, args = distribution
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    value = (
        rng.uniform(low, high) if kind == "uniform" else math.exp(rng.uniform(math.log(low), math.log(high)))
    )
    return significant(value)


def significant(value, digits: int = 4):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def expand_trials(study: StudyConfig, raw: dict) -> list[Trial]:
    """Every sweep point times every seed, each a fully validated study (grid and random search;
    Optuna proposes its points while the study runs)."""
    return [
        make_trial(raw, point | {SEED_KEY: seed})
        for point in sweep_points(study.sweep, study.search)
        for seed in study.seeds
    ]


def make_trial(raw: dict, values: dict, name: str | None = None) -> Trial:
    """The study with `values` (dotted key -> value, seed included) applied, validated."""
    trial_raw = copy.deepcopy(raw)
    trial_raw.pop("sweep", None)
    trial_raw["seeds"] = [values[SEED_KEY]]
    for key, value in values.items():
        set_dotted(trial_raw, key, value)
    return Trial(name or trial_name(values), values, build_study(trial_raw, "<trial>"))


def point_values(values: dict) -> dict:
    """A trial's sweep point as {name key: value} (see `point_keys`), seed left out; a point that
    changes the method names it first, however its overrides are ordered."""
    swept = [k for k in values if k != SEED_KEY]
    names = point_keys(swept)
    ordered = sorted(swept, key=lambda k: names[k] != "method")
    return {names[k]: values[k] for k in ordered}


def point_label(values: dict) -> str:
    """'temperature=0.2' ('default' for a study without a sweep)."""
    return ",".join(f"{k}={v}" for k, v in point_values(values).items()) or "default"


def trial_name(values: dict) -> str:
    """'temperature=0.2,seed=0': the point, the seed last."""
    point = point_label(values)
    return (f"{point}," if point != "default" else "") + f"seed={values[SEED_KEY]}"


# ----------------------------------------------------------------------------- the driver


@dataclass
class StudyPaths:
    workdir: Path

    @property
    def tracking_uri(self) -> str:
        return default_tracking_uri(self.workdir)

    def study_dir(self, study: str) -> Path:
        return inside(self.workdir, "studies", study)

    def invocation_dir(self, study: str, parent_run_id: str) -> Path:
        return inside(self.study_dir(study), parent_run_id)

    def latest_file(self, study: str) -> Path:
        return self.study_dir(study) / "latest.json"

    def latest_invocation(self, study: str) -> str:
        return json.loads(self.latest_file(study).read_text())["parent_run_id"]


RESOLVED_FILE = "study.json"  # in the invocation folder: the resolved study that ran


def run_study(
    study: StudyConfig,
    raw: dict,
    source_text: str,
    workdir: Path,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    source: str = "<study>",
    command: str = "",
) -> dict:
    """Runs every trial of the study; returns {'parent_run_id', 'experiment_id', 'trials'}.
    `command`: the command line that ran it, kept as the parent run's `sslab.command` tag.

    Everything that can be refused is checked before anything is written: every trial, image
    files (decoded once, into the cache the trials read), a resumed run's settings, whether a
    trial fits the local cluster, and whether the workdir is writable."""
    # Optuna's trials are proposed as it runs; its ranges were validated at both ends on load.
    trials = [] if study.search.name == "optuna" else expand_trials(study, raw)
    paths = StudyPaths(Path(workdir).resolve())
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or paths.tracking_uri
    if resume:
        _check_resumable(paths, study, uri, source)
    decode_image_folders([t.study for t in trials] or [study], source)
    local = not (ray_address or os.environ.get("RAY_ADDRESS"))
    for trial_study in [t.study for t in trials] or [study]:  # a sweep may change the resources
        if local:
            check_fits_local_cluster(trial_study, source)
    check_writable(paths.workdir)
    ray_started = time.time()
    init_ray(ray_address)
    ray_start_seconds = time.time() - ray_started
    busy = f"study {study.name!r} is already running in this workdir; wait for it, or use another --workdir"
    with locked(paths.study_dir(study.name) / ".lock", wait=False, busy_message=busy):
        return _run_locked(
            study, raw, trials, source_text, paths, uri, ray_address, resume, command, ray_start_seconds
        )


def _run_locked(
    study: StudyConfig,
    raw: dict,
    trials: list[Trial],
    source_text: str,
    paths: StudyPaths,
    uri: str,
    ray_address: str | None,
    resume: bool,
    command: str,
    ray_start_seconds: float = 0.0,
) -> dict:
    tracker, experiment_id = open_store(paths, uri, study.name)
    parent_run_id = _parent_run(tracker, experiment_id, study, source_text, paths, resume)
    if command and not resume:
        tracker.set_tag(parent_run_id, "sslab.command", command)
    invocation = paths.invocation_dir(study.name, parent_run_id)
    count = len(trials) or study.search.num_samples * len(study.seeds)
    print(f"study {study.name}: {count} trial(s); MLflow {uri} (parent run {parent_run_id})", flush=True)

    factory = TrialFactory(
        raw, list(study.seeds), uri, experiment_id, parent_run_id, str(invocation), git_commit()
    )
    fixed = {trial.name: trial.values for trial in trials}

    started = time.time()
    try:
        results = _run_tune(study, factory, fixed, invocation, ray_address, resume)
    except BaseException:
        tracker.end(parent_run_id, "FAILED")
        raise
    _close_dangling_runs(tracker, experiment_id, parent_run_id, results)
    summary = _summarise(tracker, experiment_id, parent_run_id)
    _record_best(tracker, parent_run_id, summary, study)
    share = ray_share(time.time() - started, summary, study.max_concurrent_trials, ray_start_seconds)
    tracker.log_metrics(parent_run_id, share, step=0)
    ran_all = len(results) >= count  # an interrupted study leaves some never started
    status = "FINISHED" if ran_all and all(r == "TERMINATED" for r in results.values()) else "FAILED"
    tracker.end(parent_run_id, status)
    print(
        f"study {study.name}: {status.lower()} in {share['wall_seconds']:.0f} s; {describe_ray_share(share)}",
        flush=True,
    )
    return {
        "parent_run_id": parent_run_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "trials": summary,
        "status": status,
        "share": share,
    }


def ray_share(wall: float, rows: list[dict], concurrency: int, ray_start_seconds: float) -> dict:
    """What Ray cost the study: its start, and the trial slots' time spent outside the training
    loop (actor start, imports, scheduling, reporting), from the trials' own `trial_seconds`."""
    inside = sum(r.get("trial_seconds") or 0.0 for r in rows)
    outside = max(0.0, wall - inside / max(1, min(concurrency, len(rows))))
    return {
        "wall_seconds": wall,
        "ray_start_seconds": ray_start_seconds,
        "trials_seconds": inside,
        "ray_overhead_seconds": outside,
        "ray_overhead_seconds_per_trial": outside / max(1, len(rows)),
    }


def describe_ray_share(share: dict) -> str:
    return (
        f"Ray started in {share['ray_start_seconds']:.1f} s, and took {share['ray_overhead_seconds']:.1f} s "
        f"of the trials' slots outside training ({share['ray_overhead_seconds_per_trial']:.1f} s per trial)"
    )


def open_store(paths: StudyPaths, uri: str, study_name: str) -> tuple[Tracker, str]:
    """The tracker and the study's experiment, the sqlite store created on first use. MLflow's
    first-time set-up is not safe to run twice at once: concurrent `sslab run`s take turns."""
    with locked(paths.workdir / ".store.lock", wait=True):
        tracker = Tracker(uri)
        return tracker, tracker.experiment(study_name, paths.workdir / "mlartifacts")


def _check_resumable(paths: StudyPaths, study: StudyConfig, uri: str, source: str) -> None:
    """A resumed invocation continues with the settings it started with: a study that changed
    since (its file or --set) is refused, as is a store that lost the invocation's runs."""
    latest = paths.latest_file(study.name)
    if not latest.exists():
        raise ConfigError(source, "--resume", f"no earlier run of study {study.name!r} in {paths.workdir}")
    parent_run_id = paths.latest_invocation(study.name)
    saved = paths.invocation_dir(study.name, parent_run_id) / RESOLVED_FILE
    if saved.exists():
        before = flatten(json.loads(saved.read_text()))
        now = flatten(json.loads(json.dumps(study.to_dict(), default=str)))
        changed = [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
            raise ConfigError(
                source,
                "--resume",
                f"the study differs from the run it would resume ({shown}); "
                "resume it unchanged, or run without --resume",
            )
    require_store(uri, "--resume", source)
    try:
        Tracker(uri).client.get_run(parent_run_id)
    except Exception:
        raise ConfigError(
            source,
            "--resume",
            f"the MLflow store {uri} has no run {parent_run_id} (was it "
            "deleted?); run without --resume to start again",
        ) from None


def decode_image_folders(studies: list[StudyConfig], source: str) -> None:
    """Decodes each distinct image-folder dataset once (the trials then read the cache), so that
    a corrupt or truncated file is an error naming it, before anything is written."""
    from sslab.platform.data import DataError, load_dataset

    seen = set()
    for trial_study in studies:
        data = trial_study.data
        key = json.dumps(dataclasses.asdict(data), sort_keys=True)
        if (data.name != "imagefolder" and data.pretrain is None) or key in seen:
            continue
        seen.add(key)
        try:
            load_dataset(data)
        except DataError as err:
            key = "data.pretrain" if data.pretrain and str(data.pretrain) in str(err) else "data.root"
            raise ConfigError(source, key, str(err)) from None


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


REPEAT_INDEX = "__trial_index__"  # set by Tune's Repeater: which repeat (seed) of a point this is


@dataclass
class TrialFactory:
    """Builds a trial's train-loop config from its values, on the driver or inside a Tune trial
    (Optuna proposes values only while the study runs). Plain data: Ray ships it to the trials."""

    raw: dict
    seeds: list
    uri: str
    experiment_id: str
    parent_run_id: str
    invocation: str
    commit: str

    def config(self, values: dict, name: str | None = None, point: dict | None = None) -> dict:
        """`point`: the values that name the trial's sweep point, if not `values` (PBT: the
        initial ones, before mutation)."""
        trial = make_trial(self.raw, values, name)
        trial_dir = inside(Path(self.invocation), "trials", safe_dirname(trial.name))
        point = point or values
        tags = study_tags(trial.study, self.commit) | {
            "seed": values[SEED_KEY],
            "sslab.checkpoint": str(trial_dir / CHECKPOINT_NAME),
            # Reports group trials by these, not by parsing names back.
            POINT_TAG: point_label(point),
            POINT_VALUES_TAG: json.dumps(point_values(point), default=str),
        }
        tracking = TrialTracking(
            self.uri,
            self.experiment_id,
            self.parent_run_id,
            trial.name,
            tags=tags,
            params=trial_params(trial.study),
        )
        return trial_config(trial.study, trial_dir, tracking)

    def from_tune(self, tune_config: dict, fixed: dict[str, dict], tune_name: str | None = None) -> dict:
        """Tune's config -> the train-loop config. Grid and random search: {"trial": name}, plus
        under PBT the mutated keys' current values (the trial keeps its name and MLflow run, and
        logs those values per epoch as hp/<key>). Optuna: the sampled keys and the repeat index."""
        if "trial" in tune_config:
            # Under PBT a trial that copies another also copies its config, "trial" included:
            # its own name is the Tune trial's, fixed when it was created (trial_name_creator).
            name = tune_name if tune_name in fixed else tune_config["trial"]
            mutated = {k: v for k, v in tune_config.items() if k != "trial"}
            config = self.config(fixed[name] | mutated, name=name, point=fixed[name])
            config["logged_keys"] = sorted(mutated)
            return config
        values = {k: significant(v) for k, v in tune_config.items() if k != REPEAT_INDEX}
        return self.config(values | {SEED_KEY: self.seeds[tune_config.get(REPEAT_INDEX, 0)]})


def trial_params(study: StudyConfig) -> dict:
    """A trial's MLflow params: its resolved config flattened. The paper section stays with the
    parent run (its point names, e.g. "temperature=0.1", are not valid MLflow param keys)."""
    return flatten({k: v for k, v in study.to_dict().items() if k != "paper"})


def study_tags(study: StudyConfig, commit: str) -> dict:
    return {
        "method": study.method,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,  # the MLflow UI's commit column
        "dataset": study.data.name,
        "config_hash": study.config_hash(),
    }


def study_note(study: StudyConfig) -> str:
    """The parent run's description in the MLflow UI: the study's question, the paper's claim."""
    parts = [study.description or f"{study.method} study {study.name}"]
    if study.paper.reference or study.paper.claim:
        parts.append(f"**Paper** ({study.paper.reference}): {study.paper.claim}")
    return "\n\n".join(parts)


def _parent_run(
    tracker: Tracker,
    experiment_id: str,
    study: StudyConfig,
    source_text: str,
    paths: StudyPaths,
    resume: bool,
) -> str:
    if resume:
        parent_run_id = paths.latest_invocation(study.name)
        tracker.client.update_run(parent_run_id, status="RUNNING")
        return parent_run_id
    tags = study_tags(study, git_commit()) | {"sslab.role": "study", "mlflow.note.content": study_note(study)}
    parent_run_id = tracker.start_parent(
        experiment_id, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags
    )
    tracker.log_text(parent_run_id, source_text, "study.yaml")
    tracker.log_dict(parent_run_id, study.to_dict(), "resolved_config.json")
    invocation = paths.invocation_dir(study.name, parent_run_id)
    invocation.mkdir(parents=True, exist_ok=True)
    atomic_write_json(invocation / RESOLVED_FILE, study.to_dict())
    atomic_write_json(paths.latest_file(study.name), {"parent_run_id": parent_run_id})
    return parent_run_id


def _close_dangling_runs(
    tracker: Tracker, experiment_id: str, parent_run_id: str, results: dict[str, str]
) -> None:
    """Tune knows how each trial ended; its MLflow run may not. A run that did not finish while
    Tune reports no error was stopped early by the scheduler (the training function sees that
    only as an exception in `report`): KILLED. A run a crashed worker left RUNNING: FAILED."""
    for run in tracker.child_runs(experiment_id, parent_run_id):
        errored = results.get(run.data.tags.get(TRIAL_TAG)) == "ERROR"
        if run.info.status != "FINISHED" and not errored:
            tracker.set_tag(run.info.run_id, "sslab.stopped_early", "true")
            tracker.end(run.info.run_id, "KILLED")
        elif run.info.status == "RUNNING":
            tracker.end(run.info.run_id, "FAILED")


def _record_best(tracker: Tracker, parent_run_id: str, rows: list[dict], study: StudyConfig) -> None:
    """The parent run names the best trial by the scheduler's metric (default: final kNN top-1)."""
    metric, sign = study.scheduler.metric, (1 if study.scheduler.mode == "max" else -1)
    scored = [r for r in rows if r.get(metric) is not None and r["status"] == "FINISHED"]
    if scored:
        best = max(scored, key=lambda r: sign * r[metric])
        tracker.set_tag(parent_run_id, "best_trial", best["trial"])
        tracker.set_tag(parent_run_id, "best_run_id", best["run_id"])
        tracker.log_metrics(parent_run_id, {f"best_{metric}": best[metric]}, step=0)


def _summarise(tracker: Tracker, experiment_id: str, parent_run_id: str) -> list[dict]:
    """One row per trial from its child run; a CSV of it goes to the parent run."""
    import pandas as pd

    rows = []
    for run in tracker.child_runs(experiment_id, parent_run_id):
        row = {
            "trial": run.data.tags.get("sslab.trial"),
            "status": run.info.status,
            "run_id": run.info.run_id,
        }
        row.update({k: v for k, v in run.data.metrics.items()})
        rows.append(row)
    if rows:
        tracker.log_text(parent_run_id, pd.DataFrame(rows).to_csv(index=False), "trials.csv")
    return rows


# ----------------------------------------------------------------------------- Ray


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


def _make_trainable(
    factory: TrialFactory, fixed: dict, invocation: Path, study: StudyConfig, cpus_per_worker: float
):
    train = study.train
    workers, max_failures = train.num_workers, train.max_failures
    gpus_per_worker = train.gpus_per_worker if train.use_gpu else 0
    tune_checkpoints = study.scheduler.name == "pbt"  # PBT moves checkpoints between trials

    def trainable(tune_config: dict) -> None:
        import ray.tune

        config = factory.from_tune(tune_config, fixed, ray.tune.get_context().get_trial_name())
        config["study"]["train"]["cpus_per_worker"] = cpus_per_worker  # also for one worker
        if workers == 1:
            config.update(runtime="tune", tune_checkpoints=tune_checkpoints)
            train_loop(config)
            return
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        config["runtime"] = "train"
        name = config["tracking"]["trial_name"]
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker}
                | ({"GPU": gpus_per_worker} if gpus_per_worker else {}),
            ),
            # A stable name: a restarted trial finds the same run again.
            run_config=ray.train.RunConfig(
                name=f"train-{name}",
                storage_path=str(invocation / "ray"),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()

    return trainable


def _search(study: StudyConfig, fixed: dict[str, dict]):
    """(param_space, search_alg, num_samples) for Tune."""
    from ray import tune

    if study.search.name == "optuna":
        from ray.tune.search import Repeater
        from ray.tune.search.optuna import OptunaSearch

        space = {k: _tune_domain(spec) for k, spec in study.sweep.items()}
        optuna = OptunaSearch(
            metric=study.scheduler.metric, mode=study.scheduler.mode, seed=study.search.seed
        )
        # Each proposed point runs once per seed; Optuna learns from the mean over the seeds.
        searcher = Repeater(optuna, repeat=len(study.seeds), set_index=True)
        return space, searcher, study.search.num_samples * len(study.seeds)
    space = {"trial": tune.grid_search(list(fixed))}
    base = study.to_dict()
    for key in study.scheduler.mutations if study.scheduler.name == "pbt" else ():
        initial = {name: values.get(key, get_dotted(base, key)) for name, values in fixed.items()}
        space[key] = tune.sample_from(lambda spec, initial=initial: initial[spec.config["trial"]])
    return space, None, 1


def _tune_domain(spec):
    from ray import tune

    distribution = as_distribution(spec)
    if distribution is None:
        return tune.choice(spec)
    kind, args = distribution
    return {
        "choice": lambda: tune.choice(args),
        "uniform": lambda: tune.uniform(*args),
        "loguniform": lambda: tune.loguniform(*args),
    }[kind]()


def _tune_checkpoints_kept(study: StudyConfig) -> int | None:
    """PBT keeps every Tune checkpoint: a trial that copies another restores the donor's checkpoint
    from the perturbation point, and the donor may have saved more than two since (measured: the
    donor finished its last two epochs first and the copy found its checkpoint deleted)."""
    return None if study.scheduler.name == "pbt" else 2


def _scheduler(study: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = study.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    # time_attr "epoch": Tune's own training_iteration restarts after a restore.
    if s.name == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        # synch: the whole population reaches each perturbation point before anyone copies, so
        # an exploited trial resumes at the epoch it had reached (its MLflow curve stays whole).
        return PopulationBasedTraining(
            time_attr="pbt_epoch",
            metric=s.metric,
            mode=s.mode,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={k: list(v) for k, v in s.mutations.items()},
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            synch=True,
        )
    return ASHAScheduler(
        time_attr="epoch",
        metric=s.metric,
        mode=s.mode,
        max_t=study.train.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


# A finished trial's worker runs the next one: no new process, imports or data (measured by
# benchmarks/ray_overhead.py, which turns it off for its "before").
REUSE_TRIAL_WORKERS = True


def _run_tune(
    study: StudyConfig,
    factory: TrialFactory,
    fixed: dict,
    invocation: Path,
    ray_address: str | None,
    resume: bool,
) -> dict[str, str]:
    """Runs (or resumes) the Tune experiment; returns {trial name: final Tune status}."""
    import ray
    from ray import tune

    init_ray(ray_address)
    resources, cpus_per_worker = trial_resources(study, ray.cluster_resources().get("CPU", 1))
    trainable = tune.with_resources(
        _make_trainable(factory, fixed, invocation, study, cpus_per_worker), resources
    )
    storage = invocation / "ray"
    if resume and tune.Tuner.can_restore(str(storage / "tune")):
        tuner = tune.Tuner.restore(
            str(storage / "tune"),
            trainable,
            resume_errored=True,
            restart_errored=False,
            resume_unfinished=True,
        )
    else:
        space, search_alg, num_samples = _search(study, fixed)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=study.max_concurrent_trials,
                reuse_actors=REUSE_TRIAL_WORKERS,
                scheduler=_scheduler(study),
                search_alg=search_alg,
                num_samples=num_samples,
                trial_name_creator=_tune_trial_name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=_tune_checkpoints_kept(study)),
                verbose=1,
                callbacks=[study_progress(study, num_samples * (len(fixed) or 1))],
            ),
        )
    return trial_statuses(tuner.fit(), factory, fixed)


def trial_statuses(grid, factory: TrialFactory, fixed: dict) -> dict[str, str]:
    """Trial name -> "TERMINATED" or "ERROR" for each trial Tune ran. A study interrupted
    (Ctrl-C) leaves trials that never started: no config, no status (the parent run then ends
    FAILED, and `sslab run --resume` runs them)."""
    statuses = {}
    for result in grid:
        if result.config is None and not result.metrics:
            continue  # never started
        # the name the trial itself reported (PBT may have replaced its config by another's)
        name = (result.metrics or {}).get("sslab_trial") or factory.from_tune(result.config, fixed)[
            "tracking"
        ]["trial_name"]
        statuses[name] = "ERROR" if result.error else "TERMINATED"
    return statuses


def study_progress(study: StudyConfig, total: int):
    """A Tune callback that prints a line when a trial starts, finishes, is stopped early or fails,
    with the study's counts and the time left at the pace of the trials finished so far."""
    from ray.tune import Callback

    class StudyProgress(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}  # running trials -> start time
            self.durations: list[float] = []  # of the trials ended so far

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()
            self._say(trial, "started")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "finished" if _ran_to_the_end(trial, study) else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "FAILED")

        def _ended(self, trial, what):
            self.durations.append(time.time() - self.started.pop(trial.trial_id, time.time()))
            self._say(trial, f"{what} after {clock(self.durations[-1])}")

        def _say(self, trial, what):
            done, running = len(self.durations), len(self.started)
            pending = max(0, total - done - running)
            eta = ""
            if self.durations:  # at the pace of the trials ended so far
                left = (pending + running / 2) * statistics.mean(self.durations) / study.max_concurrent_trials
                eta = f"; about {clock(left)} left"
            name = trial.config.get("trial") or trial.trial_id
            print(
                f"study {study.name}: trial {name} {what} ({done} done, {running} running, "
                f"{pending} pending of {total}{eta})",
                flush=True,
            )

    return StudyProgress()


def _ran_to_the_end(trial, study: StudyConfig) -> bool:
    return (trial.last_result or {}).get("epoch", 0) >= study.train.epochs


def _tune_trial_name(trial) -> str:
    """Tune's name of a trial: ours for grid and random search (Optuna's trials keep Tune's)."""
    return trial.config.get("trial") or f"{trial.trainable_name}_{trial.trial_id}"
