"""Reports group trials by the sweep point each child run carries (tags), not by parsing names."""

import json

from sslab.platform.report import build_report
from sslab.platform.tracking import Tracker


def test_points_that_share_a_short_key_stay_apart(tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("seedsweep", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "seedsweep-1", {"sslab.role": "study"})
    for data_seed, seed, knn in [(3, 0, 0.40), (3, 1, 0.42), (4, 0, 0.30), (4, 1, 0.32)]:
        point = f"data.seed={data_seed}"
        run = tracker.client.create_run(
            experiment,
            run_name=f"{point},seed={seed}",
            tags={
                "mlflow.parentRunId": parent,
                "sslab.trial": f"{point},seed={seed}",
                "sslab.point": point,
                "sslab.point_values": json.dumps({"data.seed": data_seed}),
            },
        ).info.run_id
        tracker.log_params(run, {"train.seed": seed, "data.seed": data_seed})
        tracker.log_metrics(run, {"knn_top1": knn, "random_init_knn_top1": 0.2, "loss": 1.0}, step=1)
        tracker.end(run)
    text = (build_report("seedsweep", tracking_uri, tmp_path / "report") / "report.md").read_text()
    assert "| data.seed=3 | 2 | 41.0 ± 1.4" in text and "| data.seed=4 | 2 | 31.0 ± 1.4" in text
    assert "default" not in text
