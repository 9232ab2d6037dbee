"""The report's plots (matplotlib, file-only Agg backend), each returned as a base64 PNG that
report.md links and report.html embeds."""

from __future__ import annotations

import base64
import io

import pandas as pd

from sslab.platform.config import point_keys
from sslab.platform.metric_keys import EVAL, is_followed_knn, random_init_key


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: pd.DataFrame, metric: str, ylabel: str, scale: float = 1.0) -> str | None:
    """A PNG (base64) of `metric` per epoch, one line per trial; `scale`: 100 for an accuracy
    logged as a fraction, so that plots and tables share one unit (%)."""
    plt = pyplot()

    data = curves[curves["metric"] == metric] if len(curves) else curves
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for trial, group in data.groupby("trial"):
        group = group.sort_values("epoch").drop_duplicates("epoch", keep="last")
        ax.plot(group["epoch"], group["value"] * scale, marker="o", ms=3, label=trial)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if data["trial"].nunique() <= 12:
        ax.legend(fontsize=7)
    return png(fig)


def plot_monitored(curves: pd.DataFrame, trials: pd.DataFrame) -> str | None:
    """kNN per epoch of every network a trial follows: the evaluated one (solid) beside the
    others (dashed: DINO's student, BYOL's target), so a reader sees which learns when; epoch 0
    is the same backbone at random initialisation."""
    if curves.empty or not curves["metric"].map(is_followed_knn).any():
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    followed = curves[curves["metric"].map(is_followed_knn)]["trial"].unique()
    for colour, trial in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, followed):
        mine = curves[
            (curves["trial"] == trial) & curves["metric"].map(lambda k: k == "knn_top1" or is_followed_knn(k))
        ]
        start = trials[trials["trial"] == trial].iloc[0]
        for metric, group in mine.groupby("metric"):
            group = group.sort_values("epoch").drop_duplicates("epoch", keep="last")
            epochs, values = list(group["epoch"]), list(group["value"])
            last = start.get("epoch")  # runs before the monitor's keys were logged at the end
            if pd.notna(start.get(EVAL + metric)) and pd.notna(last) and last not in epochs:
                epochs, values = [*epochs, last], [*values, start[EVAL + metric]]
            network = "evaluated" if metric == "knn_top1" else metric.removesuffix("_knn_top1")
            style = "-" if metric == "knn_top1" else "--"
            percent = [value * 100 for value in values]
            ax.plot(epochs, percent, style, color=colour, marker="o", ms=3, label=f"{trial} ({network})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%; epoch 0 = random init)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig)


def sort_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def plot_sweep(
    trials: pd.DataFrame, metric: str, paper_results: dict, sweep: dict | None = None
) -> str | None:
    """`metric` against the first swept key (mean ± std over seeds), one line per value of the
    other keys; the paper's numbers, where given, as open markers on a second axis."""
    plt = pyplot()

    if trials.empty or metric not in trials:
        return None
    stats = trials.groupby("point")[metric].agg(["mean", "std"])
    parsed = {
        p: {k: str(v) for k, v in values.items()}
        for p, values in trials.groupby("point")["point_values"].first().items()
    }
    keys = list(next(iter(parsed.values())).keys()) if parsed else []
    if not keys:
        return None
    base = random_init_key(metric)
    baseline = trials[base].mean() * 100 if base in trials else None
    if len({tuple(v) for v in parsed.values()}) > 1:  # `points` with their own keys: one bar each
        return plot_bars(stats, metric, baseline)
    x_key = keys[0]
    names = point_keys([k for k in (sweep or {}) if k != "points"])
    listed = next((v for k, v in (sweep or {}).items() if names.get(k) == x_key and isinstance(v, list)), [])
    order = [str(v) for v in listed]  # the study's own order (none, linear, mlp), else sorted
    x_values = sorted(
        {v[x_key] for v in parsed.values()},
        key=lambda v: (order.index(v), 0.0, "") if v in order else (len(order),) + sort_key(v)[1:],
    )
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    groups: dict[str, list] = {}
    for point, values in parsed.items():
        rest = ",".join(f"{k}={values[k]}" for k in keys[1:])
        groups.setdefault(rest, []).append((x_values.index(values[x_key]), point))
    for rest, members in sorted(groups.items()):
        members.sort()
        xs = [x for x, _ in members]
        ax.errorbar(
            xs,
            [stats.loc[p, "mean"] * 100 for _, p in members],
            yerr=[(stats.loc[p, "std"] if pd.notna(stats.loc[p, "std"]) else 0) * 100 for _, p in members],
            marker="o",
            capsize=3,
            label=rest or "ours",
        )
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls=":", label="random init")
    ax.set_xticks(range(len(x_values)), x_values)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"ours: {metric} (%)")
    ax.grid(alpha=0.3)
    paper = [(x_values.index(parsed[p][x_key]), float(v)) for p, v in paper_results.items() if p in parsed]
    if paper:
        twin = ax.twinx()
        twin.plot(*zip(*sorted(paper)), ls="--", marker="s", mfc="none", color="black", label="paper")
        twin.set_ylabel("paper (%)")
        twin.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="lower left")
    return png(fig)


def plot_bars(stats: pd.DataFrame, metric: str, baseline: float | None) -> str:
    plt = pyplot()

    labels = [p if len(p) <= 48 else p[:45] + "..." for p in stats.index]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(stats) + 1.2), dpi=110)
    ax.barh(
        range(len(stats)), stats["mean"] * 100, xerr=stats["std"].fillna(0) * 100, color="tab:blue", alpha=0.8
    )
    ax.set_yticks(range(len(stats)), labels, fontsize=7)
    ax.invert_yaxis()
    if baseline is not None:
        ax.axvline(baseline, color="grey", ls=":", label="random init (mean)")
        ax.legend(fontsize=7)
    ax.set_xlabel(f"ours: {metric} (%)")
    ax.grid(alpha=0.3, axis="x")
    return png(fig)


def png(fig) -> str:
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def plot_probes(probes: pd.DataFrame, metric: str) -> str | None:
    """`metric` at each probe against optimiser steps, one line per point, mean ± std band."""
    if probes.empty or probes.groupby("trial")["epoch"].nunique().max() < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    for point, rows in probes.groupby("point"):
        by_fraction = rows.groupby("fraction").agg(
            steps=("optimizer_steps", "mean"), mean=("value", "mean"), std=("value", "std")
        )
        x = by_fraction["steps"] if by_fraction["steps"].notna().all() else by_fraction.index
        mean, std = by_fraction["mean"] * 100, by_fraction["std"].fillna(0) * 100
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=point[:40])
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return png(fig)
