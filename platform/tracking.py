"""MLflow: one experiment per study, a parent run per invocation, a child run per trial.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the
same code works in the driver, in a Tune trial and in rank 0 of a Ray Train worker group.
mlflow is imported lazily: the training loop runs without it (e.g. on a bare GPU machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sslab.platform.config import ConfigError

TRIAL_TAG = "sslab.trial"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
DATA_KIND_TAG = "sslab.data_kind"  # the dataset registry's kind: "images" or "video"
COLLAPSE_TAG = "sslab.collapse"  # the method's collapse verdict on its last epoch
# Artifact downloads (configs, label subsets) are tiny: no progress bars in the CLI's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
PARAM_VALUE_LIMIT = 6000

# MLflow 3.18's UI opens every experiment in its GenAI view (traces, prompts) unless told the
# workflow in the link (or by the reader's toggle, kept in the browser), whatever the experiment's
# `mlflow.experimentKind` tag says; this query opens the training-runs view.
UI_MODEL_TRAINING = "?workflowType=machine_learning"


def default_tracking_uri(workdir: Path) -> str:
    """The workdir's sqlite store. A path with '?', '#' or '%' would be read as a URL's query,
    fragment or escape: the store would land elsewhere (measured: beside the workdir)."""
    path = Path(workdir).resolve() / "mlflow.db"
    special = sorted(set("?#%") & set(str(path)))
    if special:
        raise ConfigError(
            str(workdir),
            "--workdir",
            f"{' and '.join(repr(c) for c in special)} in its path would misplace the MLflow store's "
            "sqlite URI; use another folder (or --tracking-uri)",
        )
    return f"sqlite:///{path}"


def resolve_tracking_uri(given: str | None, workdir: Path) -> str:
    """The store a command uses: --tracking-uri, else $MLFLOW_TRACKING_URI, else the workdir's sqlite file."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI (None for any other store)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def is_remote(uri: str) -> bool:
    """A tracking server (or a hosted MLflow), not a store on this machine's disk."""
    return uri.startswith(("http://", "https://", "databricks"))


def text_tags(tags: dict) -> dict[str, str]:
    """Tag values as strings: a REST store refuses other types (a local sqlite one converts them)."""
    return {key: str(value) for key, value in tags.items()}


def require_store(uri: str, key: str, source: str | None = None) -> None:
    """Commands that read a store must not create an empty one where it is missing (MLflow would)."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise ConfigError(
            source or uri, key, f"no MLflow store at {path} (check --workdir or --tracking-uri)"
        )


def git_commit(path: Path | None = None) -> str:
    """The short commit the code ran at, "-dirty" when tracked files differ from it (a run from
    uncommitted changes must not pass for the commit), "unknown" outside a repository."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=path, timeout=5
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class TrialTracking:
    """What a trial needs to find its MLflow child run; plain data, so it travels to workers."""

    uri: str
    experiment_id: str
    parent_run_id: str
    trial_name: str
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


