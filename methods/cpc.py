"""CPC v2: Hénaff et al. 2019, Data-Efficient Image Recognition with Contrastive Predictive Coding
(after van den Oord et al. 2018, Representation Learning with Contrastive Predictive Coding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Encoder, Method, MethodContext
from sslab.methods.losses import embedding_std, in_fp32
from sslab.platform.config import check


@dataclass
class CPCArgs:
    # px; None: a quarter of the image (8 at 32 px) at half its size's stride (50% overlap, as
    # CPC v2's 64 px patches at stride 32 of 256 px): a 7 x 7 grid at any image size
    patch_size: Optional[int] = check(default=None, ge=2)
    patch_stride: Optional[int] = check(default=None, ge=1)
    prediction_steps: int = check(default=3, ge=1)  # K: predict the rows 1..K below
    num_negatives: int = check(default=1024, ge=1)  # patches of the batch drawn per offset
    embed_dim: int = check(default=128, gt=0)
    context_layers: int = check(default=2, ge=1)  # masked residual convolutions
    context_kernel: int = check(default=3, ge=2)
    # CPC v2's patch-based augmentation against low-level shortcuts (Hénaff et al. 2019, after
    # Doersch et al. 2015): each training patch keeps one colour channel with this probability
    colour_dropping: float = check(default=0.5, ge=0, le=1)
    # CPC v2 replaces batch normalisation with layer normalisation: batch statistics couple the
    # patches of an image, a path around the context's receptive field (Hénaff et al. 2019)
    layer_norm: bool = True


def patch_grid(images: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """[N, C, H, W] -> every size x size patch at this stride, [N * rows * cols, C, size, size] in
    row-major order per image, and the grid's rows and cols."""
    n, c = images.shape[:2]
    grid = images.unfold(2, size, stride).unfold(3, size, stride)  # [N, C, rows, cols, size, size]
    rows, cols = grid.shape[2], grid.shape[3]
    patches = grid.permute(0, 2, 3, 1, 4, 5).reshape(n * rows * cols, c, size, size)
    return patches, rows, cols


