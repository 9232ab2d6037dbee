"""A study's answer in the terminal, from its MLflow runs: each sweep point's headline metric as
mean ± std over its seeds beside the same backbone at random init, the best point, and whether its
lead over the runner-up is beyond the seeds' noise. `sslab run` prints it at the end, `sslab
compare STUDY` at any time."""

from __future__ import annotations

import pandas as pd

from sslab.platform.report import gains_over_random_init, plus_minus
from sslab.platform.report_runs import find_parent, headlines, load_study_runs, point_stats
from sslab.platform.tracking import Tracker
from sslab.platform.verdict import difference_interval


def study_answer(study: str, tracking_uri: str, parent_run_id: str | None = None) -> str:
    tracker = Tracker(tracking_uri)
    experiment_id, parent = find_parent(tracker, study, parent_run_id)
    trials, _ = load_study_runs(tracker, experiment_id, parent)
    return answer_table(study, trials)


def answer_table(study: str, trials: pd.DataFrame) -> str:
    """The table and the best point's line, from the finished trials of one invocation."""
    finished = trials[trials["status"] == "FINISHED"] if not trials.empty else trials
    shown = headlines(finished) if not finished.empty else []
    if not shown:
        return f"study {study}: no finished trial with a result to compare"
    headline = shown[0]  # kNN top-1 against random init (video: mask propagation J)
    trained, base, label, base_label = headline
    stats = point_stats(finished, trained)
    base_stats = point_stats(finished, base) if base in finished else {}
    gains = gains_over_random_init(finished, headline)
    seeds = sorted({count for _, _, count in stats.values()})
    rows = [["point", f"{label} (%)", f"{base_label} (%)", "gain (pts, 95% CI)"]]
    for point, (mean, std, count) in sorted(stats.items(), key=lambda item: -item[1][0]):
        baseline = plus_minus(*base_stats[point]) if point in base_stats else "n/a"
        rows.append([point, plus_minus(mean, std, count), baseline, gains.get(point, ("n/a", False))[0]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"study {study}: {label} by point, mean ± std over {'/'.join(map(str, seeds))} seed(s)"]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines + [best_line(stats, label)])


def best_line(stats: dict[str, tuple[float, float, int]], label: str) -> str:
    """The best point by mean, and its lead over the runner-up with the 95% t interval (the seed
    spread pooled over the points, as the paper verdicts do)."""
    ranked = sorted(stats, key=lambda point: -stats[point][0])
    best = ranked[0]
    if len(ranked) == 1:
        return f"  one point: {best}"
    runner_up = ranked[1]
    interval = difference_interval(stats, best, runner_up)
    lead = (stats[best][0] - stats[runner_up][0]) * 100
    head = f"  best: {best}, ahead of {runner_up} by {lead:+.1f} {label} points"
    if interval is None:
        return head + ": one seed per point, so no interval; more seeds tell whether the lead holds"
    _, low, high = interval
    judged = "beyond the seeds' noise" if low > 0 else "within the seeds' noise"
    return f"{head} [{low:+.1f}, {high:+.1f}]: {judged}"
