"""A study's driver: checks everything that can be refused before anything is written, opens
the MLflow experiment and the invocation's parent run, runs the trials on Ray Tune (tune_run.py)
and records how they ended. One MLflow child run per trial."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sslab.platform.config import ConfigError, StudyConfig, flatten
from sslab.platform.data import load_dataset, pretrains_on_files
from sslab.platform.dataset import DataError
from sslab.platform.ray_cluster import check_fits_local_cluster, end_local_cluster, init_ray, trial_resources
from sslab.platform.sweep import Trial, expand_trials
from sslab.platform.tracking import TRIAL_TAG, Tracker, git_commit, require_store, resolve_tracking_uri
from sslab.platform.tune_run import (
    INTERRUPTED,
    POINT_TAG,
    DiskFullStop,
    TrialFactory,
    run_tune,
    study_params,
    study_tags,
)
from sslab.platform.verdict import mean_interval
from sslab.platform.workdir import (
    DiskFull,
    DiskReserve,
    atomic_write_json,
    check_writable,
    inside,
    is_disk_full,
    locked,
)


@dataclass
class StudyPaths:
    workdir: Path

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
    trial_seconds: float | None = None,
) -> dict:
    """Runs every trial of the study; returns {'parent_run_id', 'experiment_id', 'trials'}.
    `command`: the command line that ran it, kept as the parent run's `sslab.command` tag;
    `trial_seconds`: the estimated time of a trial, for the time left until one has ended.

    Everything that can be refused is checked before anything is written: every trial, image
    files (decoded once, into the cache the trials read), a resumed run's settings, whether a
    trial fits the local cluster, and whether the workdir is writable."""
    # Optuna's trials are proposed as it runs; its ranges were validated at both ends on load.
    trials = [] if study.search.name == "optuna" else expand_trials(study, raw)
    paths = StudyPaths(Path(workdir).resolve())
    uri = resolve_tracking_uri(tracking_uri, paths.workdir)
    if resume:
        _check_resumable(paths, study, uri, source)
    decode_image_folders([t.study for t in trials] or [study], source)
    local = not (ray_address or os.environ.get("RAY_ADDRESS"))
    for trial_study in [t.study for t in trials] or [study]:  # a sweep may change the resources
        if local:
            check_fits_local_cluster(trial_study, source)
    check_writable(paths.workdir)
    busy = f"study {study.name!r} is already running in this workdir; wait for it, or use another --workdir"
    # The lock before Ray: a second run of the study is refused at once, not after Ray's start.
    with locked(paths.study_dir(study.name) / ".lock", wait=False, busy_message=busy):
        disk_full = DiskFullStop(DiskReserve(paths.workdir))
        import ray

        ours, result = local and not ray.is_initialized(), {}
        try:
            ray_started = time.time()
            init_ray(ray_address)
            ray_start_seconds = time.time() - ray_started
            stop_on_sigterm()
            result = _run_locked(
                study,
                raw,
                trials,
                source_text,
                paths,
                uri,
                ray_address,
                resume,
                command,
                disk_full,
                ray_start_seconds,
                trial_seconds,
            )
            return result
        finally:
            disk_full.reserve.release()
            if ours:  # the cluster it started: stopped, its logs kept only if the study did not finish
                kept = end_local_cluster(keep_logs=result.get("status") != "FINISHED")
                if kept:
                    print(f"Ray's logs of this study: {kept / 'logs'}", flush=True)


def stop_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler's pre-emption, `docker stop`) stops the study as Ctrl-C does:
    Tune saves its state with the running trials unfinished, their runs end FAILED and `--resume`
    finishes them. (Ray's own handler, set by `ray.init`, exits without saving.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))


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
    disk_full: DiskFullStop,
    ray_start_seconds: float = 0.0,
    trial_seconds: float | None = None,
) -> dict:
    tracker, experiment_id = open_store(paths, uri, study.name)
    parent_run_id = _parent_run(tracker, experiment_id, study, source_text, paths, resume)
    if command and not resume:
        tracker.set_tag(parent_run_id, "sslab.command", command)
    invocation = paths.invocation_dir(study.name, parent_run_id)
    count = len(trials) or study.search.num_samples * len(study.seeds)
    print(f"study {study.name}: {count} trial(s); MLflow {uri} (parent run {parent_run_id})", flush=True)

    import ray

    resources, cpus_per_worker = trial_resources(study, ray.cluster_resources().get("CPU", 1))
    factory = TrialFactory(
        raw,
        list(study.seeds),
        uri,
        experiment_id,
        parent_run_id,
        str(invocation),
        git_commit(),
        cpus_per_worker,
        trials={trial.name: trial for trial in trials},
        pbt=study.scheduler.name == "pbt",
    )

    started = time.time()
    try:
        results = run_tune(
            study, factory, resources, invocation, ray_address, resume, disk_full, trial_seconds
        )
    except BaseException:
        if disk_full.seen:  # Tune itself may then fail to read back what it wrote
            _end_on_full_disk(tracker, experiment_id, parent_run_id, paths.workdir)
        tracker.end(parent_run_id, "FAILED")
        raise
    if disk_full.seen:
        _end_on_full_disk(tracker, experiment_id, parent_run_id, paths.workdir)
    _close_dangling_runs(tracker, experiment_id, parent_run_id, results)
    summary = _summarise(tracker, experiment_id, parent_run_id)
    record_best(tracker, parent_run_id, summary, study)
    ran_here = ended_since(summary, started)  # a resumed study's earlier trials cost nothing now
    share = ray_share(time.time() - started, ran_here, study.max_concurrent_trials, ray_start_seconds)
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


def ended_since(rows: list[dict], started: float) -> list[dict]:
    """The trials whose runs ended after `started` (seconds since the epoch): this invocation's."""
    return [r for r in rows if (r.get("ended_ms") or 0) >= started * 1000]


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
    seen = set()
    for trial_study in studies:
        data = trial_study.data
        key = json.dumps(dataclasses.asdict(data), sort_keys=True)
        if not pretrains_on_files(data) or key in seen:
            continue
        seen.add(key)
        try:
            load_dataset(data)
        except DataError as err:
            key = "data.pretrain" if data.pretrain and str(data.pretrain) in str(err) else "data.root"
            raise ConfigError(source, key, str(err)) from None


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
    tracker.log_params(parent_run_id, study_params(study))
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
    only as an exception in `report`): KILLED. A run a crashed worker left RUNNING, or a trial
    Ctrl-C or SIGTERM interrupted: FAILED (`--resume` continues it)."""
    for run in tracker.child_runs(experiment_id, parent_run_id):
        errored = results.get(run.data.tags.get(TRIAL_TAG)) in ("ERROR", INTERRUPTED)
        if run.info.status != "FINISHED" and not errored:
            tracker.set_tag(run.info.run_id, "sslab.stopped_early", "true")
            tracker.end(run.info.run_id, "KILLED")
        elif run.info.status == "RUNNING":
            tracker.end(run.info.run_id, "FAILED")


def _end_on_full_disk(tracker: Tracker, experiment_id: str, parent_run_id: str, workdir: Path) -> None:
    """The study stopped because the disk filled up: its unfinished runs end FAILED (the
    reserve freed the room for that), and the caller is told with a DiskFull."""
    left = ""
    try:
        for run in tracker.child_runs(experiment_id, parent_run_id):
            if run.info.status == "RUNNING":
                tracker.end(run.info.run_id, "FAILED")
        tracker.end(parent_run_id, "FAILED")
    except Exception as err:
        if not is_disk_full(err):
            raise
        left = "; its MLflow runs could not be marked FAILED"
    raise DiskFull(f"{workdir}: no space left on device, the study stopped{left}")


def record_best(tracker: Tracker, parent_run_id: str, rows: list[dict], study: StudyConfig) -> None:
    """The parent run names the best sweep point by the scheduler's metric (default: final kNN
    top-1) averaged over its seeds, not one lucky seed, with the 95% t interval of that mean
    (`best_point_interval`), and the best trial within that point."""
    metric, sign = study.scheduler.metric, (1 if study.scheduler.mode == "max" else -1)
    by_point: dict[str, list[dict]] = {}
    for row in rows:
        if row.get(metric) is not None and row["status"] == "FINISHED":
            by_point.setdefault(row.get("point") or row["trial"], []).append(row)
    if not by_point:
        return
    means = {point: statistics.mean(r[metric] for r in runs) for point, runs in by_point.items()}
    point = max(means, key=lambda p: sign * means[p])
    runs = by_point[point]
    best = max(runs, key=lambda r: sign * r[metric])
    tags = {"best_point": point, "best_point_seeds": str(len(runs))}
    if len(runs) > 1:
        low, high = mean_interval([r[metric] for r in runs])
        tags["best_point_interval"] = f"[{low:.4g}, {high:.4g}]"
    tags |= {"best_trial": best["trial"], "best_run_id": best["run_id"]}
    for key, value in tags.items():
        tracker.set_tag(parent_run_id, key, value)
    tracker.log_metrics(parent_run_id, {f"best_point_{metric}": means[point]}, step=0)


def _summarise(tracker: Tracker, experiment_id: str, parent_run_id: str) -> list[dict]:
    """One row per trial from its child run; a CSV of it goes to the parent run."""
    import pandas as pd

    rows = []
    for run in tracker.child_runs(experiment_id, parent_run_id):
        row = {
            "trial": run.data.tags.get("sslab.trial"),
            "point": run.data.tags.get(POINT_TAG),
            "ended_ms": run.info.end_time,
            "status": run.info.status,
            "run_id": run.info.run_id,
        }
        row.update({k: v for k, v in run.data.metrics.items()})
        rows.append(row)
    if rows:
        tracker.log_text(parent_run_id, pd.DataFrame(rows).to_csv(index=False), "trials.csv")
    return rows
