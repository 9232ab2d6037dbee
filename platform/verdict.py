"""A paper's claim against our runs: the orderings it implies, each tested with honest statistics.

For an ordering "A > B" our difference of means d is given with its 95% confidence interval from
the t distribution: the seed-to-seed std is pooled over all sweep points (the points share their
sources of noise; two seeds alone give a poor estimate of one point's spread), with the pooled
degrees of freedom, sum(n_i - 1). Two one-sided tests per ordering, Holm-corrected over every
test of the family (the orderings judged at one training budget):
  agrees          d > 0: the paper's direction, beyond noise;
  not reproduced  d < the paper's effect (its difference where it gives both numbers, else the
                  `tie`, the smallest gap the claim implies): the data exclude the paper's effect;
  inconclusive    neither: the interval holds zero and the paper's effect alike.
The verdict: reproduced when every ordering agrees, not reproduced when any is not reproduced,
inconclusive otherwise (or without seeds to measure the spread).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from sslab.platform.config import parse_expectation

ALPHA = 0.05  # family-wise error rate of one family's tests (Holm)


@dataclass
class Comparison:
    better: str
    worse: str
    source: str  # where the ordering comes from: the claim or the paper's numbers
    paper_effect: float = math.nan  # points: what the paper's ordering amounts to
    ours: float = math.nan  # our difference, points
    low: float = math.nan  # its 95% confidence interval, points
    high: float = math.nan
    p_agrees: float = math.nan  # Holm-adjusted p-values of the two one-sided tests
    p_short: float = math.nan
    outcome: str = "not run"  # agrees | not reproduced | inconclusive | no spread | not run


def expectations(paper: dict) -> list[Comparison]:
    """The claim's explicit orderings, then every pair of the paper's numbers further apart than
    `tie`; each with the effect the paper implies (its difference, else the tie)."""
    results = {str(k): float(v) for k, v in paper.get("results", {}).items()}
    tie = float(paper.get("tie", 1.0))

    def effect(better: str, worse: str) -> float:
        if better in results and worse in results and results[better] > results[worse]:
            return results[better] - results[worse]
        return tie

    comparisons = [
        Comparison(*pair, source="claim", paper_effect=effect(*pair))
        for pair in (parse_expectation(text) for text in paper.get("expect", []))
    ]
    for a, b in itertools.combinations(results, 2):
        if abs(results[a] - results[b]) >= tie:
            better, worse = (a, b) if results[a] > results[b] else (b, a)
            source = f"paper: {results[better]:g} vs {results[worse]:g}"
            comparisons.append(Comparison(better, worse, source, paper_effect=effect(better, worse)))
    seen, unique = set(), []
    for c in comparisons:
        if (c.better, c.worse) not in seen:
            seen.add((c.better, c.worse))
            unique.append(c)
    return unique


def pooled_std(stats: dict[str, tuple[float, float, int]]) -> tuple[float, int]:
    """(sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)), sum (n_i - 1)) over points with two seeds or more."""
    pairs = [(n - 1, std**2) for _, std, n in stats.values() if n >= 2 and not math.isnan(std)]
    dof = sum(d for d, _ in pairs)
    return (math.sqrt(sum(d * v for d, v in pairs) / dof) if dof else math.nan), dof


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The t interval of the mean of `values` (at least two)."""
    from scipy import stats as scipy_stats

    n, mean = len(values), sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    margin = scipy_stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean - margin, mean + margin


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): the k-th smallest times (m - k + 1),
    made monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def point_difference(stats: dict[str, tuple[float, float, int]], a: str, b: str):
    """(mean(a) - mean(b) in points, its standard error, the pooled degrees of freedom); the
    error is None without a spread to measure (one seed per point). None if either mean is NaN."""
    (mean_a, _, n_a), (mean_b, _, n_b) = stats[a], stats[b]
    if math.isnan(mean_a) or math.isnan(mean_b):
        return None
    spread, dof = pooled_std(stats)
    if not dof or math.isnan(spread) or min(n_a, n_b) < 1:
        return (mean_a - mean_b) * 100, None, dof
    return (mean_a - mean_b) * 100, max(spread * math.sqrt(1 / n_a + 1 / n_b) * 100, 1e-12), dof


def difference_interval(stats: dict[str, tuple[float, float, int]], a: str, b: str, level: float = 0.95):
    """(difference in points, low, high): the t interval of mean(a) - mean(b) with the seed spread
    pooled over the points, as the verdict's; None without a spread."""
    from scipy import stats as scipy_stats

    difference = point_difference(stats, a, b)
    if difference is None or difference[1] is None:
        return None
    ours, se, dof = difference
    margin = scipy_stats.t.ppf(0.5 + level / 2, dof) * se
    return ours, ours - margin, ours + margin


def judge_all(comparisons: list[Comparison], stats: dict[str, tuple[float, float, int]]) -> list[Comparison]:
    """Fills in every comparison whose two points ran; `stats` maps point -> (mean, std, seeds)
    in [0, 1]. The comparisons given are one family for the Holm correction."""
    from scipy import stats as scipy_stats

    tested = []
    for c in comparisons:
        if c.better not in stats or c.worse not in stats:
            continue
        difference = point_difference(stats, c.better, c.worse)
        if difference is None:
            continue
        c.ours, se, dof = difference
        if se is None:
            c.outcome = "no spread"
            continue
        margin = scipy_stats.t.ppf(0.975, dof) * se
        c.low, c.high = c.ours - margin, c.ours + margin
        c.p_agrees = float(scipy_stats.t.sf(c.ours / se, dof))  # H0: d <= 0
        c.p_short = float(scipy_stats.t.cdf((c.ours - c.paper_effect) / se, dof))  # H0: d >= paper's
        tested.append(c)
    adjusted = holm([c.p_agrees for c in tested] + [c.p_short for c in tested])
    for i, c in enumerate(tested):
        c.p_agrees, c.p_short = adjusted[i], adjusted[len(tested) + i]
        if c.p_agrees < ALPHA:
            c.outcome = "agrees"
        elif c.p_short < ALPHA:
            c.outcome = "not reproduced"
        else:
            c.outcome = "inconclusive"
    return comparisons


def verdict(comparisons: list[Comparison]) -> str:
    """One plain line: reproduced / not reproduced / inconclusive at this scale, with the counts."""
    judged = [c for c in comparisons if c.outcome != "not run"]
    if not judged:
        return "no verdict: none of the points the paper names was run"
    counts = {
        o: sum(c.outcome == o for c in judged)
        for o in ("agrees", "not reproduced", "inconclusive", "no spread")
    }
    detail = (
        f"{counts['agrees']} of {len(judged)} orderings agree, {counts['not reproduced']} exclude the "
        f"paper's effect, {counts['inconclusive'] + counts['no spread']} inconclusive"
    )
    if counts["not reproduced"]:
        return f"not reproduced at this scale ({detail})"
    if counts["agrees"] == len(judged):
        return f"reproduced ({detail})"
    return f"inconclusive at this scale ({detail})"
