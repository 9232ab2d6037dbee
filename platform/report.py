"""MLflow -> pandas -> reports/<study>/report.md and a self-contained report.html.

Everything in a report is read back from MLflow, so `sslab report` rebuilds it at any time.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pandas as pd

from sslab.platform.config import point_keys
from sslab.platform.tracking import TRIAL_TAG, Tracker
from sslab.platform.verdict import expectations, judge, verdict

CURVES = ("loss", "knn_top1")


def load_study_runs(tracker: Tracker, study: str, parent_run_id: str | None = None):
    """(parent run, trials DataFrame, curves DataFrame) of the study's latest or given invocation."""
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
    rows, curves = [], []
    for run in tracker.child_runs(experiment.experiment_id, parent.info.run_id):
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
        rows.append(row)
        for key in CURVES:
            for m in tracker.client.get_metric_history(run.info.run_id, key):
                curves.append({"trial": row["trial"], "metric": key, "epoch": m.step, "value": m.value})
    trials = pd.DataFrame(rows).sort_values("trial", ignore_index=True) if rows else pd.DataFrame()
    return parent, trials, pd.DataFrame(curves)


def point_name(trial: str) -> str:
    """The sweep point of a trial logged before points were tagged: its name without the seed."""
    parts = [p for p in trial.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or "default"


# (trained metric, random-init metric, label): what a report puts side by side, where present.
HEADLINES = [
    ("knn_top1", "random_init_knn_top1", "kNN top-1"),
    ("eval/linear_top1", "random_init_linear_top1", "linear top-1"),
    ("eval/finetune_top1", "random_init_finetune_top1", "fine-tune top-1"),
    ("eval/zero_shot_top1", "random_init_zero_shot_top1", "zero-shot top-1"),
]


def headlines(trials: pd.DataFrame) -> list[tuple[str, str, str]]:
    return [h for h in HEADLINES if h[0] in trials]


def summarise(trials: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Mean and std over seeds of each sweep point's headline metrics (and `extra` ones)."""
    columns = [c for trained, base, _ in headlines(trials) for c in (trained, base) if c in trials]
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
    parent, trials, curves = load_study_runs(tracker, study, parent_run_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _parent_config(tracker, parent.info.run_id)
    paper = config.get("paper") or {}
    metric = paper.get("metric") or "knn_top1"
    plots = {
        "sweep.png": _plot_sweep(trials, metric, paper.get("results", {}), config.get("sweep")),
        "loss.png": _plot_curves(curves, "loss", "training loss"),
        "knn_top1.png": _plot_curves(curves, "knn_top1", "kNN top-1 (epoch 0 = random init)"),
    }
    for name, png in plots.items():
        if png:
            (out_dir / name).write_bytes(base64.b64decode(png))
    sections = _sections(
        study, parent, config, trials, tracker.client.get_experiment_by_name(study).experiment_id
    )
    (out_dir / "report.md").write_text(_markdown(sections, plots))
    (out_dir / "report.html").write_text(_html(sections, plots))
    if not trials.empty:
        trials.to_csv(out_dir / "trials.csv", index=False)
    return out_dir


def _parent_config(tracker: Tracker, run_id: str) -> dict:
    try:
        path = tracker.client.download_artifacts(run_id, "resolved_config.json")
        return json.loads(Path(path).read_text())
    except Exception:  # an older or foreign run without the artifact: the report still builds
        return {}


def _sections(study, parent, config, trials: pd.DataFrame, experiment_id: str) -> dict:
    """The report's content as plain data, rendered to markdown and HTML alike."""
    data, backbone, train = config.get("data", {}), config.get("backbone", {}), config.get("train", {})
    setup = [
        ("method", f"{config.get('method', '?')} {json.dumps(config.get('method_args', {}))}"),
        (
            "data",
            f"{data.get('name')} ({data.get('subset') or 'all'} train / "
            f"{data.get('test_subset') or 'all'} test images, root {data.get('root') or 'embedded'})",
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
        ("command", parent.data.tags.get("sslab.command", "not recorded")),
        ("MLflow", f"experiment {experiment_id}, parent run {parent.info.run_id} ({parent.info.status})"),
    ]
    shown = headlines(trials) if not trials.empty else []
    header = ["trial", "status"]
    for _, _, label in shown:
        header += [f"{label} (%)", "random init (%)", "gain (pts)"]
    header += ["final loss", "images/s", "MLflow run"]
    rows = []
    for _, r in trials.iterrows():
        row = [r["trial"], r["status"]]
        for trained, base, _ in shown:
            value, baseline = r.get(trained), r.get(base)
            gain = (value - baseline) * 100 if pd.notna(value) and pd.notna(baseline) else float("nan")
            row += [_fmt(value, 100), _fmt(baseline, 100), _fmt(gain, 1, "+.1f")]
        row += [
            _fmt(r.get("loss"), 1, ".3f"),
            _fmt(r.get("images_per_s"), 1, ".0f"),
            f"#/experiments/{experiment_id}/runs/{r['run_id']}",
        ]
        rows.append(row)
    points_header, points = ["point", "seeds"], []
    for _, _, label in shown:
        points_header += [f"{label} (%)", "random init (%)"]
    if shown:
        summary = summarise(trials)
        for point, stats in summary.iterrows():
            row = [point, str(int(stats[(shown[0][0], "count")]))]
            for trained, base, _ in shown:
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
        "paper": _paper_section(config.get("paper") or {}, trials),
    }


def _paper_section(paper: dict, trials: pd.DataFrame) -> dict | None:
    """The paper's claim, its numbers beside ours, each ordering it implies judged, the verdict."""
    if not paper.get("reference") and not paper.get("claim"):
        return None
    metric = paper.get("metric") or "eval/linear_top1"
    stats: dict = {}
    if not trials.empty and metric in trials:
        summary = summarise(trials, extra=(metric,))
        stats = {
            point: (row[(metric, "mean")], row[(metric, "std")], int(row[(metric, "count")]))
            for point, row in summary.iterrows()
        }
    results = {str(k): v for k, v in (paper.get("results") or {}).items()}
    numbers = [
        [
            point,
            f"{results[point]:g}" if point in results else "",
            _pm(*stats[point]) if point in stats else "not run",
        ]
        for point in dict.fromkeys(list(stats) + list(results))
    ]
    comparisons = [judge(c, stats) for c in expectations(paper)]
    rows = [
        [f"{c.better} > {c.worse}", c.source, _fmt(c.ours, 1, "+.1f"), _fmt(c.noise, 1, ".1f"), c.outcome]
        for c in comparisons
    ]
    return {
        "reference": paper.get("reference", ""),
        "claim": paper.get("claim", ""),
        "metric": metric,
        "numbers": numbers,
        "comparisons": rows,
        "verdict": verdict(comparisons),
    }


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
    lines += ["## Trials", "", "MLflow run links are relative to `sslab ui` (http://127.0.0.1:5000/).", ""]
    lines += _md_table(s["header"], [r[:-1] + [f"[run]({r[-1]})"] for r in s["rows"]]) + [""]
    lines += (
        ["## Curves", ""]
        + [f"![{n}]({n})" for n, png in plots.items() if png and not (n == "sweep.png" and s["paper"])]
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
    lines += ["Each ordering the claim implies, against twice the standard error of our difference:", ""]
    lines += _md_table(["ordering", "from", "ours (pts)", "noise (pts)", "outcome"], paper["comparisons"])
    return lines + [""]


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
                cells[-1] = f'<a href="http://127.0.0.1:5000/{e(row[-1])}">run</a>'
            body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def image(name, wide=False):
        if not plots.get(name):
            return ""
        return (
            f'<img{" class=wide" if wide else ""} alt="{e(name)}" src="data:image/png;base64,{plots[name]}">'
        )

    images = "".join(image(n) for n in plots if not (n == "sweep.png" and s["paper"]))
    paper = ""
    if s["paper"]:
        p = s["paper"]
        paper = (
            f"<h2>The paper's claim</h2><p><b>{e(p['reference'])}</b>: {e(p['claim'])}</p>"
            f"<p class='verdict'>Verdict: {e(p['verdict'])}.</p>"
            f"<p>Compared on our <code>{e(p['metric'])}</code> (mean ± std over seeds, %):</p>"
            f"{table(['point', 'paper', 'ours'], p['numbers'])}{image('sweep.png', wide=True)}"
            f"<p>Each ordering the claim implies, against twice the standard error of our difference:</p>"
            f"{table(['ordering', 'from', 'ours (pts)', 'noise (pts)', 'outcome'], p['comparisons'])}"
        )
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
        f"<p>Run links open the MLflow UI started by <code>sslab ui</code>.</p>"
        f"{table(s['header'], s['rows'], link_last=True)}<h2>Curves</h2>{images}</body></html>"
    )