class Tracker:
    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # The model registry in the same store: without it MLflow takes its global default
        # (./mlflow.db in the current folder) whatever the tracking URI.
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # -- driver side -------------------------------------------------------------------------
    def experiment(self, name: str, artifact_root: Path) -> str:
        """Gets or creates the study's experiment, artifacts under an absolute path."""
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        # MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces,
        # prompts); this kind opens it on its runs.
        tags = {EXPERIMENT_KIND_TAG: "custom_model_development"}
        # A tracking server keeps the artifacts where it is told to (proxied, or its own store),
        # so another machine finds them; a folder of this machine would hold them here only.
        location = None if is_remote(self.uri) else Path(artifact_root).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location, tags=tags)

    def start_parent(self, experiment_id: str, run_name: str, tags: dict) -> str:
        run = self.client.create_run(experiment_id, run_name=run_name, tags=text_tags(tags))
        return run.info.run_id

    def child_runs(self, experiment_id: str, parent_run_id: str):
        """The parent's child runs as MLflow Run objects (all pages)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                f"tags.mlflow.parentRunId = '{parent_run_id}'",
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def latest_parent(self, experiment_id: str):
        runs = self.client.search_runs(
            [experiment_id],
            "tags.sslab.role = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    # -- trial side ----------------------------------------------------------------------------
    def find_or_create_child(self, t: TrialTracking) -> tuple[str, bool]:
        """The trial's child run: found again by its tag after a restart, never duplicated.
        Returns (run_id, created)."""
        for run in self.child_runs(t.experiment_id, t.parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == t.trial_name:
                self.client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, False
        tags = {"mlflow.parentRunId": t.parent_run_id, TRIAL_TAG: t.trial_name, **t.tags}
        run = self.client.create_run(t.experiment_id, run_name=t.trial_name, tags=text_tags(tags))
        self.log_params(run.info.run_id, t.params)
        return run.info.run_id, True

    def download(self, run_id: str, path: str, dst_path: str | None = None) -> Path:
        """A run's artifact as a local file or folder. MLflow reads `runs:/<id>/<path>` as a
        logged model too, through the model registry: named here, as the client does not pass
        its own on (MLflow then opened ./mlflow.db in the current folder)."""
        from mlflow.artifacts import download_artifacts

        return Path(
            download_artifacts(
                run_id=run_id,
                artifact_path=path,
                dst_path=dst_path,
                tracking_uri=self.uri,
                registry_uri=self.uri,
            )
        )

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=items)

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_image(self, run_id: str, image, artifact_file: str) -> None:
        """A uint8 [3, H, W] tensor as a PNG artifact."""
        self.client.log_image(run_id, image.permute(1, 2, 0).cpu().numpy(), artifact_file=artifact_file)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_encoder_model(
        self, run_id: str, module, example, register_as: str = "", description: str = ""
    ) -> str:
        """The encoder as an MLflow model in the run (`mlflow.pytorch.log_model`): a torch.export
        program (loads with torch alone, no pickled sslab classes), with its signature and an
        input example; registered under `register_as` when given. Returns the model URI."""
        import mlflow
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = module(example).numpy()
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
            # torch.export's archive writer warns about every shared weight group; the program loads.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            info = mlflow.pytorch.log_model(
                module,
                name="encoder",
                signature=infer_signature(example.numpy(), output),
                input_example=example.numpy(),
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                registered_model_name=register_as or None,
            )
        version = getattr(info, "registered_model_version", None)
        if register_as and version:  # the registry's page says what the model is and where from
            self.client.update_model_version(register_as, version, description=description)
            commit = self.client.get_run(run_id).data.tags.get("mlflow.source.git.commit", "unknown")
            self.client.set_model_version_tag(register_as, version, "git_commit", commit)
        return info.model_uri

    def system_metrics(self, run_id: str):
        """MLflow's monitor of CPU, memory, disk, network (and GPU where pynvml sees one),
        logged to the run as system/... every 10 s; None where psutil is missing."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return None
        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def log_dataset(self, run_id: str, description: dict) -> None:
        """The run's training data as an MLflow dataset input (the runs table's Dataset column):
        `description` from `dataset_input`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(**description)
        self.client.log_inputs(
            run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
        )

    def set_tag(self, run_id: str, key: str, value) -> None:
        self.client.set_tag(run_id, key, str(value))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def dataset_input(data_config, counts: dict) -> dict:
    """The fields of an MLflow dataset for a study's `data:` section: its name (with the subset
    kept), a digest of every key that decides which images it holds, where it comes from, and
    the counts it loaded to (`counts`: train / test images, classes, image size)."""
    cfg = dataclasses.asdict(data_config)
    which = {
        k: cfg[k]
        for k in (
            "name",
            "root",
            "subset",
            "test_subset",
            "pretrain",
            "pretrain_subset",
            "image_size",
            "train_size",
            "test_size",
            "seed",
            "clip_length",
        )
    }
    name = Path(cfg["root"]).name if cfg["root"] else cfg["name"]
    if cfg["subset"]:
        name += f"[{cfg['subset']}]"
    digest = hashlib.sha1(json.dumps(which, sort_keys=True, default=str).encode()).hexdigest()[:12]
    source = {"uri": str(cfg["root"])} if cfg["root"] else {"generator": cfg["name"], "seed": cfg["seed"]}
    return {
        "name": name,
        "digest": digest,
        "source_type": "local" if cfg["root"] else "code",
        "source": json.dumps(source),
        "profile": json.dumps(counts),
    }
