"""Rank 0's MLflow child run of a trial: per-epoch metrics (each epoch once, across restarts),
samples, and at the end the encoder in the formats users load (export folder, checkpoint, MLflow
model, registered if asked)."""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import torch

from sslab.methods.base import Method
from sslab.platform.config import StudyConfig
from sslab.platform.dataset import Dataset
from sslab.platform.export import EXPORT_ARTIFACT, EncoderModule, write_export
from sslab.platform.runtime import Runtime
from sslab.platform.tracking import Tracker, TrialTracking, dataset_input


class TrialLogger:
    """Rank 0's MLflow child run; epochs already logged (before a restart) are not logged twice.
    `data` (the trial's Dataset) is logged as the run's training input."""

    def __init__(
        self,
        tracking: TrialTracking | None,
        runtime: Runtime,
        study: StudyConfig,
        data: Dataset | None = None,
    ):
        self.tracker = self.run_id = self.monitor = None
        self.logged: set[int] = set()
        if tracking is None or not runtime.is_main:
            return
        self.tracker = Tracker(tracking.uri)
        # After MLflow's import, which sets its loggers' level (a joined cluster's trial processes
        # do not inherit MLFLOW_LOGGING_LEVEL from `sslab run`).
        if not os.environ.get("SSLAB_VERBOSE"):
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.run_id, created = self.tracker.find_or_create_child(tracking)
        # What the trial computed with: concurrent trials must not oversubscribe the cores.
        self.tracker.set_tag(self.run_id, "sslab.torch_threads", torch.get_num_threads())
        self.monitor = self.tracker.system_metrics(self.run_id)
        if created:
            self.tracker.log_dict(self.run_id, study.to_dict(), "config.json")
            if data is not None:
                self.tracker.log_dataset(self.run_id, dataset_input(study.data, data_counts(data)))
        else:
            self.logged = self.tracker.logged_steps(self.run_id, "loss")

    def tag(self, key: str, value: str) -> None:
        if self.tracker and value:
            self.tracker.set_tag(self.run_id, key, value)

    def log(self, metrics: dict, epoch: int) -> None:
        if self.tracker and epoch not in self.logged:
            self.tracker.log_metrics(self.run_id, metrics, step=epoch)
            self.logged.add(epoch)

    def log_once(self, metrics: dict, epoch: int, key: str) -> None:
        if self.tracker and epoch not in self.tracker.logged_steps(self.run_id, key):
            self.tracker.log_metrics(self.run_id, metrics, step=epoch)

    def log_artifact_once(self, data: dict, path: str) -> None:
        if self.tracker and data:
            self.tracker.log_dict(self.run_id, data, path)

    def log_images(self, images: dict) -> None:
        for name, image in images.items():
            if self.tracker:
                self.tracker.log_image(self.run_id, image, f"samples/{name}.png")

    def log_outputs(self, method: Method, study: StudyConfig, data: Dataset, checkpoint: Path) -> None:
        """After training: the export (`export/`: weights in torchvision/timm layout, input
        statistics, loader), the checkpoint (`checkpoint/`: `sslab eval` and `sslab export`
        against a remote store) and the encoder as an MLflow model, registered if asked."""
        if not self.tracker:
            return
        folder = checkpoint.parent / "encoder"
        write_export(method, study, folder, run_id=self.run_id)
        self.tracker.log_artifacts(self.run_id, folder, EXPORT_ARTIFACT)
        self.tracker.client.log_artifact(self.run_id, str(checkpoint), "checkpoint")
        if not study.log_model:
            return
        # A CPU copy in fp32, eval mode: what a user loads (the trained method stays as it is).
        module = copy.deepcopy(EncoderModule(method.encoder())).cpu().float().eval()
        example = data.example_images(2).cpu().float() / 255  # RGB in [0, 1]
        try:
            description = f"{study.method} encoder of study {study.name}" + (
                f": {study.description}" if study.description else ""
            )
            uri = self.tracker.log_encoder_model(
                self.run_id, module, example, study.register_model, description
            )
        except Exception as err:  # the weights are safe in export/ and checkpoint/: warn, go on
            print(f"warning: MLflow model logging failed ({type(err).__name__}: {err})", file=sys.stderr)
            return
        self.tracker.set_tag(self.run_id, "sslab.model_uri", uri)

    def stop_monitor(self) -> None:
        if self.monitor:
            self.monitor.finish()
            self.monitor = None

    def end(self, status: str) -> None:
        if self.tracker:
            self.stop_monitor()
            self.tracker.end(self.run_id, status)


def data_counts(data: Dataset) -> dict:
    counts = {"train": len(data.train_images), "test": len(data.test_images), "image_size": data.image_size}
    if data.pretrain_images is not None and not data.pretrain_labelled:
        counts["pretrain"] = len(data.pretrain_images)
    return counts | ({"classes": len(data.classes)} if data.kind == "images" else {"kind": "video clips"})
