"""A study on Ray Tune: one trial per sweep point x seed, one MLflow child run per trial.

A trial with one worker runs the training loop inside the Tune trial; with N > 1 workers the
trial is a thin function that fits a TorchTrainer (DDP) and forwards its reports to Tune.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sslab.platform.config import ConfigError, StudyConfig, build_study, flatten, set_dotted
from sslab.platform.tracking import TRIAL_TAG, Tracker, TrialTracking, default_tracking_uri, git_commit
from sslab.platform.train import CHECKPOINT_NAME, train_loop, trial_config

SEED_KEY = "train.seed"
POINTS_KEY = "points"


@dataclass
class Trial:
    name: str
    values: dict          # swept dotted key -> value, including train.seed
    study: StudyConfig    # resolved


def sweep_points(sweep: dict) -> list[dict]:
    """The sweep as a list of {dotted key: value}: the grid of every `key: [values]` entry,
    crossed with the `points` entry (a list of override sets, e.g. per-method settings)."""
    grid_keys = [k for k in sweep if k != POINTS_KEY]
    points = sweep.get(POINTS_KEY) or [{}]
    return [dict(zip(grid_keys, values)) | point
            for point in points for values in itertools.product(*(sweep[k] for k in grid_keys))]


def expand_trials(study: StudyConfig, raw: dict) -> list[Trial]:
    """Every sweep point times every seed, each a fully validated study."""
    trials = []
    for point in sweep_points(study.sweep):
        for seed in study.seeds:
            values = point | {SEED_KEY: seed}
            trial_raw = copy.deepcopy(raw)
            trial_raw.pop("sweep", None)
            trial_raw["seeds"] = [seed]
            for key, value in values.items():
                set_dotted(trial_raw, key, value)
            trials.append(Trial(trial_name(values), values, build_study(trial_raw, "<trial>")))
    return trials


def point_names(sweep: dict) -> list[str]:
    """The sweep points as named in trials and reports ('temperature=0.1')."""
    return [trial_name(point | {SEED_KEY: 0}).rsplit(",seed=", 1)[0] for point in sweep_points(sweep)]


def trial_name(values: dict) -> str:
    """'temperature=0.2,seed=0': the last part of each swept key, the seed last."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items() if k != SEED_KEY]
    # a point that changes the method names it first, however its overrides are ordered
    parts.sort(key=lambda part: not part.startswith("method="))
    return ",".join(parts + [f"seed={values[SEED_KEY]}"])


# ----------------------------------------------------------------------------- the driver

@dataclass
class StudyPaths:
    workdir: Path

    @property
    def tracking_uri(self) -> str:
        return default_tracking_uri(self.workdir)

    def study_dir(self, study: str) -> Path:
        return self.workdir / "studies" / study

    def invocation_dir(self, study: str, parent_run_id: str) -> Path:
        return self.study_dir(study) / parent_run_id

    def latest_file(self, study: str) -> Path:
        return self.study_dir(study) / "latest.json"


def run_study(study: StudyConfig, raw: dict, source_text: str, workdir: Path,
              tracking_uri: str | None = None, ray_address: str | None = None,
              resume: bool = False, source: str = "<study>") -> dict:
    """Runs every trial of the study; returns {'parent_run_id', 'experiment_id', 'trials'}."""
    trials = expand_trials(study, raw)   # validates every trial before anything is written
    paths = StudyPaths(Path(workdir).resolve())
    if resume and not paths.latest_file(study.name).exists():
        raise ConfigError(source, "--resume", f"no earlier run of study {study.name!r} in {paths.workdir}")
    paths.study_dir(study.name).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or paths.tracking_uri
    tracker = Tracker(uri)   # creates the sqlite store here, before any trial starts
    experiment_id = tracker.experiment(study.name, paths.workdir / "mlartifacts")
    parent_run_id = _parent_run(tracker, experiment_id, study, source_text, paths, resume, source)
    invocation = paths.invocation_dir(study.name, parent_run_id)
    print(f"study {study.name}: {len(trials)} trial(s); MLflow {uri} (parent run {parent_run_id})", flush=True)

    commit = git_commit()
    configs = {}
    for trial in trials:
        trial_dir = invocation / "trials" / trial.name
        tags = study_tags(trial.study, commit) | {"seed": trial.values[SEED_KEY],
                                                  "sslab.checkpoint": str(trial_dir / CHECKPOINT_NAME)}
        tracking = TrialTracking(uri, experiment_id, parent_run_id, trial.name, tags=tags,
                                 params=trial_params(trial.study))
        configs[trial.name] = trial_config(trial.study, trial_dir, tracking)

    started = time.time()
    try:
        results = _run_tune(study, configs, invocation, ray_address, resume)
    except BaseException:
        tracker.end(parent_run_id, "FAILED")
        raise
    _close_dangling_runs(tracker, experiment_id, parent_run_id, results)
    summary = _summarise(tracker, experiment_id, parent_run_id)
    _record_best(tracker, parent_run_id, summary, study)
    tracker.log_metrics(parent_run_id, {"wall_seconds": time.time() - started}, step=0)
    status = "FINISHED" if all(r == "TERMINATED" for r in results.values()) else "FAILED"
    tracker.end(parent_run_id, status)
    print(f"study {study.name}: {status.lower()} in {time.time() - started:.0f} s", flush=True)
    return {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "tracking_uri": uri,
            "trials": summary, "status": status}


