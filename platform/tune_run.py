"""A study's trials on Ray Tune. A trial with one worker runs the training loop inside the Tune
trial; with N > 1 workers the trial is a thin function that fits a TorchTrainer (DDP) and
forwards its reports to Tune. Every trial gets its `TrialSpec` from the `TrialFactory`."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from sslab.platform.checkpoint import CHECKPOINT_NAME
from sslab.platform.config import StudyConfig, as_distribution, flatten, get_dotted, swept_keys
from sslab.platform.data import DATASETS
from sslab.platform.ray_cluster import init_ray
from sslab.platform.runtime import release_freed_memory
from sslab.platform.spec import TrialSpec, trial_spec
from sslab.platform.sweep import (
    SEED_KEY,
    Trial,
    make_trial,
    point_label,
    point_values,
    significant,
    trial_name,
)
from sslab.platform.tracking import DATA_KIND_TAG, TrialTracking
from sslab.platform.train import clock, train_loop
from sslab.platform.tune_results import EPOCH, PBT_EPOCH, epochs_reached, reported_trial
from sslab.platform.workdir import (
    DiskFull,
    DiskReserve,
    disk_full_cause,
    inside,
    safe_dirname,
    says_disk_full,
)

POINT_TAG, POINT_VALUES_TAG = "sslab.point", "sslab.point_values"
VERBOSE_ENV = "SSLAB_VERBOSE"  # set by `sslab run --verbose`: Tune's own table and chatter too
REPEAT_INDEX = "__trial_index__"  # set by Tune's Repeater: which repeat (seed) of a point this is


# Not params of a run: the paper section stays with the parent run (its point names, e.g.
# "temperature=0.1", are not valid MLflow param keys); a trial's seed is train.seed and it has no
# sweep; the description is the parent's note. Unset (None) values are left out too.
NOT_PARAMS = ("paper", "description", "seeds", "sweep")


def trial_params(study: StudyConfig) -> dict:
    """A trial's MLflow params: its resolved config flattened, without what says nothing of it."""
    config = {k: v for k, v in study.to_dict().items() if k not in NOT_PARAMS}
    return {k: v for k, v in flatten(config).items() if v is not None}


def study_params(study: StudyConfig) -> dict:
    """The parent run's params: the setup every trial shares, and each swept key with the values
    it takes (so the runs table shows what a study varied)."""
    params = trial_params(study)
    for key in swept_keys(study.sweep):
        values = study.sweep.get(key) or [point[key] for point in study.sweep["points"] if key in point]
        params[key] = "swept: " + json.dumps(values, default=str)
    return params


