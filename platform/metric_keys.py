"""The names of what trials log, in one place: the loop writes them, schedulers, the driver,
reports and the CLI read them."""

from __future__ import annotations

import re

EVAL = "eval/"  # every end-of-training (and probe-epoch) protocol: eval/knn_top1, eval/linear_top1
RANDOM_INIT = "random_init_"  # the same protocols on the backbone at random initialisation (epoch 0)
# What the per-epoch monitor logs (and schedulers may rank on): kNN of the evaluated network and
# of the ones a method follows; mask propagation on video data.
MONITOR = re.compile(r"(^|/|_)(knn_top[15]|propagation_j|copy_first_j)$")


def monitor_keys(metrics: dict, prefix: str = "") -> dict:
    """The monitor's metrics among `metrics`, with `prefix` removed (random_init_knn_top1 -> knn_top1)."""
    return {
        k.removeprefix(prefix): v
        for k, v in metrics.items()
        if k.startswith(prefix) and MONITOR.search(k) and "/" not in k
    }


def random_init_key(metric: str) -> str:
    """The random-init twin of a metric: eval/linear_top1 -> random_init_linear_top1."""
    return RANDOM_INIT + metric.removeprefix(EVAL)


def is_followed_knn(key: str) -> bool:
    """kNN of a network a method follows beside its evaluated one (`student_knn_top1`)."""
    return key.endswith("_knn_top1") and key != "knn_top1" and not key.startswith((RANDOM_INIT, EVAL))
