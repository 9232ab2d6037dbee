"""MLflow -> pandas -> reports/<study>/report.md and a self-contained report.html.

Everything in a report is read back from MLflow, so `sslab report` rebuilds it at any time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import pandas as pd

from sslab.platform.config import point_keys
from sslab.platform.tracking import TRIAL_TAG, Tracker, monitor_keys
from sslab.platform.verdict import expectations, judge_all, verdict

CURVES = ("loss", "knn_top1", "propagation_j")


def find_parent(tracker: Tracker, study: str, parent_run_id: str | None = None):
    """(experiment id, parent run) of the study's latest or given invocation."""
    experiment = tracker.client.get_experiment_by_name(study)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {study!r} at {tracker.uri}")
    parent = (
        tracker.client.get_run(parent_run_id)
        if parent_run_id
        else tracker.latest_parent(experiment.experiment_id)
    )
    if parent is None:
        raise LookupError(f"study {study!r} has no runs at {tracker.uri}")
    return experiment.experiment_id, parent


def load_study_runs(tracker: Tracker, experiment_id: str, parent, extra_curves: tuple[str, ...] = ()):
    """(trials DataFrame, curves DataFrame) of one invocation; the curves hold the per-epoch
    history of CURVES and `extra_curves`."""
    rows, curves = [], []
    for run in tracker.child_runs(experiment_id, parent.info.run_id):
        params = run.data.params
        trial = run.data.tags.get(TRIAL_TAG)
        point = run.data.tags.get("sslab.point") or point_name(trial)  # runs from before the tag: the name
        values = run.data.tags.get("sslab.point_values")
        row = {
            "trial": trial,
            "point": point,
            "point_values": json.loads(values) if values else _parse_point(point),
            "seed": int(params.get("train.seed", 0)),
            "status": run.info.status,
            "run_id": run.info.run_id,
        }
        row.update(run.data.metrics)
        row["uses_labels"] = run.data.tags.get("sslab.uses_labels", "")
        row["state"] = collapse_state(run.data.metrics, params)
        rows.append(row)
        monitored = tuple(k for k in run.data.metrics if _is_monitored_knn(k))
        curve_keys = tuple(dict.fromkeys(CURVES + extra_curves + monitored))
        copied = tuple(k for k in monitor_keys(run.data.metrics) if f"random_init_{k}" in run.data.metrics)
        keys = dict.fromkeys(curve_keys + copied)  # each history fetched once
        history = {k: tracker.client.get_metric_history(run.info.run_id, k) for k in keys}
        drop_random_init_copies(row, {k: history[k] for k in copied})
        for key in curve_keys:
            points = {m.step: m.value for m in history[key]}
            start = run.data.metrics.get(f"random_init_{key}")
            if start is not None:
                points.setdefault(0, start)  # the monitor's curves start at the random init
            for epoch, value in points.items():
                curves.append({"trial": row["trial"], "metric": key, "epoch": epoch, "value": value})
    trials = pd.DataFrame(rows).sort_values("trial", ignore_index=True) if rows else pd.DataFrame()
    return trials, pd.DataFrame(curves)


def drop_random_init_copies(row: dict, history: dict) -> None:
    """Stores written before sslab 2026-12-02 hold the random-init monitor values under the
    monitor's own keys at epoch 0 too. A trial stopped before its first kNN epoch would then
    show its random-init kNN as its trained result: blank such values. `history`: each such
    key's logged values."""
    for key, values in history.items():
        if values and max(m.step for m in values) == 0:
            row[key] = float("nan")


def _is_monitored_knn(key: str) -> bool:
    """kNN of a network a method follows beside its evaluated one (`student_knn_top1`)."""
    return key.endswith("_knn_top1") and key != "knn_top1" and not key.startswith(("random_init_", "eval/"))


# Collapse, read from the last epoch's diagnostics (DINO Sec. 5.3 / Fig. 7; SimSiam Sec. 4.1).
UNIFORM_ENTROPY = 0.97  # teacher entropy at >= 97% of log K: every prototype equally likely
ONE_HOT_ENTROPY = 0.03  # <= 3% of log K: one prototype takes every image
KL_COLLAPSED = 0.01  # nats: the student matches the teacher, nothing left to learn from it
Z_STD_COLLAPSED = 1e-3  # per-dimension std of unit embeddings (about 1/sqrt(d) when spread)


