"""Typed study schema: YAML -> dataclasses, with every error naming the file and the key path.

A study is validated in full before anything runs: unknown keys, wrong types, out-of-range
values, an unknown method and a missing data path are all `ConfigError`s.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A bad study file: `str(err)` is the one line shown to the user."""

    def __init__(self, source: str, key: str, message: str):
        message = " ".join(str(message).split())  # one line, whatever it quotes
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # Ray copies and pickles a trial's exception: rebuild from our fields
        return type(self), (self.source, self.key, self.message)


def check(
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default: Any = dataclasses.MISSING,
    **kwargs,
) -> Any:
    """A dataclass field with a numeric range that `from_dict` enforces."""
    bounds = {k: v for k, v in dict(gt=gt, ge=ge, le=le, lt=lt).items() if v is not None}
    return field(default=default, metadata={"bounds": bounds}, **kwargs)


@dataclass
class DataConfig:
    # synthetic: the embedded generated dataset; cifar10/cifar100/stl10: torchvision;
    # imagefolder: a tree with train/<class>/* and test/<class>/*.
    name: str = "synthetic"  # a key of platform/data.py's DATASETS
    root: Optional[str] = None
    download: bool = False
    subset: Optional[int] = check(default=None, gt=0)  # train images kept (deterministic)
    test_subset: Optional[int] = check(default=None, gt=0)
    image_size: int = check(default=32, ge=8)  # synthetic size; others resized to it
    train_size: int = check(default=5000, gt=0)  # synthetic only
    test_size: int = check(default=1000, gt=0)  # synthetic only
    seed: int = 0  # synthetic generation / subsets
    # Pretraining images without labels: a folder read recursively (any common image format), or
    # "stl10:train+unlabeled" (STL-10's 105,000 images, torchvision's, under data.root). The
    # labelled sets above then serve evaluation only (kNN, probes, fine-tuning).
    pretrain: Optional[str] = None
    pretrain_subset: Optional[int] = check(default=None, gt=0)  # pretraining images kept
    # Video datasets (synthetic_video, videofolder: root/train/<clip>/<frames>, root/test/<clip>/
    # with masks/): frames per clip. train_size / test_size / subset then count clips.
    clip_length: int = check(default=8, ge=2)
    # Image files (imagefolder splits, a data.pretrain folder) held decoded in memory ("memory"),
    # or decoded per batch by `stream_workers` processes ("stream": memory holds a few batches);
    # "auto" streams a split whose uint8 tensor would exceed memory_limit_mb.
    loading: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_mb: float = check(default=8192, gt=0)
    stream_workers: int = check(default=2, ge=0)
    # Who decodes streamed batches: DataLoader processes of each training process, or Ray Data
    # tasks anywhere on the cluster (trials on Ray; in-process the plain iterator). Same order.
    # auto: Ray Data on a cluster of several nodes, DataLoader processes on one.
    stream_engine: Literal["auto", "dataloader", "ray_data"] = "auto"
    # Streaming: unreadable files are skipped with a warning; more than this fraction fails the run.
    max_bad_fraction: float = check(default=0.01, ge=0, le=1)
    # Streaming: pretraining batches decoded at this size (e.g. 256 for images stored at ~256 px),
    # so the method's random crops come from the stored detail, then go down to image_size.
    # None: decoded at image_size (crops from the shrunk square). Evaluation reads image_size.
    source_size: Optional[int] = check(default=None, ge=8)


@dataclass
class BackboneConfig:
    name: str = "resnet18"  # a key of platform/backbones.py's BACKBONES
    cifar_stem: bool = True  # 3x3 stride-1 first conv, no max-pool (for 32x32 images)
    width: float = check(default=1.0, gt=0)
    patch_size: int = check(default=4, ge=1)


@dataclass
class AugmentOverrides:
    """Overrides of a method's augmentation recipe; a field left as None keeps the method's value."""

    crop_scale_min: Optional[float] = check(default=None, gt=0, le=1)
    crop_scale_max: Optional[float] = check(default=None, gt=0, le=1)
    flip_p: Optional[float] = check(default=None, ge=0, le=1)
    jitter_strength: Optional[float] = check(default=None, ge=0)
    jitter_p: Optional[float] = check(default=None, ge=0, le=1)
    grayscale_p: Optional[float] = check(default=None, ge=0, le=1)
    blur_p: Optional[float] = check(default=None, ge=0, le=1)
    solarize_p: Optional[float] = check(default=None, ge=0, le=1)


