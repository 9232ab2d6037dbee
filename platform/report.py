"""MLflow -> pandas -> reports/<study>/report.md and a self-contained report.html.

Everything in a report is read back from MLflow, so `sslab report` rebuilds it at any time.
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys
from pathlib import Path

import pandas as pd

from sslab.platform.config import swept_keys
from sslab.platform.report_plots import plot_curves, plot_monitored, plot_probes, plot_sweep
from sslab.platform.report_runs import (
    find_parent,
    headlines,
    load_study_runs,
    point_stats,
    probe_table,
    steps_range,
    summarise,
)
from sslab.platform.tracking import DATA_KIND_TAG, UI_MODEL_TRAINING, Tracker
from sslab.platform.verdict import expectations, judge_all, mean_interval, verdict
from sslab.platform.workdir import is_disk_full


def plus_minus(mean: float, std: float, count: int, scale: float = 100, digits: int = 1) -> str:
    if pd.isna(mean):
        return "n/a"
    if count > 1 and not pd.isna(std):
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


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
        "sweep.png": plot_sweep(trials, metric, paper.get("results", {}), config.get("sweep")),
        "probes.png": plot_probes(probes, metric),
        "loss.png": plot_curves(curves, "loss", "training loss"),
        "knn_top1.png": plot_curves(curves, "knn_top1", "kNN top-1 (%; epoch 0 = random init)", 100),
        "propagation_j.png": plot_curves(
            curves, "propagation_j", "propagation J (%; epoch 0 = random init)", 100
        ),
        "monitored_knn.png": plot_monitored(curves, trials),
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
    try:
        tracker.log_artifacts(parent.info.run_id, out_dir, "report")
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(
            f"warning: the store's disk is full: the report is not attached to run {parent.info.run_id}",
            file=sys.stderr,
        )
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
        return json.loads(tracker.download(run_id, "resolved_config.json").read_text())
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
                if parent.data.tags.get(DATA_KIND_TAG) == "video"
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
            f"#/experiments/{experiment_id}/runs/{r['run_id']}{UI_MODEL_TRAINING}",
        ]
        rows.append(row)
    points_header, points = ["point", "seeds"], []
    for _, _, label, base_label in shown:
        points_header += [f"{label} (%)", f"{base_label} (%)"]
    gains = gains_over_random_init(trials, shown[0]) if shown else {}
    if gains:
        points_header.append(f"{shown[0][2]} gain over random init (pts, 95% CI)")
    if shown:
        summary = summarise(trials)
        for point, stats in summary.iterrows():
            row = [point, str(int(stats[(shown[0][0], "count")]))]
            for trained, base, _, _ in shown:
                row += [_cell(stats, trained), _cell(stats, base)]
            points.append(row + ([gains[point][0]] if gains else []))
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
        "below_note": _below_note(gains, shown[0][2] if shown else ""),
    }


def gains_over_random_init(trials: pd.DataFrame, headline) -> dict[str, tuple[str, bool]]:
    """Per point: the trained network's gain over the same backbone at random init, paired by seed,
    with its 95% t interval, and whether the interval lies below zero (the point trained to
    something worse than its start, beyond the seeds' noise)."""
    trained, base, _, base_label = headline
    if base_label != "random init" or base not in trials:
        return {}
    gains = {}
    for point, group in trials.groupby("point"):
        diffs = [100 * d for d in (group[trained] - group[base]).dropna()]
        if not diffs:
            gains[point] = ("n/a", False)
        elif len(diffs) == 1:
            gains[point] = (f"{diffs[0]:+.1f}", False)
        else:
            low, high = mean_interval(diffs)
            below = high < 0
            text = f"{sum(diffs) / len(diffs):+.1f} [{low:+.1f}, {high:+.1f}]"
            gains[point] = (text + (" below random init" if below else ""), below)
    return gains


def _below_note(gains: dict[str, tuple[str, bool]], label: str) -> str:
    below = [
        f"{point} ({text.removesuffix(' below random init')})"
        for point, (text, flag) in gains.items()
        if flag
    ]
    if not below:
        return ""
    return (
        f"Below random init beyond the seeds' noise on {label}: {'; '.join(below)}. Training moved these "
        "points' encoders to something worse than their random start."
    )


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
    swept = swept_keys(sweep)
    args = {  # a swept argument's value here is only its default: say it is swept
        k: "swept" if f"method_args.{k}" in swept else v for k, v in (config.get("method_args") or {}).items()
    }
    return f"{config.get('method', '?')} {json.dumps(args)}"


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
            plus_minus(*stats[point]) if point in stats else "not run",
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


def _budget(trials: pd.DataFrame) -> str:
    """The optimiser steps the final verdict holds at, "" where they were not logged."""
    steps = steps_range(trials["optimizer_steps"]) if "optimizer_steps" in trials else ""
    if not steps:
        return ""
    return f"{steps} optimiser steps" + (" (by point)" if "-" in steps else "")


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


def _cell(stats, column: str) -> str:
    if (column, "mean") not in stats:
        return "n/a"
    return plus_minus(stats[(column, "mean")], stats[(column, "std")], stats[(column, "count")])


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
    lines += [f"**{s['below_note']}**", ""] if s["below_note"] else []
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
        f"{table(s['points_header'], s['points'])}"
        + (f"<p class='verdict'>{e(s['below_note'])}</p>" if s["below_note"] else "")
        + "<h2>Trials</h2>"
        f"<p>{e(_ui_note(s['ui']))}</p>"
        + (f"<p>{e(s['labels_note'])}</p>" if s["labels_note"] else "")
        + f"{table(s['header'], s['rows'], link_last=True)}<h2>Curves</h2>{images}</body></html>"
    )
