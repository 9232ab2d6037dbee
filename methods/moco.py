"""MoCo: He et al. 2020, Momentum Contrast for Unsupervised Visual Representation Learning (v1);
Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning (v2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslab.methods.base import Method, MethodContext
from sslab.methods.ema import ema_update, frozen_copy
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, info_nce_with_queue
from sslab.platform.augment import AugmentRecipe
from sslab.platform.config import check
from sslab.platform.distributed import broadcast, gather_no_grad, global_index, is_distributed


@dataclass
class MoCoV2Args:
    temperature: float = check(default=0.2, gt=0)
    momentum: float = check(default=0.99, ge=0, le=1)  # key encoder EMA (paper: 0.999)
    queue_size: int = check(default=4096, gt=0)  # K, independent of the batch size
    proj_hidden_dim: int = check(default=2048, gt=0)
    proj_dim: int = check(default=128, gt=0)
    head_batch_norm: bool = False  # MoCo v2's MLP has none; BN centres the embeddings
    # The batch's own keys are negatives at once (not only from the next step on, via the
    # queue): with few steps or a still-empty queue, nothing else keeps embeddings apart.
    batch_negatives: bool = True
    shuffle_bn: bool = True  # shuffle keys across DDP ranks (or, on one worker,
    shuffle_bn_groups: int = check(default=4, ge=1)  # across this many key sub-batches)


@dataclass
class MoCoV1Args(MoCoV2Args):
    temperature: float = check(default=0.07, gt=0)


class MoCoV2(Method):
    """Query encoder by gradient, key encoder by EMA, a FIFO queue of keys as negatives.

    Conventions (the authors' facebookresearch/moco): SGD over every parameter, weight decay on
    biases and BatchNorm included (`decay_all_parameters`); lr 0.03 at batch 256 scaled linearly,
    weight decay 1e-4, no warm-up, cosine decay (v2's `--cos`; v1 steps down at epochs 120 and
    160 of 200, which sslab's cosine replaces). At 32 px the authors' CIFAR-10 demo: lr 0.06 at
    batch 512 (0.03 at 256), weight decay 5e-4, momentum 0.99 and a 4,096-key queue (sslab's
    defaults here too; its temperature 0.1 is not). sslab departs where a short run needs it:
    the batch's own keys are negatives at once (`batch_negatives`), and an unfilled queue holds
    no random keys."""

    name = "moco_v2"
    Args = MoCoV2Args
    head_kind = "mlp"
    decay_all_parameters = True
    train_recipe = {
        "optimizer": "sgd",
        "lr": 0.03,
        "lr_scaling": "linear",
        "weight_decay": 1e-4,
        "warmup_epochs": 0,
    }
    small_image_train_recipe = train_recipe | {"weight_decay": 5e-4}

    def __init__(self, args, ctx: MethodContext):
        super().__init__(args, ctx)
        self.head = projection_head(
            self.head_kind,
            ctx.feature_dim,
            args.proj_hidden_dim,
            args.proj_dim,
            batch_norm=args.head_batch_norm,
        )
        self.key_backbone, self.key_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.register_buffer("queue", torch.zeros(args.queue_size, args.proj_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys = None

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        # v2 adds blur to v1's recipe (MoCo v2, Sec. 2); solarize stays off.
        return AugmentRecipe(jitter_strength=0.5, blur_p=0.5)

    def training_step(self, images, step, index=None):
        q_view, k_view = self.augment(images), self.augment(images)
        q = F.normalize(self.head(self.backbone(q_view)).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self._key_forward(k_view).float(), dim=1)
            all_keys = gather_no_grad(k)
        # Only slots that already hold real keys are negatives (a pure function of the step,
        # so a resumed run sees the same queue): the paper's random initial queue lets the
        # first steps pull every embedding together unopposed.
        filled = min(len(self.queue), step * len(all_keys))
        own = global_index(len(k), k.device)
        batch = all_keys if self.args.batch_negatives or filled == 0 else None
        loss = info_nce_with_queue(q, k, self.queue[:filled].clone(), self.args.temperature, batch, own)
        self._keys = all_keys
        return loss, {"pos_sim": (q.detach() * k).sum(1).mean(), "z_std": embedding_std(q)}

    def _key_forward(self, x):
        """Key encoder; the keys are shuffled across BN batches so that batch statistics do not
        leak which key is the positive (MoCo Sec. 3.3, shuffling BN): across DDP ranks, or on
        one worker across `shuffle_bn_groups` sub-batches, each normalised on its own."""
        if not self.args.shuffle_bn:
            return self.key_head(self.key_backbone(x))
        if not is_distributed():
            return self._grouped_key_forward(x)
        everything = gather_no_grad(x)
        perm = broadcast(torch.randperm(len(everything), device=x.device))
        mine = perm[global_index(len(x), x.device)]
        keys = gather_no_grad(self.key_head(self.key_backbone(everything[mine])))
        unshuffled = torch.empty_like(keys)
        unshuffled[perm] = keys
        return unshuffled[global_index(len(x), x.device)]

    def _grouped_key_forward(self, x):
        perm = torch.randperm(len(x), device=x.device)
        groups = [
            self.key_head(self.key_backbone(chunk)) for chunk in x[perm].chunk(self.args.shuffle_bn_groups)
        ]
        keys = torch.empty_like(torch.cat(groups))
        keys[perm] = torch.cat(groups)
        return keys

    @torch.no_grad()
    def on_step_end(self, step):
        ema_update(self.key_backbone, self.backbone, self.args.momentum)
        ema_update(self.key_head, self.head, self.args.momentum)
        if self._keys is not None:
            self.enqueue(self._keys)  # already gathered from every rank
            self._keys = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: the newest keys replace the oldest (wrapping around the end of the queue)."""
        size = len(self.queue)
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)


class MoCoV1(MoCoV2):
    """MoCo v1: linear head, temperature 0.07, no blur."""

    name = "moco_v1"
    Args = MoCoV1Args
    head_kind = "linear"

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return AugmentRecipe(jitter_strength=0.5, blur_p=0.0)
