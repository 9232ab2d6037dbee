"""sslab command line: run | validate | report | compare | ls | eval | export | methods | ui | bench.

Bad input (a study file, a --set override) prints one line naming the file and key and exits
with code 2 before anything is written. Each command imports what it needs when it runs (torch,
Ray and MLflow take seconds to import), so `sslab report` or `sslab ui` never load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from sslab.platform.config import ConfigError, check_study_name, parse_override
from sslab.platform.workdir import DiskFull, check_room, is_disk_full

EXIT_BAD_INPUT = 2


def _workdir(args) -> Path:
    return Path(args.workdir or os.environ.get("SSLAB_WORKDIR") or "sslab-runs").resolve()


def _check_folder(path: Path, key: str) -> None:
    """A folder a command will write: refused now, before anything runs, where a file stands in
    its way (the folder itself or one above it)."""
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise ConfigError(key, str(place), "is a file, not a folder")
            return


def _tracking_uri(args) -> str:
    from sslab.platform.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, _workdir(args))


def _existing_store(args) -> str:
    """The tracking URI of a command that reads a store: a missing one is a one-line error, not
    an empty store created."""
    from sslab.platform.tracking import require_store

    uri = _tracking_uri(args)
    require_store(uri, "--tracking-uri")
    return uri


def cmd_validate(args) -> int:
    from sslab.platform.cost import print_cost
    from sslab.platform.sweep import expand_trials
    from sslab.platform.validate import load_study

    study, raw = load_study(args.study, args.set)

    if study.search.name == "optuna":
        print(
            f"{args.study}: ok ({study.method}, Optuna: {study.search.num_samples} point(s) x "
            f"{len(study.seeds)} seed(s) over {', '.join(study.sweep)})"
        )
        return 0
    trials = expand_trials(study, raw)
    print(f"{args.study}: ok ({study.method}, {len(trials)} trial(s): {', '.join(t.name for t in trials)})")
    _print_recipe(study, raw, args.set)
    if not args.no_estimate:
        print_cost(trials, study.max_concurrent_trials, args.study)
    return 0


def _print_recipe(study, raw: dict, overrides: list[str]) -> None:
    """The training recipe a study resolved to, each value with where it came from."""
    from sslab.platform.validate import train_sources

    by_source: dict[str, list[str]] = {}
    for key, source in train_sources(study, raw, overrides).items():
        by_source.setdefault(source, []).append(f"{key} {getattr(study.train, key)}")
    print("  train: " + "; ".join(f"{', '.join(values)} ({source})" for source, values in by_source.items()))


def _run_reports_dir(args) -> Path:
    """Where `sslab run` writes its report: --reports; else ./reports, unless --set changed the
    study: then beside its runs (<workdir>/reports), so that a variation never overwrites the
    study's own report (committed under reports/ in a checkout)."""
    if args.reports:
        return Path(args.reports)
    return _workdir(args) / "reports" if args.set else Path("reports")


def cmd_run(args) -> int:
    from sslab.platform.cost import print_study_cost
    from sslab.platform.report import build_report
    from sslab.platform.study import run_study
    from sslab.platform.validate import load_study

    if args.verbose:
        os.environ["SSLAB_VERBOSE"] = "1"  # Ray's trial processes inherit it
    else:  # MLflow's INFO lines (store created, system metrics started and stopped) say nothing new
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    overrides = args.set + ([f"register_model={args.register}"] if args.register else [])
    study, raw = load_study(args.study, overrides)
    reports = _run_reports_dir(args)
    if not args.no_report:
        _check_folder(reports.resolve() / study.name, "--reports")
    if not args.estimate_only:
        check_room(_workdir(args))
    trial_seconds = None
    if args.estimate_only or not (args.no_estimate or args.resume):
        local = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
        trial_seconds = print_study_cost(study, raw, args.study, local)
        if args.estimate_only:
            return 0

    command = "sslab " + shlex.join(args.argv)
    again = command if args.resume else f"{command} --resume"
    try:
        result = run_study(
            study,
            raw,
            Path(args.study).read_text(),
            _workdir(args),
            tracking_uri=args.tracking_uri,
            ray_address=args.ray_address,
            resume=args.resume,
            source=args.study,
            command=command,
            trial_seconds=trial_seconds,
        )
    except DiskFull as err:
        raise DiskFull(
            f"{err}; free some space, then `{again}` resumes each trial from its last checkpoint"
        ) from None
    if not args.no_report:
        out = build_report(
            study.name, result["tracking_uri"], reports / study.name, parent_run_id=result["parent_run_id"]
        )
        print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    _print_answer(study.name, result)
    if result["status"] == "FINISHED":
        return 0
    print(
        f"study {study.name}: not every trial finished; `{again}` runs those (each from its last checkpoint)"
    )
    return 1


