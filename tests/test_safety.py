"""Safe by default: bad input is one exit-2 line with nothing written, and faults lose no work.
(The local cluster's network exposure is checked against a real Ray in test_ray.py.)"""

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
import torch
import yaml

from conftest import REPO, apply_change
from sslab.platform.cli import main
from sslab.platform.config import ConfigError
from sslab.platform.validate import build_study, load_study


def write(tmp_path, raw, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_refused(capsys, tmp_path, path, *extra, key=None, says=None):
    before = set(tmp_path.rglob("*"))
    code = main(
        [
            "run",
            str(path),
            "--workdir",
            str(tmp_path / "runs"),
            "--reports",
            str(tmp_path / "reports"),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and str(path) in err, err
    if key:
        assert key in err, err
    if says:
        assert says in err, err
    assert set(tmp_path.rglob("*")) == before, "something was written"
    return err


# ----------------------------------------------------------------------------- study names


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "..", "a/b", "a\nb", "", ".hidden", "x" * 101])
def test_study_names_that_would_be_paths_are_refused(tmp_path, tiny_raw, capsys, name):
    tiny_raw["name"] = name
    assert_refused(capsys, tmp_path, write(tmp_path, tiny_raw), key="name")


def test_report_refuses_a_name_that_is_a_path(tmp_path, capsys):
    assert (
        main(
            [
                "report",
                "../escape",
                "--workdir",
                str(tmp_path / "runs"),
                "--reports",
                str(tmp_path / "reports"),
            ]
        )
        == 2
    )
    assert "STUDY" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_trial_folders_stay_inside_the_invocation(tmp_path):
    from sslab.platform.workdir import inside, safe_dirname

    root = tmp_path / "inv"
    for name in ["root=/../../../etc,seed=0", "x=..,seed=1", "a b/c,seed=2"]:
        folder = inside(root, "trials", safe_dirname(name))
        assert root in folder.parents and folder.parent == root / "trials"
    with pytest.raises(ValueError):
        inside(root, "..", "elsewhere")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, key",
    [
        ({"train": {"lr": float("inf")}}, "train.lr"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"method_args": {"temperature": float("inf")}}, "method_args.temperature"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [0, 1, 0]}, "seeds[2]"),
        ({"sweep": {"method_args.temperature": [0.1, 0.5, 0.1]}}, "sweep.method_args.temperature"),
        ({"sweep": {"points": [{"train.lr": 0.1}, {"train.lr": 0.1}]}}, "sweep.points"),
        ({"paper": {"results": {"seed=0": "high"}}}, "paper.results"),
        ({"train": {"batch_size": 512}}, "train.batch_size"),  # 256 training images
        ({"data": {"subset": 40}}, "train.batch_size"),  # batch 64 > 40 kept
        ({"train": {"cpus_per_worker": 64}}, "train.cpus_per_worker"),  # more than this machine
        ({"train": {"num_workers": 2, "cpus_per_worker": 8}}, "train.cpus_per_worker"),
    ],
)
def test_input_that_used_to_fail_inside_a_trial_is_refused_up_front(tmp_path, tiny_raw, capsys, change, key):
    apply_change(tiny_raw, change)
    assert_refused(capsys, tmp_path, write(tmp_path, tiny_raw), key=key)


