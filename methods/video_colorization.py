"""Video colourisation as tracking: Vondrick et al. 2018, Tracking Emerges by Colorizing Videos.

A grey target frame is coloured by copying colours from grey reference frames of the same clip:
each target location points at the reference locations whose embeddings it matches (softmax over
inner products, eq. 1) and takes their quantised colours; the loss is the cross-entropy of the
copied colour distribution against the target's true colour (eq. 2). Copying is only right where
the pointer finds the same surface again, so the embedding learns to track; evaluation then
propagates the first frame's masks with the same affinities (platform/propagation.py).

Colours are quantised into k-means clusters of the training frames' ab channels (16 in the
paper). Not reproduced: the paper's 3D convolutions over the stacked frames; each frame is
embedded on its own by the study's backbone (on the lightness channel) and a small conv head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslab.methods.base import Encoder, Method, MethodContext
from sslab.methods.colorization import dense_head, lightness_input, nearest_bin, rgb_to_lab
from sslab.methods.losses import in_fp32
from sslab.platform.augment import CROP_FLIP, AugmentRecipe, to_unit
from sslab.platform.backbones import spatial_features
from sslab.platform.config import check


@dataclass
class VideoColorizationArgs:
    reference_frames: int = check(default=3, ge=1)  # the paper's 3 references, then the target
    colour_clusters: int = check(default=16, ge=2)  # k-means centres in ab (paper: 16)
    embed_dim: int = check(default=64, ge=1)  # the pointer's embedding (paper: 64)
    temperature: float = check(default=1.0, gt=0)  # eq. 1 is a softmax of plain inner products
    kmeans_pixels: int = check(default=20_000, ge=100)  # ab samples the clusters are fitted to


@in_fp32
def copied_colour_loss(
    target: torch.Tensor,
    references: torch.Tensor,
    reference_colours: torch.Tensor,
    target_colours: torch.Tensor,
    num_colours: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2. target [B, n, D] and references [B, m, D] embeddings of one clip each; their colour
    indices [B, m] and [B, n]. A_ij = softmax_i(f_i . f_j / T) over the reference locations i;
    the copied distribution y_j = sum_i A_ij c_i (c_i one-hot); loss = mean_j -log y_j[true c_j].
    Returns (loss, the copied distributions [B, n, K])."""
    attention = torch.softmax(target @ references.transpose(1, 2) / temperature, dim=-1)  # [B, n, m]
    copied = attention @ F.one_hot(reference_colours, num_colours).float()  # [B, n, K]
    picked = copied.gather(-1, target_colours[..., None]).squeeze(-1)
    return -picked.clamp_min(1e-8).log().mean(), copied


def ab_kmeans(clips: torch.Tensor, clusters: int, pixels: int, iterations: int = 25) -> torch.Tensor:
    """k-means centres [K, 2] of the ab values of `pixels` pixels drawn from uint8 clips (fixed
    draw, k-means++ seeding from a fixed generator: every DDP rank gets the same centres)."""
    g = torch.Generator().manual_seed(0)
    frames = clips.flatten(0, -4)  # [N * T, 3, H, W]
    frames = frames[torch.randperm(len(frames), generator=g)[:512]]
    ab = rgb_to_lab(to_unit(frames.cpu()))[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)
    ab = ab[torch.randperm(len(ab), generator=g)[:pixels]]
    centres = ab[torch.randint(len(ab), (1,), generator=g)]
    for _ in range(1, clusters):  # k-means++: the next centre far from the chosen ones
        distance = torch.cdist(ab, centres).min(1).values ** 2
        centres = torch.cat([centres, ab[torch.multinomial(distance + 1e-12, 1, generator=g)]])
    for _ in range(iterations):
        nearest = torch.cdist(ab, centres).argmin(1)
        for k in range(clusters):
            members = ab[nearest == k]
            if len(members):
                centres[k] = members.mean(0)
    return centres


class VideoColorization(Method):
    """Vondrick et al. 2018: grey frames coloured by a learned pointer into reference frames of
    the same clip; the pointer tracks (evaluated by propagating masks with it)."""

    name = "video_colorization"
    Args = VideoColorizationArgs
    data_kind = "video"

    def __init__(self, args: VideoColorizationArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        self.embed = dense_head(ctx.feature_dim, args.embed_dim)
        centres = torch.zeros(args.colour_clusters, 2)  # a checkpoint brings the fitted ones
        if ctx.dataset is not None:
            centres = ab_kmeans(ctx.dataset.ssl_images, args.colour_clusters, args.kmeans_pixels)
        self.register_buffer("colour_centres", centres)

    @classmethod
    def check_clip_length(cls, args, clip_length: int) -> str | None:
        span = args.reference_frames + 1
        if clip_length < span:
            return (
                f"{clip_length} frames per clip are fewer than method_args.reference_frames + 1 = {span} "
                "(the references and the target)"
            )
        return None

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        return CROP_FLIP  # colour is the target (the clips are flipped whole, below)

    def training_step(self, images, step, index=None):
        windows = self.random_windows(images)  # [B, R + 1, 3, H, W]
        b, span = windows.shape[:2]
        lab = rgb_to_lab(to_unit(windows.flatten(0, 1)))
        embedding = self.embed(spatial_features(self.backbone, lightness_input(lab)))  # [B * span, D, h, w]
        colours = nearest_bin(
            F.interpolate(lab[:, 1:], size=embedding.shape[-2:], mode="area"), self.colour_centres
        )
        embedding = embedding.flatten(2).transpose(1, 2).reshape(b, span, -1, embedding.shape[1])
        colours = colours.flatten(1).view(b, span, -1)
        loss, copied = copied_colour_loss(
            embedding[:, -1],
            embedding[:, :-1].flatten(1, 2),
            colours[:, :-1].flatten(1),
            colours[:, -1],
            self.args.colour_clusters,
            self.args.temperature,
        )
        accuracy = (copied.argmax(-1) == colours[:, -1]).float().mean()
        return loss, {"colour_accuracy": accuracy.detach()}

    def random_windows(self, clips: torch.Tensor) -> torch.Tensor:
        """For each clip, R + 1 consecutive frames from a random start, flipped (whole) half the time."""
        b, t = clips.shape[:2]
        span = self.args.reference_frames + 1
        start = torch.randint(0, t - span + 1, (b,), device=clips.device)
        frames = start[:, None] + torch.arange(span, device=clips.device)
        windows = clips[torch.arange(b, device=clips.device)[:, None], frames]
        flip = torch.rand(b, device=clips.device) < 0.5
        return torch.where(flip[:, None, None, None, None], windows.flip(-1), windows)

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pointer's embedding of grey frames: what propagation matches."""
        return self.embed(spatial_features(self.backbone, self.lightness(images)))

    def encoder(self) -> Encoder:
        return Encoder(self.backbone, self.feature_dim, self.lightness)  # the network sees L only

    def lightness(self, images: torch.Tensor) -> torch.Tensor:
        return lightness_input(rgb_to_lab(to_unit(images)))
