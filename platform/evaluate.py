"""Evaluation of frozen features: the weighted kNN monitor (Wu et al. 2018, Sec. 3.4)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode (BN uses running statistics, no dropout) for the block, then back as it was."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def extract_features(features_fn, images: torch.Tensor, device: torch.device,
                     batch_size: int = 512, amp: bool = False) -> torch.Tensor:
    """Runs `features_fn` over uint8 `images` in batches; returns float32 features on `device`."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(features_fn(batch).float())
    return torch.cat(out)


@torch.no_grad()
def knn_predict_scores(train_features: torch.Tensor, train_labels: torch.Tensor,
                       test_features: torch.Tensor, num_classes: int, k: int = 200,
                       temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores of a weighted kNN on L2-normalised features (cosine similarity).

    Each of the k nearest training samples votes for its class with weight exp(s / T)
    (Wu et al. 2018, instance discrimination, eq. 7/8).
    """
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    k = min(k, len(train_features))
    scores = []
    for start in range(0, len(test_features), chunk):
        sims = test_features[start:start + chunk] @ train_features.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    ranked = scores.topk(max(ks), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    """{'knn_top1': ..., 'knn_top5': ...} in [0, 1]."""
    device = train_features.device
    scores = knn_predict_scores(train_features, train_labels.to(device), test_features,
                                num_classes, k, temperature)
    acc = topk_accuracy(scores, test_labels.to(device), ks=(1, min(5, num_classes)))
    return {"knn_top1": acc[1], "knn_top5": acc[min(5, num_classes)]}
