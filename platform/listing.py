"""What a store holds, for `sslab ls`: each study (an MLflow experiment) and every invocation of
it (a parent run), newest first, with its status, how many of its trials finished, and the
command that ran it."""

from __future__ import annotations

import time

from sslab.platform.tracking import Tracker


def store_listing(tracking_uri: str) -> str:
    tracker = Tracker(tracking_uri)
    lines = []
    for experiment in sorted(tracker.client.search_experiments(), key=lambda e: e.name):
        parents = tracker.client.search_runs(
            [experiment.experiment_id],
            "tags.sslab.role = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        if not parents:
            continue  # MLflow's Default experiment, or one no sslab study wrote
        lines.append(
            f"{experiment.name} (experiment {experiment.experiment_id}): {len(parents)} invocation(s)"
        )
        for parent in parents:
            trials = tracker.child_runs(experiment.experiment_id, parent.info.run_id)
            finished = sum(trial.info.status == "FINISHED" for trial in trials)
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(parent.info.start_time / 1000))
            command = parent.data.tags.get("sslab.command", "")
            lines.append(
                f"  {parent.info.run_id}  {started}  {parent.info.status:<8}  "
                f"{finished}/{len(trials)} trials finished  {command}".rstrip()
            )
    return "\n".join(lines) if lines else f"no sslab study in {tracking_uri}"
