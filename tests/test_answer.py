"""The study's answer in the terminal: each point over its seeds against random init, the best
point, and whether its lead is beyond the seeds' noise."""

import math

import pandas as pd
from scipy import stats as scipy_stats

from sslab.platform.answer import answer_table


def _trials(rows) -> pd.DataFrame:
    """rows: (point, seed, kNN top-1, random-init kNN top-1) of finished trials."""
    return pd.DataFrame(
        [
            {
                "trial": f"{p},seed={s}",
                "point": p,
                "status": "FINISHED",
                "knn_top1": k,
                "random_init_knn_top1": r,
            }
            for p, s, k, r in rows
        ]
    )


def test_the_best_points_lead_is_judged_with_the_pooled_t_interval():
    knn = {"t=0.1": [0.40, 0.42, 0.41], "t=0.5": [0.30, 0.33, 0.31], "t=1.0": [0.20, 0.22, 0.21]}
    rows = [(p, s, k, 0.2) for p, values in knn.items() for s, k in enumerate(values)]
    text = answer_table("temp", _trials(rows))
    lines = text.splitlines()
    assert lines[0] == "study temp: kNN top-1 by point, mean ± std over 3 seed(s)"
    assert [line.split()[0] for line in lines[2:5]] == ["t=0.1", "t=0.5", "t=1.0"]  # best first
    assert lines[2].split()[1:4] == ["41.0", "±", "1.0"] and "+21.0 [" in lines[2]
    # by hand: the lead 41.0 - 31.33 with the seeds' std pooled over the 3 points (6 dof)
    pooled = math.sqrt(sum(pd.Series(v).var() for v in knn.values()) / 3) * 100
    lead = (sum(knn["t=0.1"]) - sum(knn["t=0.5"])) / 3 * 100
    margin = scipy_stats.t.ppf(0.975, 6) * pooled * math.sqrt(2 / 3)
    interval = f"[{lead - margin:+.1f}, {lead + margin:+.1f}]"
    expected = (
        f"best: t=0.1, ahead of t=0.5 by {lead:+.1f} kNN top-1 points {interval}: beyond the seeds' noise"
    )
    assert lines[-1].strip() == expected


def test_a_lead_inside_the_noise_says_so_and_one_seed_gives_no_interval():
    close = [("a", 0, 0.40, 0.2), ("a", 1, 0.30, 0.2), ("b", 0, 0.36, 0.2), ("b", 1, 0.33, 0.2)]
    assert answer_table("close", _trials(close)).endswith(": within the seeds' noise")
    single = [("a", 0, 0.40, 0.2), ("b", 0, 0.30, 0.2)]
    assert "one seed per point, so no interval" in answer_table("single", _trials(single))


def test_unfinished_trials_are_left_out():
    rows = _trials([("a", 0, 0.40, 0.2), ("b", 0, 0.90, 0.2)])
    rows.loc[1, "status"] = "FAILED"
    assert answer_table("s", rows).splitlines()[-1] == "  one point: a"
    assert answer_table("s", rows.iloc[1:]) == "study s: no finished trial with a result to compare"


def test_ls_lists_each_study_and_its_invocations_newest_first(tmp_path, capsys, monkeypatch):
    from sslab.platform.cli import main

    # An earlier test's mlflow.set_tracking_uri leaves this set; it would win over --workdir.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from sslab.platform.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    experiment = tracker.experiment("temp", tmp_path / "artifacts")
    invocations = []
    for command in ("sslab run temp.yaml", "sslab run temp.yaml --set train.epochs=2"):
        parent = tracker.start_parent(experiment, "temp", {"sslab.role": "study", "sslab.command": command})
        for status in ("FINISHED", "FAILED"):
            child = tracker.client.create_run(experiment, tags={"mlflow.parentRunId": parent})
            tracker.client.set_terminated(child.info.run_id, status)
        invocations.append(parent)
    assert main(["ls", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"temp (experiment {experiment}): 2 invocation(s)"
    assert [line.split()[0] for line in lines[1:]] == invocations[::-1]  # newest first
    assert lines[1].endswith("1/2 trials finished  sslab run temp.yaml --set train.epochs=2")
    assert main(["ls", "--workdir", str(tmp_path / "none")]) == 2  # no store there: none created
    assert not (tmp_path / "none").exists()