def collapse_state(metrics: dict, params: dict) -> str:
    """ "collapsed (uniform)", "collapsed (one-hot)", "collapsed (constant)" or "learning" from a
    trial's last logged diagnostics; "" for a method that logs none."""
    entropy, kl = metrics.get("teacher_entropy"), metrics.get("teacher_student_kl")
    out_dim = params.get("method_args.out_dim")
    if entropy is not None and kl is not None and out_dim:
        ratio = entropy / math.log(float(out_dim))
        if kl < KL_COLLAPSED and ratio >= UNIFORM_ENTROPY:
            return "collapsed (uniform)"
        if kl < KL_COLLAPSED and ratio <= ONE_HOT_ENTROPY:
            return "collapsed (one-hot)"
        return "learning"
    if metrics.get("z_std") is not None:
        return "collapsed (constant)" if metrics["z_std"] < Z_STD_COLLAPSED else "learning"
    return ""


def point_name(trial: str) -> str:
    """The sweep point of a trial logged before points were tagged: its name without the seed."""
    parts = [p for p in trial.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or "default"


# (trained metric, baseline metric, label, baseline's label): what a report puts side by side,
# where present. Video studies: propagated masks against the same network at random init and
# against the first mask copied to every frame (no tracking at all).
HEADLINES = [
    ("knn_top1", "random_init_knn_top1", "kNN top-1", "random init"),
    ("eval/linear_top1", "random_init_linear_top1", "linear top-1", "random init"),
    ("eval/finetune_top1", "random_init_finetune_top1", "fine-tune top-1", "random init"),
    ("eval/zero_shot_top1", "random_init_zero_shot_top1", "zero-shot top-1", "random init"),
    ("eval/propagation_j", "random_init_propagation_j", "mask propagation J", "random init"),
    ("eval/propagation_j", "eval/copy_first_j", "mask propagation J", "first mask copied"),
]


def headlines(trials: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    return [h for h in HEADLINES if h[0] in trials]


def summarise(trials: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Mean and std over seeds of each sweep point's headline metrics (and `extra` ones)."""
    columns = list(dict.fromkeys(c for h in headlines(trials) for c in h[:2] if c in trials))
    columns += [c for c in extra if c in trials and c not in columns]
    grouped = trials.groupby("point")[columns]
    return grouped.agg(["mean", "std", "count"])


def _pm(mean: float, std: float, count: int, scale: float = 100, digits: int = 1) -> str:
    if pd.isna(mean):
        return "n/a"
    if count > 1 and not pd.isna(std):
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(curves: pd.DataFrame, metric: str, ylabel: str) -> str | None:
    """A PNG (base64) of `metric` per epoch, one line per trial."""
    plt = _pyplot()

    data = curves[curves["metric"] == metric] if len(curves) else curves
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for trial, group in data.groupby("trial"):
        group = group.sort_values("epoch").drop_duplicates("epoch", keep="last")
        ax.plot(group["epoch"], group["value"], marker="o", ms=3, label=trial)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if data["trial"].nunique() <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def _plot_monitored(curves: pd.DataFrame, trials: pd.DataFrame) -> str | None:
    """kNN per epoch of every network a trial follows: the evaluated one (solid) beside the
    others (dashed: DINO's student, BYOL's target), so a reader sees which learns when; epoch 0
    is the same backbone at random initialisation."""
    if curves.empty or not curves["metric"].map(_is_monitored_knn).any():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    followed = curves[curves["metric"].map(_is_monitored_knn)]["trial"].unique()
    for colour, trial in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, followed):
        mine = curves[
            (curves["trial"] == trial)
            & curves["metric"].map(lambda k: k == "knn_top1" or _is_monitored_knn(k))
        ]
        start = trials[trials["trial"] == trial].iloc[0]
        for metric, group in mine.groupby("metric"):
            group = group.sort_values("epoch").drop_duplicates("epoch", keep="last")
            epochs, values = list(group["epoch"]), list(group["value"])
            last = start.get("epoch")  # runs before the monitor's keys were logged at the end
            if pd.notna(start.get(f"eval/{metric}")) and pd.notna(last) and last not in epochs:
                epochs, values = [*epochs, last], [*values, start[f"eval/{metric}"]]
            network = "evaluated" if metric == "knn_top1" else metric.removesuffix("_knn_top1")
            style = "-" if metric == "knn_top1" else "--"
            ax.plot(epochs, values, style, color=colour, marker="o", ms=3, label=f"{trial} ({network})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (epoch 0 = random init)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _parse_point(point: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in point.split(",") if "=" in part)


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _plot_sweep(
    trials: pd.DataFrame, metric: str, paper_results: dict, sweep: dict | None = None
) -> str | None:
    """`metric` against the first swept key (mean ± std over seeds), one line per value of the
    other keys; the paper's numbers, where given, as open markers on a second axis."""
    plt = _pyplot()

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
    base = metric.replace("eval/", "random_init_") if metric.startswith("eval/") else "random_init_" + metric
    baseline = trials[base].mean() * 100 if base in trials else None
    if len({tuple(v) for v in parsed.values()}) > 1:  # `points` with their own keys: one bar each
        return _plot_bars(stats, metric, baseline)
    x_key = keys[0]
    names = point_keys([k for k in (sweep or {}) if k != "points"])
    listed = next((v for k, v in (sweep or {}).items() if names.get(k) == x_key and isinstance(v, list)), [])
    order = [str(v) for v in listed]  # the study's own order (none, linear, mlp), else sorted
    x_values = sorted(
        {v[x_key] for v in parsed.values()},
        key=lambda v: (order.index(v), 0.0, "") if v in order else (len(order),) + _sort_key(v)[1:],
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
    return _png(fig)


def _plot_bars(stats: pd.DataFrame, metric: str, baseline: float | None) -> str:
    plt = _pyplot()

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
    return _png(fig)


def _png(fig) -> str:
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def build_report(study: str, tracking_uri: str, out_dir: Path, parent_run_id: str | None = None) -> Path:
    tracker = Tracker(tracking_uri)
    experiment_id, parent = find_parent(tracker, study, parent_run_id)
    config = _parent_config(tracker, parent.info.run_id)
    paper = config.get("paper") or {}
    metric = paper.get("metric") or "knn_top1"
    trials, curves = load_study_runs(tracker, experiment_id, parent, (metric, "optimizer_steps"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probes = probe_table(trials, curves, metric)
    plots = {
        "sweep.png": _plot_sweep(trials, metric, paper.get("results", {}), config.get("sweep")),
        "probes.png": _plot_probes(probes, metric),
        "loss.png": _plot_curves(curves, "loss", "training loss"),
        "knn_top1.png": _plot_curves(curves, "knn_top1", "kNN top-1 (epoch 0 = random init)"),
        "propagation_j.png": _plot_curves(curves, "propagation_j", "propagation J (epoch 0 = random init)"),
        "monitored_knn.png": _plot_monitored(curves, trials),
    }
    for name, png in plots.items():
        if png:
            (out_dir / name).write_bytes(base64.b64decode(png))
    sections = _sections(study, parent, config, trials, experiment_id, probes)
    sections["ui"] = ui_address(tracking_uri)
    (out_dir / "report.md").write_text(_markdown(sections, plots))
    (out_dir / "report.html").write_text(_html(sections, plots))
    if not trials.empty:
        trials.to_csv(out_dir / "trials.csv", index=False)
    # The report travels with the study's parent run: whoever reads the store reads the report.
    tracker.log_artifacts(parent.info.run_id, out_dir, "report")
    return out_dir


def ui_address(tracking_uri: str) -> str:
    """Where the MLflow UI of this store is: the tracking server itself, or for a local store
    the address `sslab ui` serves it on."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return "http://127.0.0.1:5000"


def _ui_note(ui: str) -> str:
    local = ui == "http://127.0.0.1:5000"
    return f"MLflow run links open {ui}" + (
        " (start it with `sslab ui` on the same store)." if local else "."
    )


def portable(path: str | None) -> str | None:
    """An absolute path as seen from the folder the report is built in (`../shared/...`), so that
    a report read on another machine names no folder of this one; other text as it is."""
    if not path or not os.path.isabs(path):
        return path
    relative = os.path.relpath(path)
    return relative if relative.count("..") <= 2 else path


def portable_arg(word: str) -> str:
    """A word of a command line with its absolute path made `portable`, alone or as a value
    (`data.root=/abs/path`, as `--set` takes it)."""
    key, sep, value = word.partition("=")
    return key + sep + portable(value) if sep and os.path.isabs(value) else portable(word)


def _parent_config(tracker: Tracker, run_id: str) -> dict:
    try:
        path = tracker.client.download_artifacts(run_id, "resolved_config.json")
        return json.loads(Path(path).read_text())
    except Exception:  # an older or foreign run without the artifact: the report still builds
        return {}


def _sections(study, parent, config, trials: pd.DataFrame, experiment_id: str, probes=None) -> dict:
    """The report's content as plain data, rendered to markdown and HTML alike."""
    data, backbone, train = config.get("data", {}), config.get("backbone", {}), config.get("train", {})
    setup = [
        ("method", _method_line(config)),
        (
            "data",
            f"{data.get('name')} ({data.get('subset') or 'all'} train / {data.get('test_subset') or 'all'} "
            + (
                f"test clips of {data.get('clip_length')} frames"
                if "video" in str(data.get("name"))
                else "test images"
            )
            + f", root {portable(data.get('root')) or 'embedded'})"
            + (
                f"; pretrained on the unlabelled {portable(data['pretrain'])}" if data.get("pretrain") else ""
            ),
        ),
        (
            "backbone",
            f"{backbone.get('name')} width {backbone.get('width')} cifar_stem {backbone.get('cifar_stem')}",
        ),
        (
            "training",
            f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, {train.get('optimizer')} "
            f"lr {train.get('lr')}, {train.get('num_workers')} worker(s)",
        ),
        ("seeds", ", ".join(str(s) for s in config.get("seeds", []))),
        ("sweep", json.dumps(config.get("sweep", {})) or "none"),
        ("git commit", parent.data.tags.get("git_commit", "unknown")),
        (
            "command",
            " ".join(map(portable_arg, parent.data.tags.get("sslab.command", "not recorded").split(" "))),
        ),
        ("MLflow", f"experiment {experiment_id}, parent run {parent.info.run_id} ({parent.info.status})"),
    ]
    shown = headlines(trials) if not trials.empty else []
    header = ["trial", "status"]
    for _, _, label, base_label in shown:
        header += [f"{label} (%)", f"{base_label} (%)", "gain (pts)"]
    flagged = not trials.empty and trials["state"].astype(bool).any()
    header += ["final loss"] + (["collapse"] if flagged else []) + ["images/s", "MLflow run"]
    rows = []
    for _, r in trials.iterrows():
        row = [r["trial"] + (" (uses labels)" if r.get("uses_labels") else ""), r["status"]]
        for trained, base, _, _ in shown:
            value, baseline = r.get(trained), r.get(base)
            gain = (value - baseline) * 100 if pd.notna(value) and pd.notna(baseline) else float("nan")
            row += [_fmt(value, 100), _fmt(baseline, 100), _fmt(gain, 1, "+.1f")]
        row += [_fmt(r.get("loss"), 1, ".3f")] + ([r["state"] or "-"] if flagged else [])
        row += [
            _fmt(r.get("images_per_s"), 1, ".0f"),
            f"#/experiments/{experiment_id}/runs/{r['run_id']}",
        ]
        rows.append(row)
    points_header, points = ["point", "seeds"], []
    for _, _, label, base_label in shown:
        points_header += [f"{label} (%)", f"{base_label} (%)"]
    if shown:
        summary = summarise(trials)
        for point, stats in summary.iterrows():
            row = [point, str(int(stats[(shown[0][0], "count")]))]
            for trained, base, _, _ in shown:
                row += [_cell(stats, trained), _cell(stats, base)]
            points.append(row)
    return {
        "title": f"sslab report: {study}",
        "description": config.get("description", ""),
        "setup": setup,
        "header": header,
        "rows": rows,
        "points_header": points_header,
        "points": points,
        "paper": _paper_section(config.get("paper") or {}, trials, probes),
        "labels_note": _labels_note(trials),
    }


def _labels_note(trials: pd.DataFrame) -> str:
    """Which trials learned from labels (CLIP's captions built from class names): not self-supervised."""
    if trials.empty or not trials["uses_labels"].astype(bool).any():
        return ""
    used = trials[trials["uses_labels"].astype(bool)]
    how = "; ".join(dict.fromkeys(used["uses_labels"]))
    return (
        f"Trials marked (uses labels) trained with label information, so they are not self-supervised: {how}."
    )


def _method_line(config: dict) -> str:
    """The method and its arguments, or, where the sweep sets the method, that it varies by point
    (one trial's arguments would misdescribe the others; each trial's are in its MLflow params)."""
    sweep = config.get("sweep") or {}
    varies = "method" in sweep or any("method" in point for point in sweep.get("points", []))
    if varies:
        return "set by each sweep point (its arguments in the trial's MLflow params)"
    return f"{config.get('method', '?')} {json.dumps(config.get('method_args', {}))}"


def _paper_section(paper: dict, trials: pd.DataFrame, probes: pd.DataFrame | None = None) -> dict | None:
    """The paper's claim, its numbers beside ours, each ordering it implies judged at the end of
    training and at every probe point before it, the verdict with the budget it holds at."""
    if not paper.get("reference") and not paper.get("claim"):
        return None
    metric = paper.get("metric") or "eval/linear_top1"
    stats = point_stats(trials, metric) if not trials.empty and metric in trials else {}
    results = {str(k): v for k, v in (paper.get("results") or {}).items()}
    numbers = [
        [
            point,
            f"{results[point]:g}" if point in results else "",
            _pm(*stats[point]) if point in stats else "not run",
        ]
        for point in dict.fromkeys(list(stats) + list(results))
    ]
    comparisons = judge_all(expectations(paper), stats)
    budget = _budget(trials)
    return {
        "reference": paper.get("reference", ""),
        "claim": paper.get("claim", ""),
        "metric": metric,
        "numbers": numbers,
        "comparisons": [_comparison_row(c) for c in comparisons],
        "verdict": verdict(comparisons) + (f", at {budget}" if budget else ""),
        "probes": _probe_verdicts(paper, probes),
    }


COMPARISON_HEADER = ["ordering", "from", "paper (pts)", "ours (pts)", "95% CI", "p (Holm)", "outcome"]


def _comparison_row(c) -> list[str]:
    interval = "n/a" if pd.isna(c.low) else f"[{c.low:+.1f}, {c.high:+.1f}]"
    return [
        f"{c.better} > {c.worse}",
        c.source,
        _fmt(c.paper_effect, 1, "+.1f"),
        _fmt(c.ours, 1, "+.1f"),
        interval,
        _fmt(c.p_agrees, 1, ".3f"),
        c.outcome,
    ]


def point_stats(frame: pd.DataFrame, column: str) -> dict[str, tuple[float, float, int]]:
    """Sweep point -> (mean, std, seeds) of `column`: what the verdict judges."""
    grouped = frame.groupby("point")[column].agg(["mean", "std", "count"])
    return {point: (row["mean"], row["std"], int(row["count"])) for point, row in grouped.iterrows()}


def steps_range(steps: pd.Series) -> str:
    """ "N" or "N-M" optimiser steps (points differ, e.g. batch sizes at equal epochs); "" if none."""
    steps = steps.dropna()
    if steps.empty:
        return ""
    low, high = int(steps.min()), int(steps.max())
    return f"{low}" if low == high else f"{low}-{high}"


def _budget(trials: pd.DataFrame) -> str:
    """The optimiser steps the final verdict holds at, "" where they were not logged."""
    steps = steps_range(trials["optimizer_steps"]) if "optimizer_steps" in trials else ""
    if not steps:
        return ""
    return f"{steps} optimiser steps" + (" (by point)" if "-" in steps else "")


def probe_table(trials: pd.DataFrame, curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (trial, epoch) where `metric` was logged: point, seed, epoch, optimiser steps,
    value, and the probe's fraction of its trial's training."""
    if trials.empty or curves.empty or metric not in set(curves["metric"]):
        return pd.DataFrame()
    wide = curves[curves["metric"].isin([metric, "optimizer_steps"])].pivot_table(
        index=["trial", "epoch"], columns="metric", values="value", aggfunc="last"
    )
    wide = wide.dropna(subset=[metric]).reset_index()
    wide = wide[wide["epoch"] >= 1]  # epoch 0 is the random-init baseline
    if "optimizer_steps" not in wide:
        wide["optimizer_steps"] = float("nan")
    info = trials.set_index("trial")[["point", "seed"]]
    wide = wide.join(info, on="trial")
    last_epoch = wide.groupby("trial")["epoch"].transform("max")
    wide["fraction"] = (wide["epoch"] / last_epoch).round(3)
    return wide.rename(columns={metric: "value"})


def _probe_verdicts(paper: dict, probes: pd.DataFrame | None) -> list[dict]:
    """The orderings judged at every probe fraction logged by every point (each its own family)."""
    if probes is None or probes.empty:
        return []
    out = []
    for fraction, rows in probes.groupby("fraction"):
        if rows["point"].nunique() < 2:
            continue
        comparisons = judge_all(expectations(paper), point_stats(rows, "value"))
        out.append(
            {
                "fraction": float(fraction),
                "steps": steps_range(rows["optimizer_steps"]) or "?",
                "verdict": verdict(comparisons),
                "comparisons": [_comparison_row(c) for c in comparisons],
            }
        )
    return out


def _plot_probes(probes: pd.DataFrame, metric: str) -> str | None:
    """`metric` at each probe against optimiser steps, one line per point, mean ± std band."""
    if probes.empty or probes.groupby("trial")["epoch"].nunique().max() < 2:
        return None
    plt = _pyplot()
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
    return _png(fig)


def _cell(stats, column: str) -> str:
    if (column, "mean") not in stats:
        return "n/a"
    return _pm(stats[(column, "mean")], stats[(column, "std")], stats[(column, "count")])


def _fmt(value, scale: float = 1, spec: str = ".1f") -> str:
    if value is None or pd.isna(value):
        return "n/a"
    return format(value * scale, spec)


def _markdown(s: dict, plots: dict) -> str:
    lines = [f"# {s['title']}", ""]
    if s["description"]:
        lines += [s["description"].strip(), ""]
    lines += (
        ["## Setup", ""]
        + [f"- **{k}**: " + (f"`{v}`" if k == "command" else str(v)) for k, v in s["setup"]]
        + [""]
    )
    if s["paper"]:
        lines += _md_paper(s["paper"], plots)
    lines += ["## Results (mean ± std over seeds)", ""]
    lines += _md_table(s["points_header"], s["points"]) + [""]
    lines += ["## Trials", "", _ui_note(s["ui"]), ""] + ([s["labels_note"], ""] if s["labels_note"] else [])
    lines += _md_table(s["header"], [r[:-1] + [f"[run]({s['ui']}/{r[-1]})"] for r in s["rows"]]) + [""]
    lines += (
        ["## Curves", ""]
        + [
            f"![{n}]({n})"
            for n, png in plots.items()
            if png and not (n in ("sweep.png", "probes.png") and s["paper"])
        ]
        + [""]
    )
    return "\n".join(lines)


def _md_paper(paper: dict, plots: dict) -> list[str]:
    lines = [
        "## The paper's claim",
        "",
        f"**{paper['reference']}**: {paper['claim']}",
        "",
        f"**Verdict: {paper['verdict']}.**",
        "",
        f"Compared on our `{paper['metric']}` (mean ± std over seeds, %):",
        "",
    ]
    lines += _md_table(["point", "paper", "ours"], paper["numbers"]) + [""]
    if plots.get("sweep.png"):
        lines += ["![sweep](sweep.png)", ""]
    lines += [STATS_NOTE, ""]
    lines += _md_table(COMPARISON_HEADER, paper["comparisons"]) + [""]
    if paper["probes"]:
        lines += ["### Through training", ""]
        if plots.get("probes.png"):
            lines += ["![probes](probes.png)", ""]
        lines += ["Each ordering judged at every probe point (each probe its own Holm family):", ""]
        rows = [[f"{p['fraction']:g}", p["steps"], p["verdict"]] for p in paper["probes"]]
        lines += _md_table(["fraction of training", "optimiser steps", "verdict"], rows) + [""]
        for p in paper["probes"]:
            lines += [f"At {p['fraction']:g} of training ({p['steps']} steps):", ""]
            lines += _md_table(COMPARISON_HEADER, p["comparisons"]) + [""]
    return lines


STATS_NOTE = (
    "Each ordering the claim implies: our difference with its 95% interval (t distribution, seed "
    "spread pooled over the points), and two one-sided t-tests Holm-corrected over the family: "
    "*agrees* when the difference is above zero, *not reproduced* when it is below the paper's "
    "effect (its gap, or the tie for a claim without numbers), *inconclusive* otherwise. "
    "p (Holm) is the adjusted p-value of the first test."
)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _html(s: dict, plots: dict) -> str:
    e = html.escape

    def table(header, rows, link_last=False):
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = ""
        for row in rows:
            cells = [e(str(c)) for c in row]
            if link_last:
                cells[-1] = f'<a href="{e(s["ui"])}/{e(row[-1])}">run</a>'
            body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def image(name, wide=False):
        if not plots.get(name):
            return ""
        return (
            f'<img{" class=wide" if wide else ""} alt="{e(name)}" src="data:image/png;base64,{plots[name]}">'
        )

    in_paper = ("sweep.png", "probes.png") if s["paper"] else ()
    images = "".join(image(n) for n in plots if n not in in_paper)
    paper = ""
    if s["paper"]:
        p = s["paper"]
        paper = (
            f"<h2>The paper's claim</h2><p><b>{e(p['reference'])}</b>: {e(p['claim'])}</p>"
            f"<p class='verdict'>Verdict: {e(p['verdict'])}.</p>"
            f"<p>Compared on our <code>{e(p['metric'])}</code> (mean ± std over seeds, %):</p>"
            f"{table(['point', 'paper', 'ours'], p['numbers'])}{image('sweep.png', wide=True)}"
            f"<p>{e(STATS_NOTE)}</p>{table(COMPARISON_HEADER, p['comparisons'])}"
        )
        if p["probes"]:
            rows = [[f"{q['fraction']:g}", q["steps"], q["verdict"]] for q in p["probes"]]
            paper += (
                f"<h3>Through training</h3>{image('probes.png', wide=True)}"
                f"{table(['fraction of training', 'optimiser steps', 'verdict'], rows)}"
            )
            for q in p["probes"]:
                paper += f"<p>At {q['fraction']:g} of training ({e(q['steps'])} steps):</p>"
                paper += table(COMPARISON_HEADER, q["comparisons"])
    setup = "".join(
        f"<li><b>{e(k)}</b>: " + (f"<code>{e(str(v))}</code>" if k == "command" else e(str(v))) + "</li>"
        for k, v in s["setup"]
    )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:48%}img.wide{max-width:75%}"
        ".verdict{font-weight:bold;padding:.5em;background:#f6f6e8;border-left:4px solid #996}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(s['title'])}</title>"
        f"<style>{style}</style></head><body><h1>{e(s['title'])}</h1><p>{e(s['description'])}</p>"
        f"<h2>Setup</h2><ul>{setup}</ul>{paper}<h2>Results (mean ± std over seeds)</h2>"
        f"{table(s['points_header'], s['points'])}<h2>Trials</h2>"
        f"<p>{e(_ui_note(s['ui']))}</p>"
        + (f"<p>{e(s['labels_note'])}</p>" if s["labels_note"] else "")
        + f"{table(s['header'], s['rows'], link_last=True)}<h2>Curves</h2>{images}</body></html>"
    )