def study_tags(study: StudyConfig, commit: str) -> dict:
    return {
        "method": study.method,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,  # the MLflow UI's commit column
        "dataset": study.data.name,
        DATA_KIND_TAG: DATASETS[study.data.name].kind,
        "config_hash": study.config_hash(),
        # The UI's "Created by" and "Source" columns (MLflow's own tags; empty otherwise).
        "mlflow.user": _user(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"sslab run {study.name}",
    }


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return "unknown"


@dataclass
class TrialFactory:
    """Turns what Tune hands a trial into its `TrialSpec`. Grid and random points were validated on
    the driver (`trials`); values Optuna proposes or PBT mutates are validated here, once, in the
    trial that receives them. Plain data: Ray ships it to the trials."""

    raw: dict
    seeds: list
    uri: str
    experiment_id: str
    parent_run_id: str
    invocation: str
    commit: str
    cpus_per_worker: float  # what each training worker was given (the loop sets its threads)
    trials: dict[str, Trial] = field(default_factory=dict)  # name -> validated trial (grid, random)
    pbt: bool = False

    def spec(self, trial: Trial, point: dict | None = None, logged_keys: tuple[str, ...] = ()) -> TrialSpec:
        """`point`: the values that name the trial's sweep point, if not `trial.values` (PBT: the
        initial ones, before mutation)."""
        study = trial.study
        workers = study.train.num_workers
        study = dataclasses.replace(
            study, train=dataclasses.replace(study.train, cpus_per_worker=self.cpus_per_worker)
        )
        trial_dir = inside(Path(self.invocation), "trials", safe_dirname(trial.name))
        point = point or trial.values
        tags = study_tags(study, self.commit) | {
            "seed": trial.values[SEED_KEY],
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
        return trial_spec(
            study,
            trial_dir,
            tracking,
            runtime="tune" if workers == 1 else "train",
            tune_checkpoints=self.pbt,
            logged_keys=logged_keys,
        )

    def from_tune(self, tune_config: dict, tune_name: str | None = None) -> TrialSpec:
        """Grid and random search: {"trial": name}, plus under PBT the mutated keys' current values
        (the trial keeps its name and MLflow run, and logs those values per epoch as hp/<key>).
        Optuna: the sampled keys and the repeat index."""
        if "trial" not in tune_config:
            return self.spec(make_trial(self.raw, self._optuna_values(tune_config)))
        # Under PBT a trial that copies another also copies its config, "trial" included: its own
        # name is the Tune trial's, fixed when it was created (trial_name_creator).
        name = tune_name if tune_name in self.trials else tune_config["trial"]
        mutated = {k: v for k, v in tune_config.items() if k != "trial"}
        if not mutated:
            return self.spec(self.trials[name])
        initial = self.trials[name].values
        trial = make_trial(self.raw, initial | mutated, name)
        return self.spec(trial, point=initial, logged_keys=tuple(sorted(mutated)))

    def name_of(self, tune_config: dict) -> str:
        return tune_config.get("trial") or trial_name(self._optuna_values(tune_config))

    def _optuna_values(self, tune_config: dict) -> dict:
        values = {k: significant(v) for k, v in tune_config.items() if k != REPEAT_INDEX}
        return values | {SEED_KEY: self.seeds[tune_config.get(REPEAT_INDEX, 0)]}


def train_worker(config: dict) -> None:
    """A Ray Train worker's loop (Train hands each worker a dict)."""
    try:
        train_loop(config["spec"])
    finally:
        release_freed_memory()


# A finished trial's freed memory goes back to the OS before the process runs the next one
# (benchmarks/trial_memory.py turns it off for its "before").
RELEASE_FREED_MEMORY = True


def make_trainable(factory: TrialFactory, invocation: Path, study: StudyConfig):
    train = study.train
    release = RELEASE_FREED_MEMORY  # read here, on the driver: the trials get its value
    workers, max_failures = train.num_workers, train.max_failures
    gpus_per_worker = train.gpus_per_worker if train.use_gpu else 0
    cpus_per_worker = factory.cpus_per_worker

    def trainable(tune_config: dict) -> None:
        import ray.tune

        spec = factory.from_tune(tune_config, ray.tune.get_context().get_trial_name())
        try:
            fit(spec)
        except Exception as err:
            cause = disk_full_cause(err)
            if cause is None:
                raise
            # One line for the driver, not the chain of SQLite, torch and MLflow tracebacks.
            said = " ".join(str(cause).split())[:200]
            raise DiskFull(f"no space left on device under {invocation} ({said})") from None
        finally:
            if release:  # the process runs the next trial
                release_freed_memory()

    def fit(spec: TrialSpec) -> None:
        if workers == 1:
            train_loop(spec)
            return
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"spec": spec},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker}
                | ({"GPU": gpus_per_worker} if gpus_per_worker else {}),
            ),
            # A stable name: a restarted trial finds the same run again.
            run_config=ray.train.RunConfig(
                name=f"train-{spec.name}",
                storage_path=str(invocation / "ray"),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()

    return trainable


def _search(study: StudyConfig, trials: dict[str, Trial]):
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
    space = {"trial": tune.grid_search(list(trials))}
    base = study.to_dict()
    for key in study.scheduler.mutations if study.scheduler.name == "pbt" else ():
        initial = {name: trial.values.get(key, get_dotted(base, key)) for name, trial in trials.items()}
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
    if s.name == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        # synch: the whole population reaches each perturbation point before anyone copies, so
        # an exploited trial resumes at the epoch it had reached (its MLflow curve stays whole).
        return PopulationBasedTraining(
            time_attr=PBT_EPOCH,
            metric=s.metric,
            mode=s.mode,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={k: list(v) for k, v in s.mutations.items()},
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            synch=True,
        )
    return ASHAScheduler(
        time_attr=EPOCH,
        metric=s.metric,
        mode=s.mode,
        max_t=study.train.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


# A finished trial's worker runs the next one: no new process, imports or data (measured by
# benchmarks/ray_overhead.py, which turns it off for its "before").
REUSE_TRIAL_WORKERS = True


def run_tune(
    study: StudyConfig,
    factory: TrialFactory,
    resources: dict,
    invocation: Path,
    ray_address: str | None,
    resume: bool,
    disk_full: DiskFullStop | None = None,
    trial_seconds: float | None = None,
) -> dict[str, str]:
    """Runs (or resumes) the Tune experiment; returns {trial name: final Tune status}.
    `resources`: what each Tune trial asks of the cluster; `disk_full`: called when a trial
    failed because the disk is full."""
    from ray import tune

    if not os.environ.get(VERBOSE_ENV):
        # Tune's newer console output prints its configuration box, results path and TensorBoard
        # hint even at verbose=0; its classic reporter at verbose=0 prints nothing.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    init_ray(ray_address)
    trainable = tune.with_resources(make_trainable(factory, invocation, study), resources)
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
        space, search_alg, num_samples = _search(study, factory.trials)
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
                verbose=1 if os.environ.get(VERBOSE_ENV) else 0,  # Tune's table: every 30 s
                callbacks=[
                    study_progress(study, num_samples * (len(factory.trials) or 1), disk_full, trial_seconds)
                ],
            ),
        )
    _UNFINISHED.clear()
    statuses = trial_statuses(tuner.fit(), factory)
    # Tune reports a trial stopped by Ctrl-C (or SIGTERM) without an error, as if it had ended.
    return statuses | {factory.name_of(config): INTERRUPTED for config in _UNFINISHED.values()}


