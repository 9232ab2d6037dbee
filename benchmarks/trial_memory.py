"""Memory of a long sweep on one machine: a study of many short trials run one at a time in Ray
Tune's reused trial process, and that process's resident memory (RSS) at the start of each trial,
i.e. what the trials before it left behind. The same study runs twice in one Ray session: with a
finished trial's freed memory kept by the allocator (sslab before) and handed back to the OS
(`release_freed_memory`, now).

    python benchmarks/trial_memory.py --trials 30 --out benchmarks/results/trial-memory.json

Each trial is methods_compare's model (ResNet-18 x0.25, 32 px) training SimCLR for one epoch of
512 images, with its MLflow run and logged model as in a real study. `growth_per_trial_mb` is the
least-squares slope of the RSS at each trial's start, from the second trial on (the first starts
before any model or data was made).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sslab.platform import study as study_module
from sslab.platform import tune_run
from sslab.platform.ray_cluster import init_ray
from sslab.platform.tracking import Tracker
from sslab.platform.train import RSS, RSS_AT_START
from sslab.platform.validate import build_study


def study_of(trials: int) -> dict:
    return {
        "name": "trial_memory",
        "method": "simclr",
        "data": {"name": "synthetic", "train_size": 512, "test_size": 256},
        "backbone": {"name": "resnet18", "width": 0.25, "cifar_stem": True},
        "train": {"epochs": 1, "batch_size": 128},
        "eval": {"knn_every": 0},
        "seeds": list(range(trials)),
        "max_concurrent_trials": 1,
    }


def run(workdir: Path, trials: int, release: bool) -> dict:
    tune_run.RELEASE_FREED_MEMORY = release
    raw = study_of(trials)
    started = time.time()
    result = study_module.run_study(build_study(raw), raw, json.dumps(raw), workdir)
    tracker = Tracker(result["tracking_uri"])
    runs = tracker.child_runs(result["experiment_id"], result["parent_run_id"])
    runs = sorted(runs, key=lambda r: r.info.start_time)
    at_start = [r.data.metrics.get(RSS_AT_START) for r in runs]
    return {
        "release_freed_memory": release,
        "trials": len(runs),
        "finished": sum(r.info.status == "FINISHED" for r in runs),
        "wall_seconds": time.time() - started,
        "rss_at_start_mb": at_start,
        "rss_at_end_mb": [r.data.metrics.get(RSS) for r in runs],
        "growth_per_trial_mb": slope(at_start[1:]),
    }


def slope(values: list[float]) -> float:
    """Least-squares MB per trial."""
    xs = range(len(values))
    mean_x, mean_y = statistics.mean(xs), statistics.mean(values)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trials per study (>= 3)")
    parser.add_argument("--out", default="trial-memory.json")
    args = parser.parse_args()

    init_ray(None)  # one Ray session for both studies
    studies = []
    with tempfile.TemporaryDirectory() as folder:
        for release in (False, True):
            studies.append(run(Path(folder) / f"release-{release}", max(3, args.trials), release))
    for s in studies:
        start = s["rss_at_start_mb"]
        print(
            f"release_freed_memory={s['release_freed_memory']!s:<5}: {s['finished']}/{s['trials']} trials "
            f"in {s['wall_seconds']:.0f} s; RSS at trial 2's start {start[1]:.0f} MB, at the last one's "
            f"{start[-1]:.0f} MB: {s['growth_per_trial_mb']:+.1f} MB per trial"
        )
    Path(args.out).write_text(json.dumps({"studies": studies}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
