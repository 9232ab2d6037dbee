"""Ray's share of a study of 8 short trials: the same study run with a new worker process per
trial (Tune's default, sslab's before) and with workers reused from trial to trial (sslab's
default now), taking turns in one Ray session.

    python benchmarks/ray_overhead.py --rounds 2 --out benchmarks/results/ray-overhead.json

Each study reports its wall time, the time its trials spent inside the training loop (their
`trial_seconds`), and the difference: actor start, imports, data set-up, scheduling and
reporting. Ray's own start is measured once (every `sslab run` pays it once).
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
from sslab.platform.validate import build_study

# The quickstart's model and recipe, 8 seeds of a 2-epoch trial on 1,024 images.
STUDY = {
    "name": "ray_overhead",
    "method": "simclr",
    "data": {"name": "synthetic", "train_size": 1024, "test_size": 512},
    "backbone": {"name": "resnet18", "width": 0.25, "cifar_stem": True},
    "train": {"epochs": 2, "batch_size": 256, "lr": 0.5, "amp": True, "channels_last": True},
    "eval": {"protocols": ["knn"]},
    "seeds": list(range(8)),
}


def run_once(workdir: Path, reuse: bool) -> dict:
    tune_run.REUSE_TRIAL_WORKERS = reuse
    study = build_study(STUDY, source="ray_overhead")
    result = study_module.run_study(study, STUDY, json.dumps(STUDY), workdir)
    share = dict(result["share"])
    share["reuse_workers"] = reuse
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="turns of (new workers, reused workers)")
    parser.add_argument("--out", default="ray-overhead.json")
    args = parser.parse_args()

    started = time.time()
    init_ray(None)
    ray_start = time.time() - started
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for reuse in (False, True):
                share = run_once(Path(folder) / f"r{round_index}-{reuse}", reuse)
                runs.append(share)
                print(f"reuse_workers={reuse}: {share}", flush=True)

    def median(reuse: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["reuse_workers"] == reuse)

    summary = {
        "ray_start_seconds": ray_start,
        "trials": len(STUDY["seeds"]),
        "new_workers": {
            k: median(False, k) for k in ("wall_seconds", "trials_seconds", "ray_overhead_seconds")
        },
        "reused_workers": {
            k: median(True, k) for k in ("wall_seconds", "trials_seconds", "ray_overhead_seconds")
        },
        "runs": runs,
    }
    before, after = summary["new_workers"], summary["reused_workers"]
    print(f"Ray start: {ray_start:.1f} s (once per sslab run)")
    for name, row in (("new worker per trial", before), ("reused workers", after)):
        print(
            f"{name:<22} study {row['wall_seconds']:6.1f} s, in trials {row['trials_seconds']:6.1f} s, "
            f"Ray's share {row['ray_overhead_seconds']:5.1f} s "
            f"({row['ray_overhead_seconds'] / summary['trials']:.2f} s per trial)"
        )
    print(
        f"Ray's share cut by {before['ray_overhead_seconds'] - after['ray_overhead_seconds']:.1f} s per study"
    )
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
