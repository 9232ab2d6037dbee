"""Validation of a whole study, above the schema (config.py) and the registries it checks
against: methods (their arguments, views and data kind), backbones and datasets (names, roots,
sizes). `load_study` and `build_study` are the only ways in; a study is checked once, on the
driver, and each trial's study is built from it once (spec.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

from sslab.methods.registry import get_method_class
from sslab.platform.augment import resolve_views
from sslab.platform.backbones import BACKBONES
from sslab.platform.config import (
    SEED_KEY,
    STUDY_NAME,
    AugmentOverrides,
    ConfigError,
    DataConfig,
    StudyConfig,
    TrainConfig,
    as_distribution,
    check_study_name,
    from_dict,
    load_yaml,
    parse_expectation,
    parse_override,
    point_keys,
    set_dotted,
)
from sslab.platform.data import (
    DATASETS,
    STL10_UNLABELED,
    DataError,
    pretrains_on_files,
    scan_unlabelled_folder,
    train_set_size,
)


def build_study(raw: dict, source: str = "<config>") -> StudyConfig:
    """Validates a raw study dict in full, including method_args, data paths and the sweep."""
    study = from_dict(StudyConfig, raw, source)
    check_study_name(study.name, source)
    if study.register_model and not STUDY_NAME.fullmatch(study.register_model):
        raise ConfigError(
            source, "register_model", f"{study.register_model!r} is not a model name (letters, digits, _ . -)"
        )
    _check_registered(study, source)
    _check_seeds(study.seeds, source)
    try:
        method_cls = get_method_class(study.method)
    except KeyError as err:
        raise ConfigError(source, "method", str(err.args[0])) from None
    # A method's defaults may depend on the image size (declared in its file); the study's win.
    recipe = method_cls.default_train(study.data.image_size)
    if recipe and isinstance(raw.get("train", {}), dict):
        study.train = from_dict(TrainConfig, recipe | (raw.get("train") or {}), source, prefix="train")
    method_args = method_cls.default_args(study.data.image_size) | (study.method_args or {})
    study.method_args = dataclasses.asdict(
        from_dict(method_cls.Args, method_args, source, prefix="method_args")
    )
    if study.data.pretrain is not None and method_cls.pairs_images_with_labels:
        raise ConfigError(
            source,
            "data.pretrain",
            f"method {study.method!r} pairs each training image with its caption or label; "
            "unlabelled pretraining images have neither",
        )
    problem = method_cls.check_args(method_cls.Args(**study.method_args), study.data.image_size)
    if problem:
        raise ConfigError(source, "method_args", problem)
    family = method_cls.backbone_family
    if family and BACKBONES[study.backbone.name].family != family:
        names = [name for name, entry in BACKBONES.items() if entry.family == family]
        raise ConfigError(
            source,
            "backbone.name",
            f"{study.backbone.name!r}: method {study.method!r} needs one of {', '.join(names)} ({family})",
        )
    _check_views(study, method_cls, source)
    _check_data_kind(study, method_cls, source)
    _check_data(study.data, source)
    _check_sweep(raw, study, source)
    _check_train(study, source)
    _check_eval(study, source)
    _check_paper(study, source)
    return study


def _check_registered(study: StudyConfig, source: str) -> None:
    """Backbone and dataset names are the keys of their registries (one table each)."""

    for key, name, table in (
        ("backbone.name", study.backbone.name, BACKBONES),
        ("data.name", study.data.name, DATASETS),
    ):
        if name not in table:
            raise ConfigError(source, key, f"{name!r} is not one of {', '.join(repr(k) for k in table)}")


def _check_views(study: StudyConfig, method_cls, source: str) -> None:
    """Per-view overrides name views the method declares; every view's crop range is a range."""

    declared = method_cls.views(method_cls.Args(**study.method_args), study.data.image_size)
    for name, overrides in study.augment.views.items():
        if name not in declared:
            raise ConfigError(
                source,
                f"augment.views.{name}",
                f"method {study.method!r} has no view {name!r} (its views: {', '.join(declared)})",
            )
        study.augment.views[name] = from_dict(
            AugmentOverrides, overrides or {}, source, f"augment.views.{name}"
        )
    for name, view in resolve_views(declared, study.augment).items():
        # (a view drawn zero times, such as DINO's local crops at 32 px, is never built)
        if view.count and view.recipe.crop_scale_min > view.recipe.crop_scale_max:
            raise ConfigError(
                source,
                "augment",
                f"view {name!r}: crop_scale_min {view.recipe.crop_scale_min} "
                f"> crop_scale_max {view.recipe.crop_scale_max}",
            )