def _print_answer(study: str, result: dict) -> None:
    """The run's last word: each point against random init and the best point's lead (nothing
    where no run reached the store)."""
    from sslab.platform.answer import study_answer

    if not result.get("tracking_uri"):
        return
    try:
        print(study_answer(study, result["tracking_uri"], parent_run_id=result["parent_run_id"]))
    except LookupError:
        pass


def _study_in_store(args, command: str) -> tuple[str, str]:
    """(study name, tracking URI) of `sslab report` / `sslab compare`: STUDY is a file or a name."""
    name = args.study
    if name.endswith((".yaml", ".yml")):
        from sslab.platform.validate import load_study

        name = load_study(name, args.set)[0].name
    check_study_name(name, f"sslab {command}", "STUDY")
    return name, _existing_store(args)


def cmd_compare(args) -> int:
    from sslab.platform.answer import study_answer

    name, uri = _study_in_store(args, "compare")
    try:
        print(study_answer(name, uri, parent_run_id=args.parent_run))
    except LookupError as err:
        raise ConfigError(uri, "STUDY", str(err)) from None
    return 0


def cmd_ls(args) -> int:
    from sslab.platform.listing import store_listing

    print(store_listing(_existing_store(args)))
    return 0


def cmd_report(args) -> int:
    from sslab.platform.report import build_report

    name, uri = _study_in_store(args, "report")
    reports = Path(args.reports or "reports")
    _check_folder(reports.resolve() / name, "--reports")
    try:
        out = build_report(name, uri, reports / name, parent_run_id=args.parent_run)
    except LookupError as err:  # no such experiment or invocation in the store
        raise ConfigError(uri, "STUDY", str(err)) from None
    except OSError as err:
        if not is_disk_full(err):
            raise
        out = reports / name
        raise DiskFull(f"{out}: no space left on device; `--reports DIR` writes it elsewhere") from None
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def cmd_eval(args) -> int:
    """Evaluates an MLflow run's checkpoint and logs eval/... metrics to that run."""
    import torch

    from sslab.platform.config import set_dotted
    from sslab.platform.data import load_dataset
    from sslab.platform.evaluate import evaluate_checkpoint
    from sslab.platform.metric_keys import EVAL, RANDOM_INIT
    from sslab.platform.run_artifacts import run_checkpoint, trial_config_of
    from sslab.platform.validate import build_study

    tracker, run = _tracked_run(args)
    raw = trial_config_of(tracker, args.run)
    if args.protocol:
        raw["eval"]["protocols"] = args.protocol
    if args.label_fraction:
        raw["eval"]["label_fractions"] = args.label_fraction
    for text in args.set:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    study = build_study(raw, source=f"run {args.run}")
    checkpoint = run_checkpoint(tracker, run)
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() and study.train.use_gpu else "cpu")
    )
    data = load_dataset(study.data)
    metrics, subsets, epoch = evaluate_checkpoint(study, data, checkpoint, device)
    if args.random_init:
        metrics |= evaluate_checkpoint(study, data, None, device, prefix=EVAL + RANDOM_INIT)[0]
    tracker.log_metrics(args.run, metrics, step=epoch)
    if subsets:
        tracker.log_dict(args.run, subsets, "eval/label_subsets.json")
    width = max(len(k) for k in metrics)
    print(f"run {args.run} ({run.info.run_name}), checkpoint after epoch {epoch}:")
    for key, value in sorted(metrics.items()):
        print(f"  {key:<{width}}  {100 * value:6.2f}%")
    return 0


