"""A study's method assembled from the registries: the method class, its backbone, the
normalisation of what training sees and the views it declares."""

from __future__ import annotations

from pathlib import Path

import torch

from sslab.methods.base import Method, MethodContext
from sslab.methods.registry import get_method_class
from sslab.platform.augment import Normalize, build_views, channel_stats
from sslab.platform.backbones import build_backbone
from sslab.platform.checkpoint import load_checkpoint
from sslab.platform.config import StudyConfig
from sslab.platform.dataset import Dataset


def build_method(
    study: StudyConfig, data: Dataset, device: torch.device, total_steps: int, world_size: int = 1
) -> Method:
    method_cls = get_method_class(study.method)
    args = method_cls.Args(**study.method_args)
    backbone, feature_dim = build_backbone(study.backbone, data.image_size)
    mean, std = channel_stats(data.ssl_images)  # of what training sees
    normalize = Normalize(mean, std, channels_last=study.train.channels_last)
    views = build_views(method_cls.views(args, data.image_size), study.augment, data.image_size, normalize)
    ctx = MethodContext(
        backbone,
        feature_dim,
        data.image_size,
        normalize,
        views.get("view") or next(iter(views.values())),
        total_steps,
        world_size,
        dataset=data,
        views=views,
    )
    method = method_cls(args, ctx).to(device)
    if study.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def method_from_checkpoint(
    study: StudyConfig, data: Dataset, checkpoint: Path | None, device: torch.device
) -> tuple[Method, int]:
    """The study's method with a checkpoint's weights (None: as initialised), and the epochs
    the checkpoint had trained."""
    method = build_method(study, data, device, total_steps=1)
    epoch = 0 if checkpoint is None else load_checkpoint(checkpoint, method, None, device)[0]
    return method, epoch