MAX_SEED = 2**31 - 1  # MLflow stores params and metrics in sqlite's 64-bit integers; torch takes any


def _check_seeds(seeds: list[int], source: str) -> None:
    if not seeds:
        raise ConfigError(source, "seeds", "needs at least one seed")
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(source, f"seeds[{i}]", f"{seed} is not in [0, {MAX_SEED}]")
    _check_unique(seeds, "seeds", source)


def _check_unique(values: list, key: str, source: str) -> None:
    seen = []
    for i, value in enumerate(values):
        if value in seen:
            raise ConfigError(source, f"{key}[{i}]", f"{value!r} is listed twice")
        seen.append(value)


def _check_data_kind(study: StudyConfig, method_cls, source: str) -> None:
    """Video methods train on clips, image methods on images: the dataset must be of the right kind."""
    kind = DATASETS[study.data.name].kind
    if kind != method_cls.data_kind:
        video = sorted(name for name, entry in DATASETS.items() if entry.kind == "video")
        raise ConfigError(
            source,
            "data.name",
            f"{study.data.name!r} holds {'clips' if kind == 'video' else 'images'}; method "
            f"{study.method!r} trains on {'clips' if method_cls.data_kind == 'video' else 'images'} "
            f"(video datasets: {', '.join(video)})",
        )
    if kind == "video" and study.data.pretrain is not None:
        raise ConfigError(source, "data.pretrain", "video datasets have no separate pretraining images")
    problem = method_cls.check_clip_length(method_cls.Args(**study.method_args), study.data.clip_length)
    if kind == "video" and problem:
        raise ConfigError(source, "data.clip_length", problem)


def _check_source_size(data: DataConfig, source: str) -> None:
    """Crops from the stored resolution are read from the pretraining files each batch."""

    if data.source_size is None:
        return
    if data.source_size < data.image_size:
        raise ConfigError(
            source,
            "data.source_size",
            f"{data.source_size} is below data.image_size={data.image_size}: crops are taken from "
            "it down to image_size",
        )
    if not pretrains_on_files(data):
        raise ConfigError(
            source,
            "data.source_size",
            "decodes the pretraining image files per batch: they are not files here "
            "(imagefolder, or a data.pretrain folder, has them)",
        )
    if data.loading == "memory":
        raise ConfigError(
            source,
            "data.source_size",
            "needs the pretraining files streamed (data.loading: auto or stream), not held in memory",
        )


def _check_data(data: DataConfig, source: str) -> None:
    _check_pretrain(data, source)
    if data.loading == "stream" and not pretrains_on_files(data):
        raise ConfigError(
            source,
            "data.loading",
            f"'stream' reads image files: data.name {data.name!r} has none "
            "(imagefolder, or a data.pretrain folder, streams)",
        )
    _check_source_size(data, source)
    entry = DATASETS[data.name]
    if entry.generated:
        return
    if data.root is None:
        raise ConfigError(source, "data.root", f"required for data.name={data.name!r}")
    try:
        entry.check_root(data)
    except (DataError, OSError) as err:
        raise ConfigError(source, "data.root", str(err)) from None


def _check_pretrain(data: DataConfig, source: str) -> None:

    if data.pretrain is None:
        return
    if data.pretrain == STL10_UNLABELED:
        if data.name != "stl10":
            raise ConfigError(source, "data.pretrain", f"{STL10_UNLABELED} needs data.name: stl10 (its root)")
        return
    folder = Path(data.pretrain).expanduser()
    if not folder.is_dir():
        raise ConfigError(source, "data.pretrain", f"{folder} is not a directory")
    try:
        scan_unlabelled_folder(folder.resolve())
    except (DataError, OSError) as err:
        raise ConfigError(source, "data.pretrain", str(err)) from None