def _tracked_run(args):
    """(tracker, run) for a RUN_ID argument; a missing store or run is a one-line error."""
    from sslab.platform.tracking import Tracker

    uri = _existing_store(args)
    tracker = Tracker(uri)
    try:
        return tracker, tracker.client.get_run(args.run)
    except Exception:
        raise ConfigError(uri, "RUN", f"no MLflow run {args.run!r}") from None


def cmd_export(args) -> int:
    """Writes a trial's encoder to --out (weights in torchvision / timm layout, input statistics,
    loader) and prints the lines that load it."""
    import json
    import shutil
    import tempfile

    from sslab.platform.export import load_lines
    from sslab.platform.run_artifacts import logged_export

    out = Path(args.out).resolve()
    _check_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError("--out", str(out), "is not empty (--force writes the export into it anyway)")
    tracker, run = _tracked_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = logged_export(tracker, run, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        for name in ("encoder.pt", "encoder.json", "load.py"):
            shutil.copy2(folder / name, out / name)
    info = json.loads((out / "encoder.json").read_text())
    print(
        f"run {args.run} ({run.info.run_name}): {info['method']} encoder, {info['architecture']}, "
        f"{info['feature_dim']}-d features, written to {out}"
    )
    if "mean" in info:
        print(f"input: RGB in [0, 1], normalised with mean {info['mean']} and std {info['std']}")
    print("load it with:")
    for line in load_lines(info, str(out)):
        print("    " + line)
    return 0


def cmd_methods(args) -> int:
    from sslab.methods.registry import METHODS

    for name, cls in sorted(METHODS.items()):
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph
        print(f"{name}: {summary}")
        for f in dataclasses.fields(cls.Args):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"    {f.name}: {getattr(f.type, '__name__', f.type)} = {default!r}")
        if cls.small_image_args():
            small = ", ".join(f"{k}={v!r}" for k, v in cls.small_image_args().items())
            print(f"    images <= {cls.SMALL_IMAGE_SIZE} px default to: {small}")
        for size, recipe in (
            ("images", cls.train_recipe),
            (f"images <= {cls.SMALL_IMAGE_SIZE} px", cls.small_image_train_recipe),
        ):
            if recipe:
                print(f"    train recipe ({size}): " + ", ".join(f"{k}={v!r}" for k, v in recipe.items()))
        if cls.data_kind == "video":
            print("    trains on video clips (synthetic_video, videofolder); evaluated by mask propagation")
        views = cls.views(cls.Args(), image_size=32)
        print(
            "    views (augment.views.<name>): "
            + ", ".join(f"{view}" + (f" x{v.count}" if v.count != 1 else "") for view, v in views.items())
        )
    return 0


def cmd_ui(args) -> int:
    uri = _tracking_uri(args)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        # One worker: a person browsing their own studies
        "--workers",
        "1",
    ]
    from sslab.platform.tracking import UI_MODEL_TRAINING

    address = f"http://127.0.0.1:{args.port}/#/experiments{UI_MODEL_TRAINING}"
    print(f"MLflow UI for {uri} on {address}", flush=True)
    # MLflow's job runner (six huey consumers, ~225 MB each) serves GenAI jobs; sslab starts none.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)


