"""MoCo: He et al. 2020, Momentum Contrast for Unsupervised Visual Representation Learning (v1);
Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning (v2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslab.methods.base import Method, MethodContext
from sslab.methods.ema import ema_update, frozen_copy
from sslab.methods.heads import projection_head
from sslab.methods.losses import embedding_std, gather_no_grad, info_nce_with_queue
from sslab.platform.augment import AugmentRecipe
from sslab.platform.config import check


@dataclass
class MoCoV2Args:
    temperature: float = check(default=0.2, gt=0)
    momentum: float = check(default=0.99, ge=0, le=1)        # key encoder EMA (paper: 0.999)
    queue_size: int = check(default=4096, gt=0)              # K, independent of the batch size
    proj_hidden_dim: int = check(default=2048, gt=0)
    proj_dim: int = check(default=128, gt=0)
    shuffle_bn: bool = True                                  # shuffle keys across DDP ranks


@dataclass
class MoCoV1Args(MoCoV2Args):
    temperature: float = check(default=0.07, gt=0)


class MoCoV2(Method):
    """Query encoder by gradient, key encoder by EMA, a FIFO queue of keys as negatives."""
    name = "moco_v2"
    Args = MoCoV2Args
    ddp_modules = ("backbone", "head")
    head_kind = "mlp"

    def __init__(self, args, ctx: MethodContext):
        super().__init__(args, ctx)
        self.head = projection_head(self.head_kind, ctx.feature_dim, args.proj_hidden_dim,
                                    args.proj_dim, batch_norm=False)
        self.key_backbone, self.key_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(args.queue_size, args.proj_dim), dim=1))
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
        loss = info_nce_with_queue(q, k, self.queue.clone(), self.args.temperature)
        self._keys = k
        return loss, {"pos_sim": (q.detach() * k).sum(1).mean(), "z_std": embedding_std(q)}

    def _key_forward(self, x):
        """Key encoder; under DDP the batch is shuffled across ranks so that BN statistics do
        not leak which key is the positive (MoCo Sec. 3.3, shuffling BN)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1 or not self.args.shuffle_bn:
            return self.key_head(self.key_backbone(x))
        everything = gather_no_grad(x)
        perm = torch.randperm(len(everything), device=x.device)
        dist.broadcast(perm, src=0)
        rank, n = dist.get_rank(), len(x)
        mine = perm[rank * n:(rank + 1) * n]
        keys = gather_no_grad(self.key_head(self.key_backbone(everything[mine])))
        unshuffled = torch.empty_like(keys)
        unshuffled[perm] = keys
        return unshuffled[rank * n:(rank + 1) * n]

    @torch.no_grad()
    def on_step_end(self, step):
        ema_update(self.key_backbone, self.backbone, self.args.momentum)
        ema_update(self.key_head, self.head, self.args.momentum)
        if self._keys is not None:
            self.enqueue(gather_no_grad(self._keys))
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
