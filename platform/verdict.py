"""A paper's claim against our runs: the orderings it implies, each checked against seed spread.

An ordering "A > B" agrees when our mean of A beats B's by more than twice the standard error
of the difference, contradicts when it loses by that much, and is within noise otherwise. The
seed-to-seed std is pooled over all sweep points (two seeds alone give a poor estimate of one
point's spread; the points share their sources of noise). The verdict: reproduced when every
ordering agrees, not reproduced when any contradicts, inconclusive otherwise (or with a single
seed: no spread).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from sslab.platform.config import parse_expectation


@dataclass
class Comparison:
    better: str
    worse: str
    source: str  # where the ordering comes from: the claim or the paper's numbers
    ours: float = math.nan  # our difference, points
    noise: float = math.nan  # 2 x standard error of the difference, points
    outcome: str = "not run"  # agrees | contradicts | within noise | no spread | not run


def expectations(paper: dict) -> list[Comparison]:
    """The claim's explicit orderings, then every pair of the paper's numbers further apart than `tie`."""
    comparisons = [Comparison(*parse_expectation(text), source="claim") for text in paper.get("expect", [])]
    results = {str(k): float(v) for k, v in paper.get("results", {}).items()}
    for a, b in itertools.combinations(results, 2):
        if abs(results[a] - results[b]) >= paper.get("tie", 1.0):
            better, worse = (a, b) if results[a] > results[b] else (b, a)
            comparisons.append(Comparison(better, worse, f"paper: {results[better]:g} vs {results[worse]:g}"))
    seen, unique = set(), []
    for c in comparisons:
        if (c.better, c.worse) not in seen:
            seen.add((c.better, c.worse))
            unique.append(c)
    return unique


def pooled_std(stats: dict[str, tuple[float, float, int]]) -> float:
    """sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)) over the points with two seeds or more."""
    pairs = [(n - 1, std**2) for _, std, n in stats.values() if n >= 2 and not math.isnan(std)]
    dof = sum(d for d, _ in pairs)
    return math.sqrt(sum(d * v for d, v in pairs) / dof) if dof else math.nan


def judge(
    comparison: Comparison, stats: dict[str, tuple[float, float, int]], spread: float | None = None
) -> Comparison:
    """Fills in our difference and outcome; `stats` maps point -> (mean, std, seeds) in [0, 1];
    `spread`: the seed std to use (default: pooled over `stats`)."""
    if comparison.better not in stats or comparison.worse not in stats:
        return comparison
    (mean_a, _, n_a), (mean_b, _, n_b) = stats[comparison.better], stats[comparison.worse]
    if any(math.isnan(v) for v in (mean_a, mean_b)):
        return comparison
    comparison.ours = (mean_a - mean_b) * 100
    if n_a < 2 or n_b < 2:
        comparison.outcome = "no spread"
        return comparison
    spread = pooled_std(stats) if spread is None else spread
    comparison.noise = 2 * spread * math.sqrt(1 / n_a + 1 / n_b) * 100
    if comparison.ours > comparison.noise:
        comparison.outcome = "agrees"
    elif comparison.ours < -comparison.noise:
        comparison.outcome = "contradicts"
    else:
        comparison.outcome = "within noise"
    return comparison


def verdict(comparisons: list[Comparison]) -> str:
    """One plain line: reproduced / not reproduced / inconclusive at this scale, with the counts."""
    judged = [c for c in comparisons if c.outcome != "not run"]
    if not judged:
        return "no verdict: none of the points the paper names was run"
    counts = {
        o: sum(c.outcome == o for c in judged) for o in ("agrees", "contradicts", "within noise", "no spread")
    }
    detail = (
        f"{counts['agrees']} of {len(judged)} orderings agree, {counts['contradicts']} contradict, "
        f"{counts['within noise'] + counts['no spread']} within noise or without spread"
    )
    if counts["contradicts"]:
        return f"not reproduced at this scale ({detail})"
    if counts["agrees"] == len(judged):
        return f"reproduced ({detail})"
    return f"inconclusive at this scale ({detail})"