def trial_params(study: StudyConfig) -> dict:
    """A trial's MLflow params: its resolved config flattened. The paper section stays with the
    parent run (its point names, e.g. "temperature=0.1", are not valid MLflow param keys)."""
    return flatten({k: v for k, v in study.to_dict().items() if k != "paper"})


def study_tags(study: StudyConfig, commit: str) -> dict:
    return {"method": study.method, "git_commit": commit, "dataset": study.data.name,
            "config_hash": study.config_hash()}


def _parent_run(tracker: Tracker, experiment_id: str, study: StudyConfig, source_text: str,
                paths: StudyPaths, resume: bool, source: str) -> str:
    latest = paths.latest_file(study.name)
    if resume:
        parent_run_id = json.loads(latest.read_text())["parent_run_id"]
        tracker.client.update_run(parent_run_id, status="RUNNING")
        return parent_run_id
    tags = study_tags(study, git_commit()) | {"sslab.role": "study"}
    parent_run_id = tracker.start_parent(experiment_id, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    tracker.log_text(parent_run_id, source_text, "study.yaml")
    tracker.log_dict(parent_run_id, study.to_dict(), "resolved_config.json")
    latest.write_text(json.dumps({"parent_run_id": parent_run_id}))
    return parent_run_id


def _close_dangling_runs(tracker: Tracker, experiment_id: str, parent_run_id: str,
                         results: dict[str, str]) -> None:
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
        row = {"trial": run.data.tags.get("sslab.trial"), "status": run.info.status,
               "run_id": run.info.run_id}
        row.update({k: v for k, v in run.data.metrics.items()})
        rows.append(row)
    if rows:
        tracker.log_text(parent_run_id, pd.DataFrame(rows).to_csv(index=False), "trials.csv")
    return rows


# ----------------------------------------------------------------------------- Ray

def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a private, local, embedded cluster
    ray.init(include_dashboard=True, object_store_memory=300 * 1024**2,
             configure_logging=True, logging_level="WARNING", log_to_driver=True)


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


def _make_trainable(configs: dict, invocation: Path, workers: int, cpus_per_worker: float,
                    gpus_per_worker: float, max_failures: int):
    def trainable(tune_config: dict) -> None:
        config = dict(configs[tune_config["trial"]])
        if workers == 1:
            config["runtime"] = "tune"
            train_loop(config)
            return
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        config["runtime"] = "train"
        trainer = TorchTrainer(
            train_loop, train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})),
            # A stable name: a restarted trial finds the same run again.
            run_config=ray.train.RunConfig(name=f"train-{tune_config['trial']}",
                                           storage_path=str(invocation / "ray"),
                                           failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                           callbacks=[TuneReportCallback()]))
        trainer.fit()
    return trainable


def _scheduler(study: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = study.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    # time_attr "epoch": Tune's own training_iteration restarts after a restore.
    return ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=study.train.epochs,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _run_tune(study: StudyConfig, configs: dict, invocation: Path, ray_address: str | None,
              resume: bool) -> dict[str, str]:
    """Runs (or resumes) the Tune experiment; returns {trial name: final Tune status}."""
    import ray
    from ray import tune

    init_ray(ray_address)
    resources, cpus_per_worker = trial_resources(study, ray.cluster_resources().get("CPU", 1))
    for config in configs.values():   # what each worker gets, also for a single-worker trial
        config["study"]["train"]["cpus_per_worker"] = cpus_per_worker
    trainable = tune.with_resources(
        _make_trainable(configs, invocation, study.train.num_workers, cpus_per_worker,
                        study.train.gpus_per_worker if study.train.use_gpu else 0,
                        study.train.max_failures), resources)
    storage = invocation / "ray"
    if resume and tune.Tuner.can_restore(str(storage / "tune")):
        tuner = tune.Tuner.restore(str(storage / "tune"), trainable, resume_errored=True,
                                   restart_errored=False, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(configs))},
            tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent_trials,
                                        reuse_actors=False, scheduler=_scheduler(study)),
            run_config=tune.RunConfig(name="tune", storage_path=str(storage),
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=1))
    grid = tuner.fit()
    statuses = {}
    for result in grid:
        name = result.config["trial"]
        statuses[name] = "ERROR" if result.error else "TERMINATED"
    return statuses