INTERRUPTED = "INTERRUPTED"
_UNFINISHED: dict[str, dict] = {}  # trial id -> config: started, not ended (the progress callback's)


def trial_statuses(grid, factory: TrialFactory) -> dict[str, str]:
    """Trial name -> "TERMINATED" or "ERROR" for each trial Tune ran. A study interrupted
    (Ctrl-C) leaves trials that never started: no config, no status (the parent run then ends
    FAILED, and `sslab run --resume` runs them)."""
    statuses = {}
    for result in grid:
        if result.config is None and not result.metrics:
            continue  # never started
        # the name the trial itself reported (PBT may have replaced its config by another's)
        name = reported_trial(result.metrics) or factory.name_of(result.config)
        statuses[name] = "ERROR" if result.error else "TERMINATED"
    return statuses


class DiskFullStop:
    """Stops the study at the first trial that failed on a full disk, after freeing the workdir's
    reserve (the room to save Tune's state and mark the runs FAILED)."""

    def __init__(self, reserve: DiskReserve):
        self.reserve = reserve
        self.seen = False

    def __call__(self) -> None:
        if self.seen:
            return
        self.seen = True
        self.reserve.release()
        # Tune's own Ctrl-C path: it saves its state with the running trials unfinished, so
        # `--resume` reruns them (a Tune Stopper would end them as done).
        signal.raise_signal(signal.SIGINT)


def crash_cause(error: str) -> str:
    """What a trial whose process died probably hit, and the switch that avoids it: Ray says only
    that the actor died. Known: the machine's memory (Ray's memory monitor kills the process),
    and oneDNN on CPUs with narrow layers (a heap corruption in fp32 channels_last backward, a
    non-finite gradient in bf16: per the notes of 2026-12-02, on AMX CPUs)."""
    if "OutOfMemoryError" in error or "memory monitor" in error:
        return (
            ": the machine ran out of memory (Ray's memory monitor killed the trial); lower "
            "max_concurrent_trials or train.batch_size"
        )
    if "ActorDiedError" in error or "died unexpectedly" in error:
        return (
            ": its process died (a crash in native code, not a Python error); on CPUs oneDNN has "
            "crashed on narrow layers in channels_last or bf16: try --set train.channels_last=false "
            "or --set train.amp=false"
        )
    return ""


def _error_text(trial) -> str:
    """The failed trial's error as Tune wrote it in the driver's session folder."""
    try:
        return Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
    except OSError:
        return ""


def study_progress(
    study: StudyConfig, total: int, disk_full: DiskFullStop | None = None, trial_seconds: float | None = None
):
    """A Tune callback that prints a line when a trial starts, finishes, is stopped early or fails,
    with the study's counts and the time left at the pace of the trials finished so far (before
    any has: at `trial_seconds`, the estimate `sslab run` printed)."""
    from ray.tune import Callback

    class StudyProgress(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}  # running trials -> start time
            self.durations: dict[str, float] = {}  # trials ended in this invocation -> their time

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()
            _UNFINISHED[trial.trial_id] = dict(trial.config)
            self._say(trial, "started", trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "finished" if _ran_to_the_end(trial, study) else "stopped early", trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = _error_text(trial)
            self._ended(trial, "FAILED" + crash_cause(error), trials)
            if disk_full and says_disk_full(error):
                disk_full()

        def _ended(self, trial, what, trials):
            seconds = time.time() - self.started.pop(trial.trial_id, time.time())
            _UNFINISHED.pop(trial.trial_id, None)
            self.durations[trial.trial_id] = seconds
            self._say(trial, f"{what} after {clock(seconds)}", trials)

        def _say(self, trial, what, trials):
            # A resumed study's trials that ended before it was interrupted: Tune restores them
            # ended, and no callback sees them start or end.
            restored = (
                {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
                - self.durations.keys()
                - self.started.keys()
            )
            done, running = len(self.durations) + len(restored), len(self.started)
            pending = max(0, total - done - running)
            eta, pace = "", trial_seconds
            if self.durations:  # at the pace of the trials ended in this invocation
                pace = statistics.mean(self.durations.values())
            if pace:  # a running trial has what its elapsed time leaves of the pace
                now = time.time()
                running_left = sum(max(0.0, pace - (now - began)) for began in self.started.values())
                left = clock((pending * pace + running_left) / study.max_concurrent_trials)
                eta = f"; about {left} left" + ("" if self.durations else " (estimated)")
            name = trial.config.get("trial") or trial.trial_id
            print(
                f"study {study.name}: trial {name} {what} ({done} done, {running} running, "
                f"{pending} pending of {total}{eta})",
                flush=True,
            )

    return StudyProgress()


def _ran_to_the_end(trial, study: StudyConfig) -> bool:
    return epochs_reached(trial.last_result) >= study.train.epochs


def _tune_trial_name(trial) -> str:
    """Tune's name of a trial: ours for grid and random search (Optuna's trials keep Tune's)."""
    return trial.config.get("trial") or f"{trial.trainable_name}_{trial.trial_id}"