def cmd_bench(args) -> int:
    from sslab.benchmarks.bench import main as bench_main

    return bench_main(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sslab")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sslab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def study_command(name: str, help_text: str, fn):
        p = sub.add_parser(name, help=help_text)
        by_name = name in ("report", "compare")  # they read the store: a name is enough
        p.add_argument("study", help="study YAML file" + (" or study name" if by_name else ""))
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override any key by its dotted path, e.g. train.epochs=2",
        )
        p.set_defaults(fn=fn)
        return p

    def common(p):
        p.add_argument(
            "--workdir",
            help="where checkpoints, Ray state and the default MLflow store "
            "live (default ./sslab-runs or $SSLAB_WORKDIR)",
        )
        p.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default: sqlite file in the workdir, or $MLFLOW_TRACKING_URI)",
        )
        p.add_argument(
            "--reports",
            help="folder for <study>/report.md (default ./reports; `run` with --set: the workdir's reports/)",
        )

    validate = study_command("validate", "check a study file without running it", cmd_validate)
    validate.add_argument(
        "--no-estimate", action="store_true", help="skip the cost estimate (it measures a few steps)"
    )
    run = study_command("run", "run a study on Ray, track it in MLflow, write its report", cmd_run)
    common(run)
    run.add_argument("--ray-address", help="join an existing Ray cluster (default: local; or $RAY_ADDRESS)")
    run.add_argument("--resume", action="store_true", help="finish the last invocation's unfinished trials")
    run.add_argument("--no-report", action="store_true")
    run.add_argument("--estimate-only", action="store_true", help="print the study's cost and stop")
    run.add_argument("--no-estimate", action="store_true", help="skip the cost estimate at the start")
    run.add_argument(
        "--verbose", action="store_true", help="also Ray Tune's status table and MLflow's INFO lines"
    )
    run.add_argument(
        "--register", metavar="NAME", help="register every trial's encoder as model NAME in MLflow"
    )
    report = study_command("report", "rebuild reports/<study>/ from MLflow", cmd_report)
    common(report)
    report.add_argument("--parent-run", help="the study invocation (default: the latest)")
    compare = study_command(
        "compare", "print each point's result over its seeds, the best point and its lead", cmd_compare
    )
    common(compare)
    compare.add_argument("--parent-run", help="the study invocation (default: the latest)")
    listing = sub.add_parser("ls", help="list the studies in a store and each invocation of them")
    common(listing)
    listing.set_defaults(fn=cmd_ls)
    sub.add_parser("methods", help="list methods and their arguments").set_defaults(fn=cmd_methods)
    ev = sub.add_parser(
        "eval", help="evaluate a run's checkpoint (kNN, linear probe, fine-tuning, few labels)"
    )
    ev.add_argument("run", help="MLflow run id of a trial (see the report's run links)")
    ev.add_argument(
        "--protocol",
        action="append",
        choices=["knn", "linear", "finetune"],
        help="repeatable; default: the study's eval.protocols",
    )
    ev.add_argument(
        "--label-fraction",
        action="append",
        type=float,
        help="repeatable, e.g. 0.01 0.1 1; default: the study's eval.label_fractions",
    )
    ev.add_argument("--random-init", action="store_true", help="also the same backbone at random init")
    ev.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override e.g. eval.finetune_epochs=5"
    )
    ev.add_argument("--device")
    common(ev)
    ev.set_defaults(fn=cmd_eval)
    ex = sub.add_parser(
        "export", help="write a trial's encoder in torchvision / timm layout, print how to load it"
    )
    ex.add_argument("run", help="MLflow run id of a trial (see the report's run links)")
    ex.add_argument("--out", required=True, help="folder for encoder.pt, encoder.json and load.py")
    ex.add_argument("--force", action="store_true", help="write into --out even if it holds files")
    common(ex)
    ex.set_defaults(fn=cmd_export)
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    common(ui)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=cmd_ui)
    bench = sub.add_parser(
        "bench", help="throughput: sslab's data path vs a DataLoader pipeline vs the bare step"
    )
    from sslab.benchmarks.bench_args import add_arguments

    add_arguments(bench)
    bench.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed, recorded with a study (reports show it)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DiskFull as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"error: {err.filename or ''}: no space left on device", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