def _check_sweep(raw: dict, study: StudyConfig, source: str) -> None:
    """Every swept value, every `points` entry and both ends of every range must give a valid study."""
    sampled = study.search.name != "grid"
    for dotted, values in study.sweep.items():
        key = f"sweep.{dotted}"
        points = values if dotted == "points" and isinstance(values, list) else []
        if dotted == SEED_KEY or any(isinstance(p, dict) and SEED_KEY in p for p in points):
            raise ConfigError(
                source, key, f"{SEED_KEY} is not swept: each point runs once per seed of `seeds`"
            )
        spec = as_distribution(values)
        if spec is not None:
            if not sampled:
                raise ConfigError(source, key, f"a {spec[0]} range needs search.name: random or optuna")
            _check_distribution(raw, dotted, spec, key, source)
            continue
        if not isinstance(values, list) or not values:
            raise ConfigError(
                source, key, "expected a non-empty list of values, or {uniform|loguniform|choice: ...}"
            )
        _check_unique(values, key, source)
        if dotted == "points" and study.search.name == "optuna":
            raise ConfigError(source, key, "search.name: optuna samples keys; `points` needs grid or random")
        for i, value in enumerate(values):
            if dotted == "points":
                if not isinstance(value, dict) or not value:
                    raise ConfigError(source, f"{key}[{i}]", "expected a mapping of dotted keys to values")
                _check_overrides(raw, value, f"{key}[{i}]", source)
            else:
                _check_overrides(raw, {dotted: value}, key, source)
    for dotted, values in study.scheduler.mutations.items():
        key = f"scheduler.mutations.{dotted}"
        if not isinstance(values, list) or len(values) < 2:
            raise ConfigError(source, key, "expected a list of at least two values")
        for value in values:
            _check_overrides(raw, {dotted: value}, key, source)
    if study.scheduler.name == "pbt" and study.search.name == "optuna":
        raise ConfigError(
            source, "scheduler.name", "pbt needs search.name grid or random (a fixed population)"
        )
    if study.scheduler.name == "pbt" and not study.scheduler.mutations:
        raise ConfigError(source, "scheduler.mutations", "pbt needs at least one key to mutate")
    if study.scheduler.name == "pbt" and study.train.num_workers > 1:
        raise ConfigError(source, "scheduler.name", "pbt runs single-worker trials (train.num_workers: 1)")
    if study.scheduler.name == "asha" and study.scheduler.grace_period > study.train.epochs:
        raise ConfigError(
            source,
            "scheduler.grace_period",
            f"{study.scheduler.grace_period} is more than train.epochs={study.train.epochs}: "
            "ASHA would stop no trial before its end",
        )
    _check_scheduler_sees_fresh_knn(study, source)


def _check_scheduler_sees_fresh_knn(study: StudyConfig, source: str) -> None:
    """ASHA and PBT compare trials at rungs / perturbations; a kNN metric is fresh only at the
    epochs the monitor runs. Between them every report repeats the last kNN (before the first:
    the random-init one), so a scheduler would rank trials on a stale or untrained number."""
    sched, every = study.scheduler, study.eval.knn_every
    if sched.name == "fifo" or not sched.metric.startswith("knn_"):
        return
    at, epochs = (
        ("grace_period", sched.grace_period)
        if sched.name == "asha"
        else ("perturbation_interval", sched.perturbation_interval)
    )
    if every == 0:
        problem = f"eval.knn_every is 0: {sched.name} would rank trials on the random-init {sched.metric}"
    elif epochs % every:
        problem = (
            f"{epochs} is not a multiple of eval.knn_every={every}: "
            f"{sched.name} would rank on a stale {sched.metric}"
        )
    else:
        return
    raise ConfigError(
        source, f"scheduler.{at}", problem + " (set eval.knn_every, or a scheduler.metric such as loss)"
    )


def _check_distribution(raw: dict, dotted: str, spec: tuple[str, list], key: str, source: str) -> None:
    kind, args = spec
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(source, key, "choice needs a non-empty list")
        for value in args:
            _check_overrides(raw, {dotted: value}, key, source)
        return
    numeric = (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
    )
    if not numeric or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
        raise ConfigError(
            source,
            key,
            f"{kind} needs [low, high] with low < high" + (" and low > 0" if kind == "loguniform" else ""),
        )
    for value in args:
        _check_overrides(raw, {dotted: value}, key, source)


def _check_overrides(raw: dict, overrides: dict, key: str, source: str) -> None:
    trial_raw = copy.deepcopy(raw)
    trial_raw.pop("sweep", None)
    trial_raw.pop("scheduler", None)  # checked once for the study; here it would recurse
    for dotted, value in overrides.items():
        set_dotted(trial_raw, dotted, value)
    try:
        build_study(trial_raw, source)
    except ConfigError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise ConfigError(source, key, f"{shown}: {err.key}: {err.message}") from None


