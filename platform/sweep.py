"""A study's sweep as trials: every point (grid, `points`, or drawn at random) times every seed,
each a validated study, and the names trials and points go by."""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass

from sslab.platform.config import SEED_KEY, SearchConfig, StudyConfig, as_distribution, point_keys, set_dotted
from sslab.platform.validate import build_study

POINTS_KEY = "points"


@dataclass
class Trial:
    name: str
    values: dict  # swept dotted key -> value, including train.seed
    study: StudyConfig  # resolved


def sweep_points(sweep: dict, search: SearchConfig | None = None) -> list[dict]:
    """The sweep as a list of {dotted key: value}. grid: every `key: [values]` entry crossed with
    each other and with the `points` entry (a list of override sets, e.g. per-method settings).
    random: `num_samples` points drawn from each key's list or distribution (seeded)."""
    if search is not None and search.name == "random":
        return _random_points(sweep, search)
    grid_keys = [k for k in sweep if k != POINTS_KEY]
    points = sweep.get(POINTS_KEY) or [{}]
    return [
        dict(zip(grid_keys, values)) | point
        for point in points
        for values in itertools.product(*(sweep[k] for k in grid_keys))
    ]


def _random_points(sweep: dict, search: SearchConfig) -> list[dict]:
    rng = random.Random(search.seed)
    keys = [k for k in sweep if k != POINTS_KEY]
    points = []
    for _ in range(search.num_samples):
        point = {k: draw(sweep[k], rng) for k in keys}
        points.append(point | (rng.choice(sweep[POINTS_KEY]) if POINTS_KEY in sweep else {}))
    return points


def draw(spec, rng: random.Random):
    """One value from a list or a {uniform|loguniform|choice: ...} spec; floats to 4 significant
    digits, so that trial names stay readable and name the value that actually ran."""
    distribution = as_distribution(spec)
    if distribution is None:
        return rng.choice(spec)
    kind, args = distribution
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    value = (
        rng.uniform(low, high) if kind == "uniform" else math.exp(rng.uniform(math.log(low), math.log(high)))
    )
    return significant(value)


def significant(value, digits: int = 4):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def expand_trials(study: StudyConfig, raw: dict) -> list[Trial]:
    """Every sweep point times every seed, each a fully validated study (grid and random search;
    Optuna proposes its points while the study runs)."""
    return [
        make_trial(raw, point | {SEED_KEY: seed})
        for point in sweep_points(study.sweep, study.search)
        for seed in study.seeds
    ]


def make_trial(raw: dict, values: dict, name: str | None = None) -> Trial:
    """The study with `values` (dotted key -> value, seed included) applied, validated."""
    trial_raw = copy.deepcopy(raw)
    trial_raw.pop("sweep", None)
    trial_raw["seeds"] = [values[SEED_KEY]]
    for key, value in values.items():
        set_dotted(trial_raw, key, value)
    return Trial(name or trial_name(values), values, build_study(trial_raw, "<trial>"))


def point_values(values: dict) -> dict:
    """A trial's sweep point as {name key: value} (see `point_keys`), seed left out; a point that
    changes the method names it first, however its overrides are ordered."""
    swept = [k for k in values if k != SEED_KEY]
    names = point_keys(swept)
    ordered = sorted(swept, key=lambda k: names[k] != "method")
    return {names[k]: values[k] for k in ordered}


def point_label(values: dict) -> str:
    """'temperature=0.2' ('default' for a study without a sweep)."""
    return ",".join(f"{k}={v}" for k, v in point_values(values).items()) or "default"


def trial_name(values: dict) -> str:
    """'temperature=0.2,seed=0': the point, the seed last."""
    point = point_label(values)
    return (f"{point}," if point != "default" else "") + f"seed={values[SEED_KEY]}"
