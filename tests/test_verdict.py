"""Paper claims against our runs: the orderings a claim implies and the verdict on them."""

import math

import pytest

from sslab.platform.verdict import Comparison, expectations, judge, pooled_std, verdict

PAPER = {
    "results": {"t=0.05": 59.7, "t=0.1": 64.4, "t=0.5": 60.7, "t=1.0": 58.0},
    "tie": 1.0,
    "expect": ["t=0.1 > t=2.0"],
}


def test_orderings_come_from_the_claim_and_from_the_papers_numbers_beyond_the_tie():
    pairs = [(c.better, c.worse) for c in expectations(PAPER)]
    assert pairs[0] == ("t=0.1", "t=2.0")  # explicit first
    assert ("t=0.1", "t=0.05") in pairs and ("t=0.5", "t=1.0") in pairs
    assert ("t=0.5", "t=0.05") in pairs  # 60.7 vs 59.7: exactly the tie, kept
    assert ("t=0.05", "t=1.0") in pairs  # 59.7 vs 58.0
    assert len(pairs) == 1 + 6  # all 6 pairs differ by >= 1 point
    assert len(expectations(PAPER | {"tie": 2.0})) == 1 + 4  # 0.5/0.05 and 0.05/1.0 are ties at 2


def test_judge_uses_twice_the_standard_error_of_the_difference():
    # means 0.60 vs 0.55 over 2 seeds, pooled std 0.01: se = 0.01 * sqrt(1/2 + 1/2) -> noise 2 pts
    stats = {"a": (0.60, 0.01, 2), "b": (0.55, 0.01, 2), "c": (0.59, 0.01, 2), "d": (0.5, math.nan, 1)}
    agrees = judge(Comparison("a", "b", "claim"), stats)
    assert agrees.outcome == "agrees" and math.isclose(agrees.ours, 5.0) and math.isclose(agrees.noise, 2.0)
    assert judge(Comparison("b", "a", "claim"), stats).outcome == "contradicts"
    assert judge(Comparison("a", "c", "claim"), stats).outcome == "within noise"
    assert judge(Comparison("a", "d", "claim"), stats).outcome == "no spread"
    assert judge(Comparison("a", "zzz", "claim"), stats).outcome == "not run"


def test_the_seed_spread_is_pooled_over_points():
    # one point's two seeds agreeing by chance must not make every difference look significant
    stats = {"a": (0.60, 0.0, 2), "b": (0.59, 0.0, 2), "c": (0.50, 0.03, 2), "d": (0.52, 0.04, 3)}
    assert pooled_std(stats) == pytest.approx(math.sqrt((0.03**2 + 2 * 0.04**2) / 5))
    assert judge(Comparison("a", "b", "claim"), stats).outcome == "within noise"


def test_verdict_is_reproduced_only_when_every_ordering_agrees():
    def comparisons(*outcomes):
        return [Comparison("a", "b", "claim", outcome=o) for o in outcomes]

    assert verdict(comparisons("agrees", "agrees")).startswith("reproduced")
    assert verdict(comparisons("agrees", "contradicts")).startswith("not reproduced")
    assert verdict(comparisons("agrees", "within noise")).startswith("inconclusive")
    assert verdict(comparisons("agrees", "not run")).startswith("reproduced (1 of 1")
    assert verdict(comparisons("not run")).startswith("no verdict")


def test_the_paper_section_stays_out_of_trial_params():
    import re

    from sslab.platform.config import load_study
    from sslab.platform.study import expand_trials, trial_params

    study, raw = load_study("studies/simclr_temperature.yaml")
    params = trial_params(expand_trials(study, raw)[0].study)
    assert params["method_args.temperature"] == 0.05
    assert all(re.fullmatch(r"[\w\-. :/]+", key) for key in params), "MLflow rejects such keys"


def test_sweep_plot_handles_grids_and_points_with_their_own_keys():
    import pandas as pd

    from sslab.platform.report import _parse_point, _plot_sweep, point_name

    def with_points(frame):  # as load_study_runs gives them (here from the names, as for old runs)
        frame["point"] = frame["trial"].map(point_name)
        frame["point_values"] = frame["point"].map(_parse_point)
        return frame

    grid = pd.DataFrame(
        {
            "trial": [
                "projection=mlp,eval_on=h,seed=0",
                "projection=none,eval_on=h,seed=0",
                "projection=mlp,eval_on=z,seed=0",
            ],
            "eval/linear_top1": [0.4, 0.3, 0.35],
            "random_init_linear_top1": [0.2, 0.2, 0.2],
        }
    )
    grid = with_points(grid)
    assert _plot_sweep(grid, "eval/linear_top1", {}, {"method_args.projection": ["none", "mlp"]})
    points = pd.DataFrame(
        {"trial": ["method=simclr,seed=0", "method=byol,lr=0.3,tau_base=0.9,seed=0"], "knn_top1": [0.3, 0.25]}
    )
    points = with_points(points)
    assert _plot_sweep(points, "knn_top1", {})  # one bar per point (methods_compare)
    assert _plot_sweep(points, "eval/linear_top1", {}) is None
