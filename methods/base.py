"""The Method interface: a method owns its networks and its loss, and nothing else.

The platform hands `training_step` uint8 images already on the device and the global step; the
method returns (loss, metrics). Everything else (optimiser, DDP, AMP, checkpoints, logging,
evaluation) belongs to the platform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from sslab.platform.augment import Augment, AugmentRecipe, Normalize, View
from sslab.platform.backbones import spatial_features


@dataclass
class Encoder:
    """The network evaluation measures: `module(transform(images))` -> [N, dim] features, where
    `transform` takes uint8 images or augmented RGB in [0, 1]. kNN and the linear probe read its
    features; fine-tuning trains a copy of `module` on `transform` of augmented images: all three
    measure the same network."""

    module: nn.Module
    dim: int
    transform: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MethodContext:
    """What the platform gives a method to build itself."""

    backbone: nn.Module
    feature_dim: int
    image_size: int
    normalize: Normalize  # uint8 -> normalised float (no augmentation): eval input
    augment: Augment  # uint8 -> one augmented view (per-sample parameters): views["view"] or the first
    total_steps: int  # for schedules that are pure functions of the step
    world_size: int = 1
    dataset: object = None  # the Dataset (classes, captions), for methods that need more than pixels
    views: dict = field(default_factory=dict)  # name -> Augment, for every view the method declares


Z_STD_COLLAPSED = 1e-3  # per-dimension std of unit embeddings below which all are one point


class Method(nn.Module):
    name: ClassVar[str]
    Args: ClassVar[type]
    # True for a method that pairs each training image with its label or caption (CLIP): it
    # cannot pretrain on an unlabelled folder (`data.pretrain`). Checked by `sslab validate`.
    pairs_images_with_labels: ClassVar[bool] = False
    # The backbone family the method works with (MAE: "vit"); empty: any. Checked by `sslab validate`
    # against the backbone registry's entries.
    backbone_family: ClassVar[str] = ""
    # "images": batches of uint8 [N, 3, H, W]; "video": clips [N, T, 3, H, W] (a video dataset).
    data_kind: ClassVar[str] = "images"

    def __init__(self, args, ctx: MethodContext):
        super().__init__()
        self.args = args
        self.backbone = ctx.backbone
        self.feature_dim = ctx.feature_dim
        self.normalize = ctx.normalize
        self.augment = ctx.augment
        self.views = dict(ctx.views)  # a plain dict: views hold no state to train or checkpoint
        self.total_steps = ctx.total_steps
        self.world_size = ctx.world_size

    # Images up to this size (px) get `small_image_args` as defaults: CIFAR-sized recipes differ
    # from ImageNet's (no local crops, smaller heads, faster EMA). A study's method_args win.
    SMALL_IMAGE_SIZE: ClassVar[int] = 64

    @classmethod
    def small_image_args(cls) -> dict:
        """method_args defaults for images of at most SMALL_IMAGE_SIZE px; {}: the Args defaults."""
        return {}

    @classmethod
    def default_args(cls, image_size: int) -> dict:
        """The defaults a study's method_args are laid over, for its image size."""
        return cls.small_image_args() if image_size <= cls.SMALL_IMAGE_SIZE else {}

    # The training recipe of the method's paper as `train:` keys (optimizer, lr at batch 256 and
    # its lr_scaling, weight_decay, warmup_epochs, ...), and the one for images up to
    # SMALL_IMAGE_SIZE px where that differs. A study's own train: values win over both.
    train_recipe: ClassVar[dict] = {}
    small_image_train_recipe: ClassVar[dict | None] = None

    @classmethod
    def default_train(cls, image_size: int) -> dict:
        """The train: defaults a study's train: section is laid over, for its image size."""
        small = cls.small_image_train_recipe
        return small if small is not None and image_size <= cls.SMALL_IMAGE_SIZE else cls.train_recipe

    @classmethod
    def check_args(cls, args, image_size: int) -> str | None:
        """A problem with these arguments at this image size (checked at validation), or None."""
        return None

    @classmethod
    def check_clip_length(cls, args, clip_length: int) -> str | None:
        """A video method's problem with clips of this many frames (validation), or None."""
        return None

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        """The method's own augmentation; a study's `augment:` section overrides fields of it."""
        return AugmentRecipe()

    @classmethod
    def views(cls, args, image_size: int) -> dict[str, View]:
        """The views the method trains on, by name (`self.views[name]` once built). By default one
        kind, "view", of `augment_recipe` (a method may draw it several times per image)."""
        return {"view": View(cls.augment_recipe(args))}

    def forward(self, images: torch.Tensor, step: int, index: torch.Tensor | None = None):
        """The training step. The platform wraps the whole method in DDP once and calls this;
        parameters without gradient (EMA copies) stay out of DDP's reducer."""
        return self.training_step(images, step, index)

    def training_step(
        self, images: torch.Tensor, step: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the loss and detached scalar metrics (tensors: the platform averages them on
        the device and syncs once per report, not once per step). `index` holds the images'
        positions in the training set, for methods that pair images with other data (captions)."""
        raise NotImplementedError

    # True where the authors' optimiser runs over `model.parameters()` as one group: weight decay
    # (and LARS's adaptation) on biases and norms too, where the platform's groups exclude them.
    decay_all_parameters: ClassVar[bool] = False

    def optimizer_groups(self, weight_decay: float) -> list[dict] | None:
        """The method's own parameter groups, where its authors' code departs from the platform's
        (weight decay on weights only, biases and norms excluded): dicts of `params` and options
        (`weight_decay`; `fixed_lr: True` keeps a group at the peak learning rate, without warm-up
        or decay; `lars_exclude`). None: the platform's groups."""
        if not self.decay_all_parameters:
            return None
        trained = [p for p in self.parameters() if p.requires_grad]
        return [{"params": trained, "weight_decay": weight_decay, "lars_exclude": False}]

    def before_optimizer_step(self, step: int) -> None:
        """After backward (and the DDP gradient all-reduce), before the optimiser: gradient surgery
        such as DINO's frozen last layer. Parameters whose `.grad` is set to None are not updated."""

    def on_step_end(self, step: int) -> None:
        """After the optimiser step: EMA updates, queues, centres."""

    def evaluate(self, data) -> dict[str, float]:
        """Method-specific evaluation (e.g. zero-shot accuracy), run beside the kNN monitor."""
        return {}

    def collapse_state(self, metrics: dict[str, float]) -> str:
        """ "collapsed (...)" or "learning" from the last epoch's diagnostics; "" for a method that
        logs none. By default the per-dimension std of the unit embeddings (`z_std`, SimSiam Sec.
        4.1): about 1/sqrt(d) when spread, 0 when every image maps to one point."""
        if metrics.get("z_std") is None:
            return ""
        return "collapsed (constant)" if metrics["z_std"] < Z_STD_COLLAPSED else "learning"

    def artifacts(self, data) -> dict[str, torch.Tensor]:
        """Images to look at after training (reconstructions, colourisations), logged to MLflow:
        name -> uint8 [3, H, W]. Called in eval mode on the main rank."""
        return {}

    def encoder(self) -> Encoder:
        """What evaluation measures; by default the backbone on normalised RGB. A method whose
        representation is elsewhere (a teacher, an input colour space) says so here."""
        return Encoder(self.backbone, self.feature_dim, self.normalize)

    def uses_labels(self) -> str:
        """How the method learns from the dataset's labels, "" if it does not (self-supervised).
        Reports mark such trials: their numbers are not a self-supervised method's."""
        return ""

    def monitored_encoders(self) -> dict[str, Encoder]:
        """Other networks the kNN monitor also scores, by name (DINO's student beside its
        teacher): logged as `<name>_knn_top1`. Evaluation proper measures `encoder()` only."""
        return {}

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Per-location features [N, D, h, w] of un-augmented uint8 frames: what mask propagation
        matches between frames. By default the backbone's last feature map."""
        encoder = self.encoder()
        return spatial_features(encoder.module, encoder.transform(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's features of un-augmented images (eval mode is set by the caller)."""
        encoder = self.encoder()
        return encoder.module(encoder.transform(images))


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of [n, 3, H, W] images in [0, 1] -> one uint8 [3, rows * H, n * W] picture (artifacts)."""
    picture = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    return (picture.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