@dataclass
class AugmentConfig(AugmentOverrides):
    """Overrides for every view the method declares, and under `views.<name>` for one view
    (e.g. DINO's `local` crops): `sslab methods` lists each method's views."""

    views: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = check(default=10, gt=0)
    batch_size: int = check(default=256, gt=1)  # global, split across workers
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = check(default=0.06, gt=0)
    # How lr follows the batch size B (SimCLR App. B.1): none (lr as given), linear
    # (lr * B / 256) or sqrt (lr * sqrt(B / 256)); lr is then the rate at batch 256.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    weight_decay: float = check(default=5e-4, ge=0)
    momentum: float = check(default=0.9, ge=0, lt=1)
    warmup_epochs: float = check(default=0, ge=0)
    # bf16 autocast (fp32 where the device has no native bf16) and channels_last: 3.0x the fp32
    # step on this project's AVX512-BF16 CPU, and learning alike (benchmarks/README.md).
    amp: bool = True
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone (in place): pays off past ~1,500 steps here
    num_workers: int = check(default=1, ge=1)  # >1: Ray Train TorchTrainer with DDP
    use_gpu: bool = False
    gpus_per_worker: float = check(default=1.0, gt=0, le=1)  # < 1: trials share a GPU
    cpus_per_worker: Optional[float] = check(default=None, gt=0)  # None: CPUs / concurrent workers
    checkpoint_every: int = check(default=1, ge=1)  # epochs
    # Also every this many optimiser steps inside an epoch (0: off), for long epochs (streamed
    # data): a resumed trial continues the epoch's order from the step after the saved one.
    checkpoint_every_steps: int = check(default=0, ge=0)
    report_every_steps: int = check(default=50, ge=1)
    max_failures: int = check(default=0, ge=0)  # worker restarts (from the last checkpoint)
    seed: int = 0  # set per trial from the study's `seeds`


@dataclass
class EvalConfig:
    knn_k: int = check(default=200, gt=0)
    knn_temperature: float = check(default=0.1, gt=0)
    knn_every: int = check(default=0, ge=0)  # epochs; 0 = only before and after training
    # Every protocol also at these fractions of training (e.g. [0.125, 0.25, 0.5]), logged at their
    # epoch under the same eval/ keys: a report follows each effect through training.
    probe_at: list[float] = field(default_factory=list)
    random_init_baseline: bool = True
    # End-of-pretraining protocols (logged as eval/<protocol>_top1), also run by `sslab eval`;
    # kNN runs whatever this lists (it is the monitor).
    protocols: list[Literal["knn", "linear", "finetune"]] = field(default_factory=lambda: ["knn", "linear"])
    label_fractions: list[float] = field(default_factory=lambda: [1.0])  # e.g. [0.01, 0.1, 1.0]
    linear_l2: float = check(default=1e-4, gt=0)
    finetune_epochs: int = check(default=10, gt=0)
    finetune_lr: float = check(default=0.05, gt=0)
    # Video datasets: the first frame's masks propagated through each test clip by feature
    # affinity (each pixel takes the labels of its `propagation_topk` most similar pixels of the
    # first frame and of the `propagation_context` frames before it, softmax at this temperature).
    propagation_temperature: float = check(default=0.07, gt=0)
    propagation_topk: int = check(default=10, gt=0)
    propagation_context: int = check(default=1, ge=0)