def _check_paper(study: StudyConfig, source: str) -> None:
    """The points the paper section names must use the sweep's keys (a typo fails early); a
    value not in the sweep is allowed (`--set sweep...` may change the values) and is reported
    as not run."""
    for point, value in study.paper.results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(source, f"paper.results.{point}", f"expected a finite number, got {value!r}")
    if not study.sweep:
        return  # a single trial: its sweep was already expanded
    grid = [k for k in study.sweep if k != "points"]
    keys = set(point_keys(grid).values())
    for point in study.sweep.get("points") or [{}]:
        keys |= set(point_keys(grid + [k for k in point if k not in grid]).values())
    named = [("paper.results", str(k)) for k in study.paper.results]
    for i, text in enumerate(study.paper.expect):
        try:
            named += [(f"paper.expect[{i}]", p) for p in parse_expectation(text)]
        except ValueError as err:
            raise ConfigError(source, f"paper.expect[{i}]", str(err)) from None
    for key, point in named:
        unknown = [part for part in point.split(",") if part.split("=", 1)[0] not in keys or "=" not in part]
        if unknown:
            raise ConfigError(
                source,
                key,
                f"{point!r}: {unknown[0]!r} is not KEY=VALUE of a swept key ({', '.join(sorted(keys))})",
            )


def _check_eval(study: StudyConfig, source: str) -> None:
    for key in ("label_fractions", "probe_at"):
        for i, fraction in enumerate(getattr(study.eval, key)):
            if not 0 < fraction <= 1:
                raise ConfigError(source, f"eval.{key}[{i}]", f"{fraction} is not in (0, 1]")


def _check_train(study: StudyConfig, source: str) -> None:

    train = study.train
    images = train_set_size(study.data)
    if images is not None and train.batch_size > images:
        raise ConfigError(
            source, "train.batch_size", f"{train.batch_size} is more than the {images} training images (data)"
        )
    if train.weight_decay_end is not None and train.weight_decay == 0:
        raise ConfigError(
            source, "train.weight_decay_end", "scales the decay from train.weight_decay, which is 0"
        )
    if train.batch_size % train.num_workers:
        raise ConfigError(
            source,
            "train.batch_size",
            f"{train.batch_size} is not divisible by train.num_workers={train.num_workers}",
        )


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[StudyConfig, dict]:
    """Loads, overrides and validates a study file. Returns (typed study, raw dict)."""
    source = str(path)
    raw = load_yaml(path)
    overridden = []
    for text in overrides:
        key, value = parse_override(text, source=f"{source} --set")
        overridden.append(key)
        if key.startswith("sweep."):  # a sweep's keys are themselves dotted paths
            raw.setdefault("sweep", {})[key.removeprefix("sweep.")] = value
        else:
            set_dotted(raw, key, value)
    if "name" not in raw:
        raw["name"] = Path(path).stem
    for key in ("root", "pretrain"):
        path = (raw.get("data") or {}).get(key)
        if isinstance(path, str) and path and ":" not in path and not Path(path).expanduser().is_absolute():
            # Trials run in other folders (Ray moves them): a path relative to here is made absolute.
            raw["data"][key] = str(Path(path).expanduser().resolve())
    try:
        return build_study(raw, source), raw
    except ConfigError as err:
        # A mistake in a value given with --set is named there, not in the file
        if any(_same_branch(err.key, key) for key in overridden):
            raise ConfigError(f"{source} --set", err.key, err.message) from None
        raise


def _same_branch(a: str, b: str) -> bool:
    """'train.epoks' and 'train.epoks', or one a parent of the other ('sweep.x' and 'sweep.x[1]')."""
    a, b = a.split("[")[0], b.split("[")[0]
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


RECIPE_KEYS = (
    "optimizer",
    "lr",
    "lr_scaling",
    "weight_decay",
    "weight_decay_end",
    "momentum",
    "warmup_epochs",
    "lars_eta",
    "adamw_beta2",
)


def train_sources(study: StudyConfig, raw: dict, overrides: list[str] = ()) -> dict[str, str]:
    """Where each training-recipe value of a study came from: `--set`, the study file, the
    method's (small-image) recipe, or sslab's default."""
    method_cls = get_method_class(study.method)
    recipe = method_cls.default_train(study.data.image_size)
    small = recipe is method_cls.small_image_train_recipe
    set_keys = {parse_override(text)[0] for text in overrides}
    sources = {}
    for key in RECIPE_KEYS:
        if f"train.{key}" in set_keys:
            sources[key] = "--set"
        elif key in (raw.get("train") or {}):
            sources[key] = "study"
        elif key in recipe:
            sources[key] = f"{study.method} {'small-image ' if small else ''}recipe"
        else:
            sources[key] = "sslab default"
    return sources
