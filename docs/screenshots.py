"""Screenshots of what a user browses after a study: the MLflow UI's runs list, a trial's run and
the compare view (served by `sslab ui`), and the study's report.html, taken in headless Chromium.

    python docs/screenshots.py --workdir RUNS --study NAME --report reports/NAME/report.html

Needs `chromium` on PATH (Debian: `apt-get install chromium`). Writes docs/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from sslab.platform.ray_cluster import free_loopback_port
from sslab.platform.tracking import UI_MODEL_TRAINING, Tracker, default_tracking_uri

DOCS = Path(__file__).resolve().parent


def shoot(url: str, out: Path, height: int = 1000) -> None:
    """One page at 1600 px wide, after its scripts have had 20 s of (virtual) time to fetch."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += [f"--window-size=1600,{height}", "--virtual-time-budget=20000", f"--screenshot={out}", url]
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    print(f"{out.relative_to(DOCS.parent)}: {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    uri = default_tracking_uri(Path(args.workdir))
    tracker = Tracker(uri)
    experiment = tracker.client.get_experiment_by_name(args.study)
    runs = tracker.client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    trials = [r for r in runs if "sslab.trial" in r.data.tags]
    port = free_loopback_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "sslab.platform.cli", "ui", "--workdir", args.workdir, "--port", str(port)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        eid = experiment.experiment_id
        shoot(f"{base}/#/experiments/{eid}{UI_MODEL_TRAINING}", DOCS / "mlflow_runs.png")
        trial = trials[0]
        shoot(
            f"{base}/#/experiments/{eid}/runs/{trial.info.run_id}{UI_MODEL_TRAINING}",
            DOCS / "mlflow_trial_run.png",
            1400,
        )
        ids = urllib.parse.quote(json.dumps([t.info.run_id for t in trials]))
        shoot(
            f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([eid]))}&workflowType=machine_learning",
            DOCS / "mlflow_compare.png",
            1400,
        )
        shoot(Path(args.report).resolve().as_uri(), DOCS / "report_html.png", 2400)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