@dataclass
class SchedulerConfig:
    """Tune trial scheduler. ASHA stops weak trials at rungs grace_period * reduction_factor^k
    (epochs). Early kNN accuracy predicts final rank poorly in SSL: keep the grace long.
    PBT (Jaderberg et al. 2017): every `perturbation_interval` epochs the bottom `quantile_fraction`
    of the population copies a top trial's checkpoint and moves each key of `mutations` to a
    neighbouring value of its list (or, with `resample_probability`, any value of it)."""

    name: Literal["fifo", "asha", "pbt"] = "fifo"
    metric: str = "knn_top1"
    mode: Literal["max", "min"] = "max"
    grace_period: int = check(default=10, ge=1)
    reduction_factor: int = check(default=2, ge=2)
    perturbation_interval: int = check(default=2, ge=1)  # epochs
    mutations: dict = field(default_factory=dict)  # dotted key -> list of values
    quantile_fraction: float = check(default=0.25, gt=0, le=0.5)
    resample_probability: float = check(default=0.25, ge=0, le=1)


@dataclass
class SearchConfig:
    """How sweep points are chosen. grid: every combination of the sweep's lists. random and
    optuna: `num_samples` points, each key drawn from its list or distribution ({uniform: [lo, hi]},
    {loguniform: [lo, hi]}, {choice: [...]}); optuna (TPE) proposes each point from the results
    so far, scored by the scheduler's metric averaged over the seeds."""

    name: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = check(default=8, ge=1)
    seed: int = 0


@dataclass
class PaperConfig:
    """What a paper reports for the ablation this study reproduces. Reports put it beside our
    numbers and give a verdict from the orderings it implies."""

    reference: str = ""  # paper and section / table / figure
    claim: str = ""  # the claim, in a sentence or two
    metric: str = "eval/linear_top1"  # our metric that stands for the paper's
    # sweep point (its trial name without the seed, e.g. "temperature=0.1") -> the paper's number
    results: dict = field(default_factory=dict)
    # orderings the claim implies, "POINT > POINT" (also derived from `results`)
    expect: list[str] = field(default_factory=list)
    tie: float = check(default=1.0, ge=0)  # paper gaps below this many points imply no order