@pytest.mark.parametrize("text", ["1e400", ".inf", "-.inf", ".nan"])
def test_non_finite_numbers_in_yaml_and_overrides(tmp_path, tiny_raw, capsys, text):
    path = write(tmp_path, tiny_raw)
    assert_refused(capsys, tmp_path, path, "--set", f"train.lr={text}", key="train.lr")
    raw_text = path.read_text().replace("lr: 0.1", f"lr: {text}")
    path.write_text(raw_text)
    assert_refused(capsys, tmp_path, path, key="train.lr")


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    # 9 levels of 9 aliases: 9^9 (387 million) strings if expanded.
    lines = ["name: bomb", 'a0: &a0 "lol"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines += ["paper:", "  results: *a9"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 600
    err = assert_refused(capsys, tmp_path, path)
    assert "alias" in err


def test_bad_yaml_in_an_override_and_a_non_utf8_file(tmp_path, tiny_raw, capsys):
    path = write(tmp_path, tiny_raw)
    assert_refused(capsys, tmp_path, path, "--set", "train.lr=[1,", key="train.lr", says="invalid YAML")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert_refused(capsys, tmp_path, latin, says="UTF-8")


# ----------------------------------------------------------------------------- image folders


def make_folder(root, classes=("a", "b"), per_class=8, size=12):
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                write_png(image, str(root / split / name / f"{i:03d}.png"))
    return root


def folder_study(tmp_path, tiny_raw, root):
    tiny_raw["data"] = {"name": "imagefolder", "root": str(root), "image_size": 12}
    tiny_raw["train"]["batch_size"] = 8
    return write(tmp_path, tiny_raw, "folder.yaml")


def png_bytes(width: int, height: int, pixel_rows: bytes, end: bool = True) -> bytes:
    """A PNG written chunk by chunk (RGB, 8 bits), with whatever image data it is given."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixel_rows))
    return b"\x89PNG\r\n\x1a\n" + body + (chunk(b"IEND", b"") if end else b"")


DAMAGES = ["corrupt", "truncated", "empty", "test_class_missing", "empty_class", "no_pixels", "bomb"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_bad_image_folders_are_refused_naming_the_file(tmp_path, tiny_raw, capsys, monkeypatch, damage):
    monkeypatch.setenv("SSLAB_CACHE", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data")
    bad = data / "train" / "b" / "003.png"
    if damage == "corrupt":
        bad.write_bytes(b"this is not a png" * 20)
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "no_pixels":  # 0x0: refused, and without libpng's lines of noise
        bad.write_bytes(png_bytes(0, 0, b""))
    elif damage == "bomb":  # 2.6 MB could declare this: 2.7 GB decoded, then 10.8 GB resized
        bad.write_bytes(png_bytes(30000, 30000, b"\x00" * 1000))
    elif damage == "test_class_missing":
        (data / "test" / "zebra").mkdir()
        bad = data / "test" / "zebra"
    else:
        for f in (data / "train" / "b").iterdir():
            f.unlink()
        bad = data / "train" / "b"
    path = folder_study(tmp_path, tiny_raw, data)
    workdir = tmp_path / "runs"
    assert main(["run", str(path), "--workdir", str(workdir), "--reports", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "data.root" in err, err
    assert not workdir.exists() and not (tmp_path / "reports").exists()


def test_a_png_whose_data_ends_before_a_row_is_refused_not_a_crash(tmp_path, tiny_raw):
    """libpng (through torchvision) killed the process with SIGSEGV on it, naming no file."""
    data = make_folder(tmp_path / "data")
    bad = data / "train" / "a" / "002.png"
    bad.write_bytes(png_bytes(12, 12, b"\x00" + b"\x10" * 20, end=False))
    path = folder_study(tmp_path, tiny_raw, data)
    command = ["run", str(path), "--workdir", str(tmp_path / "runs"), "--reports", str(tmp_path / "r")]
    script = f"import sys; from sslab.platform.cli import main; sys.exit(main({command!r}))"
    env = os.environ | {"SSLAB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr[-600:]
    assert done.stderr.strip().count("\n") == 0 and str(bad) in done.stderr and "truncated" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_image_cache_reads_an_image_edited_in_place_again(tmp_path, monkeypatch):
    from torchvision.io import write_png

    from sslab.platform.config import DataConfig
    from sslab.platform.data import load_dataset, scan_image_folder

    monkeypatch.setenv("SSLAB_CACHE", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(data), image_size=12)
    first = load_dataset(cfg).train_images.clone()
    edited = data / "train" / "a" / "000.png"
    write_png(torch.zeros(3, 12, 12, dtype=torch.uint8), str(edited))
    os.utime(edited, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a later mtime, whatever the clock
    scan_image_folder.cache_clear()
    second = load_dataset(cfg).train_images
    assert (first[0] != 0).any() and (second[0] == 0).all()
    assert torch.equal(first[1:], second[1:])


# ----------------------------------------------------------------------------- resume, stores, locks


def fake_invocation(tmp_path, tiny_raw, uri):
    """The state `sslab run` leaves before its trials start: parent run, latest.json, study.json."""
    from sslab.platform.study import StudyPaths, _parent_run, open_store

    study = build_study(tiny_raw)
    paths = StudyPaths((tmp_path / "runs").resolve())
    tracker, experiment_id = open_store(paths, uri, study.name)
    return _parent_run(tracker, experiment_id, study, "# study\n", paths, resume=False)


def test_resume_with_changed_settings_is_refused(tmp_path, tiny_raw, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write(tmp_path, tiny_raw)
    fake_invocation(tmp_path, tiny_raw, uri)
    capsys.readouterr()  # MLflow's set-up messages
    err = assert_refused(
        capsys,
        tmp_path,
        path,
        "--resume",
        "--tracking-uri",
        uri,
        "--set",
        "train.lr=0.05",
        "--set",
        "train.epochs=5",
        key="--resume",
    )
    assert "train.lr: 0.1 -> 0.05" in err and "train.epochs: 2 -> 5" in err


def test_resume_after_the_store_was_deleted_is_a_clear_error(tmp_path, tiny_raw, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write(tmp_path, tiny_raw)
    fake_invocation(tmp_path, tiny_raw, uri)
    capsys.readouterr()  # MLflow's set-up messages
    (tmp_path / "mlflow.db").unlink()
    err = assert_refused(capsys, tmp_path, path, "--resume", "--tracking-uri", uri)
    assert "no MLflow store" in err and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", [["eval", "0123abcd"], ["report", "quickstart"]])
def test_reading_commands_do_not_create_a_missing_store(tmp_path, capsys, command, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "runs"
    assert main([*command, "--workdir", str(workdir), "--reports", str(tmp_path / "reports")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not workdir.exists() and not (tmp_path / "reports").exists()


def test_unwritable_workdir_is_a_one_line_error(tmp_path, tiny_raw, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write(tmp_path, tiny_raw)
    assert main(["run", str(path), "--workdir", str(blocker / "runs"), "--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not writable" in err and "--workdir" in err


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sslab.platform.workdir import locked
    with locked(Path(sys.argv[1]), wait=True):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_second_run_of_a_running_study_is_refused(tmp_path, tiny_raw, capsys, monkeypatch):
    """The first run holds its study's lock for as long as it runs; a second `sslab run` of the
    same study in the same workdir would share latest.json and the report, and is refused, at
    once: before Ray starts (it was refused only after Ray's ~37 s start)."""

    def ray_started(*args, **kwargs):
        raise AssertionError("Ray started before the study's lock was taken")

    monkeypatch.setattr("sslab.platform.study.init_ray", ray_started)
    path = write(tmp_path, tiny_raw)
    lock = tmp_path / "runs" / "studies" / "tiny" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock), "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["run", str(path), "--workdir", str(tmp_path / "runs"), "--reports", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "already running" in err and f"pid {holder.pid}" in err, err
        assert not (tmp_path / "runs" / "mlflow.db").exists() and not (tmp_path / "r").exists()
    finally:
        holder.kill()
        holder.wait()


OPEN_STORE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sslab.platform.study import StudyPaths, open_store
    from sslab.platform.tracking import default_tracking_uri
    while time.time() < float(sys.argv[2]):
        time.sleep(0.005)
    paths = StudyPaths(Path(sys.argv[1]))
    open_store(paths, default_tracking_uri(paths.workdir), sys.argv[3])
    print("ok")
""")


def test_two_runs_on_a_fresh_workdir_set_up_the_store_in_turn(tmp_path):
    """MLflow's first-time migrations raced ('table ... already exists') when two runs created
    the sqlite store at the same moment."""
    start = time.time() + 4  # both processes past their imports, then off together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, str(tmp_path / "runs"), str(start), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for name in ("first", "second")
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in outcomes]


def test_latest_invocation_file_is_replaced_atomically(tmp_path):
    from sslab.platform.workdir import atomic_write_json

    target = tmp_path / "latest.json"
    atomic_write_json(target, {"parent_run_id": "a"})
    atomic_write_json(target, {"parent_run_id": "b"})
    assert json.loads(target.read_text()) == {"parent_run_id": "b"}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"]  # no temporary left


# ----------------------------------------------------------------------------- checkpoints


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_raw, capsys):
    from sslab.platform.build import build_method
    from sslab.platform.checkpoint import load_checkpoint, save_checkpoint
    from sslab.platform.data import load_dataset
    from sslab.platform.optim import build_optimizer

    study = build_study(tiny_raw)
    data = load_dataset(study.data)
    method = build_method(study, data, torch.device("cpu"), total_steps=10)
    optimizer = build_optimizer(method, study.train)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, method, optimizer, epoch=1, step=4)
    first = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        for p in method.parameters():
            p.add_(1.0)
    save_checkpoint(path, method, optimizer, epoch=2, step=8)
    path.write_bytes(path.read_bytes()[:1000])  # cut short after it was written
    assert load_checkpoint(path, method, optimizer, torch.device("cpu")) == (1, 4)
    assert all(torch.equal(v, first[k]) for k, v in method.state_dict().items())
    assert "unreadable" in capsys.readouterr().err


def test_a_relative_data_root_is_made_absolute_before_trials_move_elsewhere(tmp_path, tiny_raw, monkeypatch):
    # Ray runs a trial in its own folder: a root relative to where `sslab run` was typed must
    # not be read from there (it was, and every trial failed to find its data).
    make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    tiny_raw["data"] = {"name": "imagefolder", "root": "data", "image_size": 12}
    tiny_raw["train"]["batch_size"] = 8
    study, _ = load_study(write(tmp_path, tiny_raw))
    assert study.data.root == str(tmp_path / "data")


def test_a_config_error_survives_the_copy_and_pickle_ray_makes_of_it():
    import copy
    import pickle

    error = ConfigError("<trial>", "data.root", "x is not a directory")
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert str(clone) == str(error) and clone.key == "data.root"


def test_report_of_a_study_the_store_never_ran_is_a_one_line_error(tmp_path, tiny_raw, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake_invocation(tmp_path, tiny_raw, uri)  # the store exists, with another study in it
    capsys.readouterr()
    code = main(["report", "never_ran", "--tracking-uri", uri, "--reports", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "never_ran" in err, err
    assert not (tmp_path / "r").exists()


def test_reports_naming_a_file_is_refused_before_training(tmp_path, tiny_raw, capsys):
    """The whole study trained, then NotADirectoryError (53 paths written)."""
    (tmp_path / "reports").write_text("my notes\n")
    path = write(tmp_path, tiny_raw)
    code = main(
        ["run", str(path), "--workdir", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--reports" in err and "is a file" in err, err
    assert not (tmp_path / "runs").exists() and (tmp_path / "reports").read_text() == "my notes\n"


def test_export_keeps_what_a_folder_holds_and_refuses_a_file(tmp_path, capsys):
    """`sslab export` silently replaced a user's encoder.pt; --out naming a file raised."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "encoder.pt").write_text("the user's own weights")
    code = main(["export", "0123abcd", "--out", str(folder), "--workdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "not empty" in err and "--force" in err, err
    assert (folder / "encoder.pt").read_text() == "the user's own weights"
    (tmp_path / "a_file").write_text("x")
    code = main(
        ["export", "0123abcd", "--out", str(tmp_path / "a_file"), "--workdir", str(tmp_path / "runs")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "is a file" in err, err


def test_a_workdir_whose_path_a_url_misreads_is_refused(tmp_path, tiny_raw, capsys, monkeypatch):
    """With '?' in the workdir the sqlite URI ended there: mlflow.db went beside the workdir and
    `sslab report` then found no store."""
    # the workdir's own store (an earlier test's mlflow.set_tracking_uri sets this variable)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write(tmp_path, tiny_raw)
    workdir = tmp_path / "runs?v2"
    assert main(["run", str(path), "--workdir", str(workdir), "--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--workdir" in err and "'?'" in err, err
    assert not list(tmp_path.rglob("mlflow.db")) and not workdir.exists()