class CausalRowConv(nn.Module):
    """A convolution over the patch grid whose output at row r sees rows <= r only: padding is
    added above, none below (a row-masked convolution, as CPC's autoregressive context network)."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(dim, dim, kernel)

    def forward(self, x):
        k = self.kernel
        return self.conv(F.pad(x, ((k - 1) // 2, k // 2, k - 1, 0)))


class ContextNetwork(nn.Module):
    """Residual stack of row-causal convolutions: c[r] summarises the embeddings of rows <= r."""

    def __init__(self, dim: int, layers: int, kernel: int):
        super().__init__()
        self.blocks = nn.ModuleList(CausalRowConv(dim, kernel) for _ in range(layers))

    def forward(self, z):
        for block in self.blocks:
            z = z + block(F.relu(z))
        return z


@in_fp32
def cpc_info_nce(
    predictions: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """CPC eq. (4) (van den Oord et al.; Hénaff et al. eq. 3): -log exp(p . z+) / sum_{z in
    {z+} u negatives} exp(p . z), the score a plain dot product (a log-bilinear model with the
    linear map in `p`). predictions [Q, D]; candidates [P, D] (every patch of the batch);
    positive [Q] indexes each query's target patch, negative [M] the patches drawn as negatives;
    a drawn negative that is the query's own target is left out."""
    logits = torch.cat(
        [(predictions * candidates[positive]).sum(1, keepdim=True), predictions @ candidates[negative].T], 1
    )
    own = negative.unsqueeze(0) == positive.unsqueeze(1)  # [Q, M]
    logits[:, 1:] = logits[:, 1:].masked_fill(own, float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class PatchPooled(nn.Module):
    """What evaluation measures: the backbone on every patch of the grid, mean-pooled (CPC v2's
    linear evaluation reads the pooled patch features)."""

    def __init__(self, backbone: nn.Module, size: int, stride: int):
        super().__init__()
        self.backbone, self.size, self.stride = backbone, size, stride

    def forward(self, x):
        patches, rows, cols = patch_grid(x, self.size, self.stride)
        return self.backbone(patches).view(len(x), rows * cols, -1).mean(dim=1)


class CPC(Method):
    """The image as a grid of overlapping patches, each embedded by the backbone; a row-causal
    context network; for k = 1..K a linear map of the context at row r predicts the embedding k
    rows below, scored against other patches of the batch (InfoNCE)."""

    name = "cpc"
    Args = CPCArgs

    @classmethod
    def check_args(cls, args: CPCArgs, image_size: int) -> str | None:
        size, stride = patch_geometry(args, image_size)
        rows = (image_size - size) // stride + 1 if size <= image_size else 0
        if rows <= args.prediction_steps:
            return (
                f"prediction_steps={args.prediction_steps} needs a grid of more rows than that: "
                f"{image_size} px in {size} px patches at stride {stride} gives {rows}"
            )
        return None

    def __init__(self, args: CPCArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        if args.layer_norm:
            batch_norm_to_layer_norm(self.backbone)
        self.patch_size, self.patch_stride = patch_geometry(args, ctx.image_size)
        self.embed = nn.Linear(ctx.feature_dim, args.embed_dim)
        self.context = ContextNetwork(args.embed_dim, args.context_layers, args.context_kernel)
        # One linear prediction per offset, started at zero: at initialisation every candidate
        # scores alike and the loss is chance, log(1 + negatives).
        self.predictors = nn.ModuleList(
            nn.Conv2d(args.embed_dim, args.embed_dim, 1) for _ in range(args.prediction_steps)
        )
        for predictor in self.predictors:
            nn.init.zeros_(predictor.weight)
            nn.init.zeros_(predictor.bias)

    def embeddings(self, views: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, H, W] -> patch embeddings on the grid [N, D, rows, cols]."""
        patches, rows, cols = patch_grid(views, self.patch_size, self.patch_stride)
        if self.training and self.args.colour_dropping > 0:
            patches = drop_colours(patches, self.args.colour_dropping)
        z = self.embed(self.backbone(patches))
        return z.view(len(views), rows, cols, -1).permute(0, 3, 1, 2)

    def training_step(self, images, step, index=None):
        z = self.embeddings(self.augment(images))
        context = self.context(z)
        n, d, rows, cols = z.shape
        candidates = z.permute(0, 2, 3, 1).reshape(-1, d)  # every patch of the batch, row-major
        patch_id = torch.arange(len(candidates), device=z.device).view(n, rows, cols)
        loss = 0.0
        for k, predictor in enumerate(self.predictors, start=1):
            predictions = predictor(context[:, :, : rows - k]).permute(0, 2, 3, 1).reshape(-1, d)
            positive = patch_id[:, k:].reshape(-1)  # the patch k rows below each context position
            negative = torch.randint(len(candidates), (self.args.num_negatives,), device=z.device)
            loss = loss + cpc_info_nce(predictions, candidates, positive, negative)
        return loss / len(self.predictors), {"z_std": embedding_std(candidates)}

    def encoder(self) -> Encoder:
        pooled = PatchPooled(self.backbone, self.patch_size, self.patch_stride)
        return Encoder(pooled, self.feature_dim, self.normalize)


def batch_norm_to_layer_norm(module: nn.Module) -> None:
    """Every BatchNorm2d of `module` replaced, in place, by a layer norm over each sample's
    (C, H, W) (GroupNorm with one group), with the same affine start (1, 0)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            batch_norm_to_layer_norm(child)


def drop_colours(patches: torch.Tensor, probability: float) -> torch.Tensor:
    """Each normalised patch [P, 3, s, s], with `probability`, keeps one random channel and has the
    other two set to 0 (the channel mean): colour then says little about the neighbouring patch."""
    keep = F.one_hot(torch.randint(3, (len(patches),), device=patches.device), 3).to(patches.dtype)
    dropped = torch.rand(len(patches), device=patches.device) < probability
    mask = torch.where(dropped[:, None], keep, torch.ones_like(keep))
    return patches * mask[:, :, None, None]


def patch_geometry(args: CPCArgs, image_size: int) -> tuple[int, int]:
    """(patch size, stride) in px: the arguments, or a quarter of the image at half that stride."""
    size = args.patch_size or max(2, image_size // 4)
    return size, args.patch_stride or max(1, size // 2)
