"""A study whose workdir's disk fills up mid-training, run inside a private mount namespace whose
small tmpfs is the disk (tests/test_disk_full.py starts it with `unshare`: the mount is seen only
here, so everything is checked from here). Prints one JSON object of what happened.

    python full_disk_scenario.py DISK STUDY_YAML ELSEWHERE
"""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

SSLAB = [sys.executable, "-m", "sslab.platform.cli"]


def sslab(*args: str, cwd: Path) -> dict:
    done = subprocess.run([*SSLAB, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    lines = done.stderr.strip().splitlines()
    return {
        "rc": done.returncode,
        "last_line": lines[-1] if lines else "",
        "stderr_lines": len(lines),
        "tail": lines[-12:],
    }


def statuses(workdir: Path) -> list[str]:
    with sqlite3.connect(workdir / "mlflow.db") as db:
        return sorted(status for (status,) in db.execute("SELECT status FROM runs"))


def fill(disk: Path) -> Path:
    """Takes every free byte of the disk."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(bytes(1 << 16))
                handle.flush()
        except OSError:
            pass
    return filler


def main(disk: Path, study: Path, elsewhere: Path) -> dict:
    workdir = disk / "w"
    seen: dict = {}
    seen["run"] = sslab("run", str(study), "--workdir", str(workdir), "--no-report", cwd=disk)
    seen["statuses_after_run"] = statuses(workdir)
    seen["temp_files"] = [p.name for p in workdir.rglob(".*.tmp-*")]
    filler = fill(disk)
    seen["report_on_full_disk"] = sslab("report", "tiny", "--workdir", str(workdir), cwd=disk)
    seen["report_elsewhere"] = sslab(
        "report", "tiny", "--workdir", str(workdir), "--reports", str(elsewhere), cwd=disk
    )
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    seen["resume"] = sslab("run", str(study), "--workdir", str(workdir), "--no-report", "--resume", cwd=disk)
    seen["statuses_after_resume"] = statuses(workdir)
    return seen


if __name__ == "__main__":
    print(json.dumps(main(*(Path(arg) for arg in sys.argv[1:]))))
