"""Video evaluation: the first frame's instance masks propagated through each clip by feature
affinity, scored by region similarity J (mean IoU per object, DAVIS's J; Pont-Tuset et al. 2017).

Propagation as in Vondrick et al. 2018 (Sec. 3.3) and the label-propagation protocol later work
shares (CRW, DINO's DAVIS evaluation): every location of frame t takes the soft labels of its
top-k most similar locations in the reference frames (the first frame with the given masks, and
the `context` frames before t with their propagated labels), weighted by a softmax of cosine
similarity at a temperature. Labels live at the feature map's resolution and are upsampled
bilinearly to the frame's before the arg-max. A method-free baseline beside it: the first frame's
mask copied to every frame (what "no tracking" scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslab.methods.base import image_grid

# Instance colours of the strips (background stays as it is).
PALETTE = torch.tensor(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    dtype=torch.float32,
)


def one_hot_ids(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """uint8 mask [H, W] -> float [L, H, W], one channel per id of `ids` (id 0, background, first)."""
    return (mask[None].long() == ids[:, None, None]).float()


@torch.no_grad()
def propagate(
    features: torch.Tensor, first_mask: torch.Tensor, temperature: float, topk: int, context: int
) -> torch.Tensor:
    """features [T, D, h, w] of one clip; first_mask [H, W] -> predicted masks [T, H, W] (frame 0:
    the given one), in the first mask's ids."""
    ids = torch.unique(first_mask).long()
    size = first_mask.shape[-2:]
    t_frames, dim, h, w = features.shape
    flat = F.normalize(features.float().flatten(2), dim=1).transpose(1, 2)  # [T, hw, D]
    first_labels = F.interpolate(one_hot_ids(first_mask, ids)[None], size=(h, w), mode="area")[0].flatten(1)
    references = [(flat[0], first_labels)]  # (features [hw, D], soft labels [L, hw])
    predicted = [first_mask.long()]
    for t in range(1, t_frames):
        recent = references[1:][-context:] if context else []
        ref_features = torch.cat([references[0][0]] + [f for f, _ in recent])
        ref_labels = torch.cat([references[0][1]] + [y for _, y in recent], dim=1)
        similarity = flat[t] @ ref_features.T / temperature  # [hw, R * hw]
        top, index = similarity.topk(min(topk, similarity.shape[1]), dim=1)
        weights = torch.softmax(top, dim=1)  # [hw, k]
        labels = (ref_labels[:, index] * weights[None]).sum(-1)  # [L, hw]
        references.append((flat[t], labels))
        full = F.interpolate(labels.view(1, -1, h, w), size=size, mode="bilinear", align_corners=False)[0]
        predicted.append(ids[full.argmax(0)])
    return torch.stack(predicted).to(first_mask.dtype)


def propagate_clip(dense_features, frames: torch.Tensor, first_mask: torch.Tensor, device, eval_cfg):
    """`propagate` on one clip's uint8 frames [T, 3, H, W] with the study's `eval.propagation_*`."""
    return propagate(
        dense_features(frames.to(device)).cpu(),
        first_mask,
        eval_cfg.propagation_temperature,
        eval_cfg.propagation_topk,
        eval_cfg.propagation_context,
    )


def region_similarity(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """DAVIS's J of one clip: for each object of the first frame, the IoU of predicted and true
    masks averaged over frames 1..T-1 (an object absent from both counts as 1), then averaged
    over objects."""
    objects = [i for i in torch.unique(truth[0]).tolist() if i != 0]
    if not objects:
        return float("nan")
    scores = []
    for obj in objects:
        p, g = predicted[1:] == obj, truth[1:] == obj
        inter, union = (p & g).flatten(1).sum(1).float(), (p | g).flatten(1).sum(1).float()
        scores.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean())
    return torch.stack(scores).mean().item()


@torch.no_grad()
def propagation_scores(
    dense_features, clips: torch.Tensor, masks: torch.Tensor, device: torch.device, eval_cfg
) -> dict[str, float]:
    """Mean J over the test clips of the propagated masks (`propagation_j`) and of the copied
    first mask (`copy_first_j`). `dense_features`: uint8 frames [T, 3, H, W] -> [T, D, h, w]."""
    propagated, copied = [], []
    for clip, truth in zip(clips, masks):
        predicted = propagate_clip(dense_features, clip, truth[0], device, eval_cfg)
        propagated.append(region_similarity(predicted, truth))
        copied.append(region_similarity(truth[:1].expand_as(truth), truth))
    mean = lambda values: float(torch.tensor(values).nanmean())
    return {"propagation_j": mean(propagated), "copy_first_j": mean(copied)}


def overlay(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """uint8 frames [T, 3, H, W], each instance tinted by its palette colour: float, in [0, 1]."""
    colours = PALETTE[masks.long() % len(PALETTE)].permute(0, 3, 1, 2)  # [T, 3, H, W]
    tint = (masks > 0)[:, None].float() * 0.55
    return (frames.float() * (1 - tint) + colours * tint) / 255


@torch.no_grad()
def propagation_strip(dense_features, data, device: torch.device, eval_cfg, clip: int = 0) -> torch.Tensor:
    """One test clip as three rows (frames; true masks; masks propagated from the first frame):
    uint8 [3, 3 * H, T * W], an MLflow artifact to look at."""
    frames, truth = data.test_images[clip], data.test_masks[clip]
    predicted = propagate_clip(dense_features, frames, truth[0], device, eval_cfg)
    return image_grid([frames.float() / 255, overlay(frames, truth), overlay(frames, predicted)])
