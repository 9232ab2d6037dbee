"""`sslab bench`'s arguments, apart from the harness (bench.py imports torch): `sslab --help`
builds every command's parser without importing it."""

from __future__ import annotations

import argparse
import os

from sslab.platform.config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25, help="default: the studies' ResNet-18 x0.25")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--precision",
        action="store_true",
        help="time the bare step in fp32, bf16 autocast, channels_last and both, side by side",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per path per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the paths take turns")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path (at least 1)")
    p.add_argument("--device", help="default: cuda where there is one, else cpu")
    defaults = TrainConfig()
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=defaults.amp,
        help="bf16 autocast (default: the studies')",
    )
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=defaults.channels_last)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the backbone (with --precision: adds a compiled bf16 + channels_last path)",
    )
    p.add_argument("--data", default="synthetic", choices=["synthetic", "imagefolder", "cifar10"])
    p.add_argument("--root", help="dataset root for imagefolder / cifar10")
    p.add_argument("--images", type=int, default=2048, help="images held in the dataset tensor")
    p.add_argument(
        "--epoch-images", type=int, default=50_000, help="images per epoch for s/epoch (CIFAR-10: 50k)"
    )
    p.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument(
        "--ray-data",
        action="store_true",
        help="with --streaming: also decode through Ray Data tasks on a local Ray (data.stream_engine)",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        help="time training on image files decoded per batch (data.loading: stream) against the "
        "in-memory tensor (needs --data imagefolder --root DIR)",
    )
    p.add_argument("--out", default="bench.json", help="JSON file for the results")
