"""Typed study schema: YAML -> dataclasses, with every error naming the file and the key path.

A study is validated in full before anything runs: unknown keys, wrong types, out-of-range
values, an unknown method and a missing data path are all `ConfigError`s.
"""

from __future__ import annotations

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
    # synthetic size; others resized to it. At most 1024: a batch of 256 such images is 800 MB as uint8.
    image_size: int = check(default=32, ge=8, le=1024)
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
    source_size: Optional[int] = check(default=None, ge=8, le=4096)


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
    # A cosine from weight_decay to this over training (DINO: 0.04 -> 0.4); None: constant.
    weight_decay_end: Optional[float] = check(default=None, ge=0)
    momentum: float = check(default=0.9, ge=0, lt=1)
    warmup_epochs: float = check(default=0, ge=0)
    # LARS's trust coefficient eta: 0.001 in SimCLR and BYOL (ImageNet, batch 4096); CIFAR
    # recipes at batch 256 (solo-learn's) take 0.02.
    lars_eta: float = check(default=0.001, gt=0)
    # AdamW's second-moment decay: torch's 0.999; MAE's code 0.95, CLIP's paper 0.98.
    adamw_beta2: float = check(default=0.999, gt=0, lt=1)
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


# ----------------------------------------------------------------------------- names

SEED_KEY = "train.seed"  # set per trial from the study's `seeds`, never swept


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


DISTRIBUTIONS = ("uniform", "loguniform", "choice")


def as_distribution(value: Any) -> tuple[str, list] | None:
    """{uniform: [lo, hi]} -> ("uniform", [lo, hi]); a plain list (grid values) -> None."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
        return next(iter(value.items()))
    return None


def short_key(dotted: str) -> str:
    """A dotted key's last part (method_args.temperature -> temperature)."""
    return dotted.rsplit(".", 1)[-1]


def swept_keys(sweep: dict) -> list[str]:
    """Every dotted key a sweep sets: its grid keys, then those its `points` set, each once."""
    keys = [k for k in sweep if k != "points"]
    return keys + list(dict.fromkeys(k for point in sweep.get("points", []) for k in point if k not in keys))


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
