"""A full disk: the study stops with one line naming the workdir and the resume command, its runs
end FAILED, a report can be written elsewhere, and `--resume` finishes it once there is room."""

import copy
import errno
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY
from sslab.platform.cli import main
from sslab.platform.workdir import RESERVE_BYTES, atomic_torch_save, is_disk_full

SSLAB = [sys.executable, "-m", "sslab.platform.cli"]


def _private_mounts_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs /tmp"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


needs_private_mounts = pytest.mark.skipif(
    not _private_mounts_work(), reason="needs `unshare -rm` (user and mount namespaces) for a tmpfs"
)


def in_tmpfs(size: str, disk, *command: str) -> subprocess.CompletedProcess:
    """Runs `command` in a private mount namespace where `disk` is a tmpfs of `size`."""
    disk.mkdir(exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    command = ["unshare", "-rm", "sh", "-c", script, str(disk), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800)


def test_disk_full_is_recognised_through_the_chains_sqlite_torch_and_mlflow_raise():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from err
    except RuntimeError as err:
        chained = err
    assert is_disk_full(chained)
    assert is_disk_full(Exception("(sqlite3.OperationalError) database or disk is full"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_checkpoint_that_cannot_be_written_leaves_no_half_file(tmp_path, monkeypatch):
    import torch

    def save_half(obj, path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError):
        atomic_torch_save({"x": 1}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


@needs_private_mounts
def test_a_workdir_without_room_for_a_study_is_refused_before_anything_starts(tmp_path):
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY))
    disk = tmp_path / "disk"
    size = f"{(RESERVE_BYTES >> 10) // 2}k"  # half the reserve a study holds
    done = in_tmpfs(size, disk, *SSLAB, "run", str(study), "--workdir", str(disk))
    assert done.returncode == 2, done.stderr[-2000:]
    need = f"a study needs more than {RESERVE_BYTES >> 20} MB free"
    assert done.stderr.strip().splitlines() == [f"error: {disk}: --workdir: no space left on device ({need})"]
    assert "Ray" not in done.stdout + done.stderr  # refused before Ray started


@pytest.mark.ray
@needs_private_mounts
def test_a_disk_that_fills_up_mid_training_stops_the_study_resumably(tmp_path):
    raw = copy.deepcopy(TINY) | {"seeds": [0]}
    raw["eval"] = {**raw["eval"], "knn_every": 0}
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(raw))
    disk, elsewhere = tmp_path / "disk", tmp_path / "elsewhere"
    # 9 MB: the store (1 MB), the 4 MB reserve and the first epoch's checkpoint (2.3 MB) fit; the
    # second epoch's checkpoint does not (the previous one is kept beside it).
    scenario = REPO / "tests" / "full_disk_scenario.py"
    done = in_tmpfs("9m", disk, sys.executable, str(scenario), str(disk), str(study), str(elsewhere))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    run = seen["run"]
    assert run["rc"] == 1, run
    assert run["last_line"].startswith(f"error: {disk / 'w'}: no space left on device")
    assert run["last_line"].endswith("--resume` resumes each trial from its last checkpoint")
    assert seen["statuses_after_run"] == ["FAILED", "FAILED"]  # the parent run and the trial's
    assert seen["temp_files"] == []

    on_full = seen["report_on_full_disk"]
    assert on_full["rc"] == 1 and on_full["stderr_lines"] == 1, on_full
    assert "no space left on device; `--reports DIR` writes it elsewhere" in on_full["last_line"]
    assert seen["report_elsewhere"]["rc"] == 0, seen["report_elsewhere"]
    assert "the report is not attached to run" in seen["report_elsewhere"]["tail"][0]
    assert (elsewhere / "tiny" / "report.md").exists()

    assert seen["resume"]["rc"] == 0, seen["resume"]
    assert seen["statuses_after_resume"] == ["FINISHED", "FINISHED"]


def test_report_on_a_full_disk_names_the_folder(tmp_path, monkeypatch, capsys):
    """The same one line without a real full disk (the tmpfs test above needs namespaces)."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "reports/tiny/report.md"))

    monkeypatch.setattr("sslab.platform.report.build_report", full)
    monkeypatch.setattr("sslab.platform.tracking.require_store", lambda *a: None)
    assert main(["report", "tiny", "--workdir", str(tmp_path), "--reports", str(tmp_path / "reports")]) == 1
    hint = "no space left on device; `--reports DIR` writes it elsewhere"
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'reports/tiny'}: {hint}"
