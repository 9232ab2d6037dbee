"""Paper claims against our runs: the orderings a claim implies and the verdict on them."""

import math

import pytest

from sslab.platform.verdict import Comparison, expectations, holm, judge_all, pooled_std, verdict

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
    effects = {(c.better, c.worse): c.paper_effect for c in expectations(PAPER)}
    assert effects[("t=0.1", "t=0.05")] == pytest.approx(4.7) and effects[("t=0.1", "t=2.0")] == 1.0


def test_holm_adjusts_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_interval_uses_the_t_distribution_with_the_pooled_degrees_of_freedom():
    # 0.60 vs 0.55, 3 seeds each, std 0.01: se = 1 * sqrt(2/3) pts, dof 4, t(0.975, 4) = 2.7764
    stats = {"a": (0.60, 0.01, 3), "b": (0.55, 0.01, 3)}
    (c,) = judge_all([Comparison("a", "b", "claim", paper_effect=1.0)], stats)
    margin = 2.7764451 * math.sqrt(2 / 3)
    assert c.ours == pytest.approx(5.0) and (c.low, c.high) == pytest.approx((5 - margin, 5 + margin))
    assert c.outcome == "agrees"


def test_two_seeds_do_not_make_three_standard_errors_significant():
    # The old rule (beyond 2 standard errors) called this "agrees"; with 2 degrees of freedom
    # and Holm over the two one-sided tests it is not.
    stats = {"a": (0.53, 0.01, 2), "b": (0.50, 0.01, 2)}  # d = 3 pts, se = 1 pt, dof = 2
    (c,) = judge_all([Comparison("a", "b", "claim", paper_effect=3.0)], stats)
    assert c.outcome == "inconclusive" and c.low < 0 < c.high


def test_an_interval_below_the_papers_effect_is_not_reproduced():
    stats = {"a": (0.500, 0.004, 3), "b": (0.499, 0.004, 3), "c": (0.2, math.nan, 1)}
    (c,) = judge_all([Comparison("a", "b", "paper: 64.4 vs 59.7", paper_effect=4.7)], stats)
    assert c.outcome == "not reproduced" and c.high < 4.7
    lone = judge_all([Comparison("a", "c", "claim", paper_effect=1.0)], {"a": stats["a"], "c": stats["c"]})
    assert lone[0].outcome == "agrees"  # c's single seed borrows a's spread (pooled)
    assert judge_all([Comparison("a", "zzz", "claim")], stats)[0].outcome == "not run"
    assert (
        judge_all([Comparison("a", "c", "claim")], {"a": (0.5, math.nan, 1), "c": (0.2, math.nan, 1)})[
            0
        ].outcome
        == "no spread"
    )


def test_false_agreements_stay_under_alpha_when_nothing_differs():
    # 2,000 simulated studies: 4 points x 3 seeds with no true effect, 3 orderings each. The
    # family-wise rate of any false "agrees" must stay under 5% (Holm); the old 2-SE rule's did not.
    import numpy as np

    rng = np.random.default_rng(0)
    orderings = [("p0", "p1"), ("p0", "p2"), ("p1", "p3")]
    false_alarms = 0
    for _ in range(2000):
        draws = rng.normal(0.5, 0.02, size=(4, 3))
        stats = {f"p{i}": (d.mean(), d.std(ddof=1), 3) for i, d in enumerate(draws)}
        comparisons = [Comparison(a, b, "claim", paper_effect=2.0) for a, b in orderings]
        false_alarms += any(c.outcome == "agrees" for c in judge_all(comparisons, stats))
    assert false_alarms / 2000 < 0.05


def test_the_seed_spread_is_pooled_over_points():
    # one point's two seeds agreeing by chance must not make every difference look significant
    stats = {"a": (0.60, 0.0, 2), "b": (0.59, 0.0, 2), "c": (0.50, 0.03, 2), "d": (0.52, 0.04, 3)}
    assert pooled_std(stats) == pytest.approx((math.sqrt((0.03**2 + 2 * 0.04**2) / 5), 5))
    assert judge_all([Comparison("a", "b", "claim")], stats)[0].outcome == "inconclusive"


def test_verdict_is_reproduced_only_when_every_ordering_agrees():
    def comparisons(*outcomes):
        return [Comparison("a", "b", "claim", outcome=o) for o in outcomes]

    assert verdict(comparisons("agrees", "agrees")).startswith("reproduced")
    assert verdict(comparisons("agrees", "not reproduced")).startswith("not reproduced")
    assert verdict(comparisons("agrees", "inconclusive")).startswith("inconclusive")
    assert verdict(comparisons("agrees", "not run")).startswith("reproduced (1 of 1")
    assert verdict(comparisons("not run")).startswith("no verdict")


def test_the_paper_section_stays_out_of_trial_params():
    import re

    from sslab.platform.sweep import expand_trials
    from sslab.platform.tune_run import trial_params
    from sslab.platform.validate import load_study

    study, raw = load_study("studies/simclr_temperature.yaml")
    params = trial_params(expand_trials(study, raw)[0].study)
    assert params["method_args.temperature"] == 0.05
    assert all(re.fullmatch(r"[\w\-. :/]+", key) for key in params), "MLflow rejects such keys"
    # nothing that says nothing of the trial (MLflow's runs table showed seeds=[0], sweep={}, None)
    assert not {"description", "seeds", "sweep.method_args.temperature"} & params.keys()
    assert None not in params.values()
    # the parent run's: the shared setup, and each swept key with the values it takes
    from sslab.platform.tune_run import study_params

    parent = study_params(study)
    assert parent["method_args.temperature"] == "swept: [0.05, 0.1, 0.5, 1.0]"
    assert parent["train.epochs"] == study.train.epochs


def test_sweep_plot_handles_grids_and_points_with_their_own_keys():
    import pandas as pd

    from sslab.platform.report_plots import plot_sweep
    from sslab.platform.report_runs import parse_point, point_name

    def with_points(frame):  # as load_study_runs gives them (here from the names, as for old runs)
        frame["point"] = frame["trial"].map(point_name)
        frame["point_values"] = frame["point"].map(parse_point)
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
    assert plot_sweep(grid, "eval/linear_top1", {}, {"method_args.projection": ["none", "mlp"]})
    points = pd.DataFrame(
        {"trial": ["method=simclr,seed=0", "method=byol,lr=0.3,tau_base=0.9,seed=0"], "knn_top1": [0.3, 0.25]}
    )
    points = with_points(points)
    assert plot_sweep(points, "knn_top1", {})  # one bar per point (methods_compare)
    assert plot_sweep(points, "eval/linear_top1", {}) is None