@dataclass
class StudyConfig:
    name: str
    method: str = "simclr"
    method_args: dict = field(default_factory=dict)
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    # dotted key -> list of values (a grid), and/or `points`: a list of override sets
    # ({method: moco_v2, train.lr: 0.06}) crossed with the grid; every point runs once per seed
    sweep: dict = field(default_factory=dict)
    max_concurrent_trials: int = check(default=1, ge=1)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    # MLflow: each trial logs its encoder as an MLflow model (a torch.export program) and, with a
    # name here (or `sslab run --register NAME`), registers it in the model registry.
    log_model: bool = True
    register_model: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_SCALARS = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Checks `value` against the annotation `tp` and returns it converted (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        return _convert(value, non_none[0], key, source)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(source, key, f"{value!r} is not {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        accepted, expected = _SCALARS[tp]
        # bool is an int subclass in Python: `true` is not a batch size
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(source, key, f"expected {expected}, got {value!r}")
        if tp is float and not math.isfinite(value):
            raise ConfigError(source, key, f"{value!r} is not a finite number")
        return float(value) if tp is float else value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def _check_bounds(value: Any, bounds: dict, key: str, source: str) -> None:
    if value is None:
        return
    tests = {
        "gt": (lambda v, b: v > b, ">"),
        "ge": (lambda v, b: v >= b, ">="),
        "lt": (lambda v, b: v < b, "<"),
        "le": (lambda v, b: v <= b, "<="),
    }
    for name, bound in bounds.items():
        ok, symbol = tests[name]
        if not ok(value, bound):
            raise ConfigError(source, key, f"{value!r} is out of range (must be {symbol} {bound})")


def from_dict(cls: type, data: dict, source: str = "<config>", prefix: str = "") -> Any:
    """Builds dataclass `cls` from `data`, rejecting unknown keys, wrong types and bad ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(source, _join(prefix, key), f"unknown key ({hint}known: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "is required")
            continue
        value = _convert(data[name], hints[name], key, source)
        _check_bounds(value, f.metadata.get("bounds", {}), key, source)
        kwargs[name] = value
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ----------------------------------------------------------------------------- overrides


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; learning rates and weight
    decays are written that way, so floats follow YAML 1.2 here. Aliases (`*name`) are refused:
    a few hundred bytes of nested aliases expand to gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)

MAX_STUDY_BYTES = 1_000_000


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    return f"invalid YAML{where} ({getattr(err, 'problem', None) or err})"


def parse_override(text: str, source: str = "--set") -> tuple[str, Any]:
    """'train.epochs=2' -> ('train.epochs', 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(source, text, "expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        return key, parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(source, key, _yaml_problem(err)) from None


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Sets `a.b.c` in nested dicts, creating the mappings on the way."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("--set", dotted, f"{part!r} is not a mapping")
    node[parts[-1]] = value


def get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1} (lists stay values)."""
    flat = {}
    for key, value in data.items():
        dotted = _join(prefix, key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    if path.stat().st_size > MAX_STUDY_BYTES:
        raise ConfigError(str(path), "", f"larger than {MAX_STUDY_BYTES} bytes: not a study file")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), "", f"not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", _yaml_problem(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "a study file must be a YAML mapping")
    return data


def build_study(raw: dict, source: str = "<config>") -> StudyConfig:
    """Validates a raw study dict in full, including method_args, data paths and the sweep."""
    from sslab.methods.registry import get_method_class  # late: methods import the platform

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
    if method_cls.backbones and study.backbone.name not in method_cls.backbones:
        raise ConfigError(
            source,
            "backbone.name",
            f"{study.backbone.name!r}: method {study.method!r} "
            f"needs one of {', '.join(method_cls.backbones)}",
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
    from sslab.platform.backbones import BACKBONES
    from sslab.platform.data import DATASETS

    for key, name, table in (
        ("backbone.name", study.backbone.name, BACKBONES),
        ("data.name", study.data.name, DATASETS),
    ):
        if name not in table:
            raise ConfigError(source, key, f"{name!r} is not one of {', '.join(repr(k) for k in table)}")


def _check_views(study: StudyConfig, method_cls, source: str) -> None:
    """Per-view overrides name views the method declares; every view's crop range is a range."""
    from sslab.platform.augment import resolve_views

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


STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def check_study_name(name: str, source: str, key: str = "name") -> None:
    """A study's name becomes folders (workdir, reports) and an MLflow experiment: an identifier."""
    if not STUDY_NAME.fullmatch(name):
        raise ConfigError(
            source,
            key,
            f"{name!r} is not a study name (letters, digits, '_', '.', '-'; "
            "at most 100, not starting with '.' or '-')",
        )


def _check_seeds(seeds: list[int], source: str) -> None:
    if not seeds:
        raise ConfigError(source, "seeds", "needs at least one seed")
    _check_unique(seeds, "seeds", source)


def _check_unique(values: list, key: str, source: str) -> None:
    seen = []
    for i, value in enumerate(values):
        if value in seen:
            raise ConfigError(source, f"{key}[{i}]", f"{value!r} is listed twice")
        seen.append(value)


def _check_data_kind(study: StudyConfig, method_cls, source: str) -> None:
    """Video methods train on clips, image methods on images: the dataset must be of the right kind."""
    from sslab.platform.data import VIDEO

    kind = "video" if study.data.name in VIDEO else "images"
    if kind != method_cls.data_kind:
        raise ConfigError(
            source,
            "data.name",
            f"{study.data.name!r} holds {'clips' if kind == 'video' else 'images'}; method "
            f"{study.method!r} trains on {'clips' if method_cls.data_kind == 'video' else 'images'} "
            f"(video datasets: {', '.join(sorted(VIDEO))})",
        )
    if kind == "video" and study.data.pretrain is not None:
        raise ConfigError(source, "data.pretrain", "video datasets have no separate pretraining images")
    problem = method_cls.check_clip_length(method_cls.Args(**study.method_args), study.data.clip_length)
    if kind == "video" and problem:
        raise ConfigError(source, "data.clip_length", problem)


def _check_source_size(data: DataConfig, source: str) -> None:
    """Crops from the stored resolution are read from the pretraining files each batch."""
    from sslab.platform.data import STL10_UNLABELED

    if data.source_size is None:
        return
    if data.source_size < data.image_size:
        raise ConfigError(
            source,
            "data.source_size",
            f"{data.source_size} is below data.image_size={data.image_size}: crops are taken from "
            "it down to image_size",
        )
    pretrain_files = data.pretrain not in (None, STL10_UNLABELED) or (
        data.pretrain is None and data.name == "imagefolder"
    )
    if not pretrain_files:
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
    from sslab.platform.data import STL10_UNLABELED

    has_files = data.name == "imagefolder" or data.pretrain not in (None, STL10_UNLABELED)
    if data.loading == "stream" and not has_files:
        raise ConfigError(
            source,
            "data.loading",
            f"'stream' reads image files: data.name {data.name!r} has none "
            "(imagefolder, or a data.pretrain folder, streams)",
        )
    _check_source_size(data, source)
    if data.name in ("synthetic", "synthetic_video"):
        return
    if data.root is None:
        raise ConfigError(source, "data.root", f"required for data.name={data.name!r}")
    root = Path(data.root).expanduser()
    if data.name == "videofolder":
        from sslab.platform.data import DataError, scan_video_folder

        try:
            scan_video_folder(root.resolve(), data.clip_length)
        except (DataError, OSError) as err:
            raise ConfigError(source, "data.root", str(err)) from None
    elif data.name == "imagefolder":
        from sslab.platform.data import DataError, scan_image_folder

        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise ConfigError(source, "data.root", f"{root / split} is not a directory")
        try:
            scan_image_folder(root.resolve())
        except (DataError, OSError) as err:
            raise ConfigError(source, "data.root", str(err)) from None
    elif not data.download and not root.is_dir():
        raise ConfigError(source, "data.root", f"{root} does not exist (set data.download: true to fetch it)")


def _check_pretrain(data: DataConfig, source: str) -> None:
    from sslab.platform.data import STL10_UNLABELED, DataError, scan_unlabelled_folder

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


DISTRIBUTIONS = ("uniform", "loguniform", "choice")


def as_distribution(value: Any) -> tuple[str, list] | None:
    """{uniform: [lo, hi]} -> ("uniform", [lo, hi]); a plain list (grid values) -> None."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
        return next(iter(value.items()))
    return None


def _check_sweep(raw: dict, study: StudyConfig, source: str) -> None:
    """Every swept value, every `points` entry and both ends of every range must give a valid study."""
    sampled = study.search.name != "grid"
    for dotted, values in study.sweep.items():
        key = f"sweep.{dotted}"
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


def short_key(dotted: str) -> str:
    """A dotted key's last part (method_args.temperature -> temperature)."""
    return dotted.rsplit(".", 1)[-1]


def point_keys(dotted_keys: list[str]) -> dict[str, str]:
    """How swept keys appear in point and trial names: their last part, or the whole dotted key
    where the last part would be ambiguous (data.seed beside the trial's seed; two keys ending
    alike), so that no two points share a name."""
    lasts = [short_key(k) for k in dotted_keys]
    return {k: k if last == "seed" or lasts.count(last) > 1 else last for k, last in zip(dotted_keys, lasts)}


def parse_expectation(text: str) -> tuple[str, str]:
    """'temperature=0.1 > temperature=1.0' -> ('temperature=0.1', 'temperature=1.0')."""
    better, sep, worse = text.partition(">")
    if not sep or not better.strip() or not worse.strip() or ">" in worse:
        raise ValueError(f"{text!r} is not of the form 'POINT > POINT'")
    return better.strip(), worse.strip()


def _check_paper(study: StudyConfig, source: str) -> None:
    """The points the paper section names must use the sweep's keys (a typo fails early); a
    value not in the sweep is allowed (`--set sweep...` may change the values) and is reported
    as not run."""
    for point, value in study.paper.results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(source, f"paper.results.{point}", f"expected a finite number, got {value!r}")
    if not study.sweep:
        return  # a single trial: its sweep was already expanded
    swept = [k for k in study.sweep if k != "points"]
    swept += [k for point in study.sweep.get("points", []) for k in point]
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
    from sslab.platform.data import train_set_size

    train = study.train
    images = train_set_size(study.data)
    if images is not None and train.batch_size > images:
        raise ConfigError(
            source, "train.batch_size", f"{train.batch_size} is more than the {images} training images (data)"
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
    for text in overrides:
        key, value = parse_override(text, source=f"{source} --set")
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
    return build_study(raw, source), raw
