"""Evaluation protocols on a method's encoder: the weighted kNN monitor (Wu et al. 2018, Sec. 3.4),
the linear probe and fine-tuning on frozen or copied features, with label fractions; mask
propagation on video; and the same protocols on a saved checkpoint (`sslab eval`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sslab.platform.augment import Augment, AugmentRecipe
from sslab.platform.build import method_from_checkpoint
from sslab.platform.config import StudyConfig
from sslab.platform.dataset import Dataset
from sslab.platform.propagation import propagation_scores


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
def extract_features(
    features_fn, images: torch.Tensor, device: torch.device, batch_size: int = 512, amp: bool = False
) -> torch.Tensor:
    """Runs `features_fn` over uint8 `images` in batches; returns float32 features on `device`."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(features_fn(batch).float())
    return torch.cat(out)


@torch.no_grad()
def knn_predict_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of a weighted kNN on L2-normalised features (cosine similarity).

    Each of the k nearest training samples votes for its class with weight exp(s / T)
    (Wu et al. 2018, instance discrimination, eq. 7/8).
    """
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    k = min(k, len(train_features))
    scores = []
    for start in range(0, len(test_features), chunk):
        sims = test_features[start : start + chunk] @ train_features.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def top1_top5(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{'top1', 'top5'} accuracies of class scores (top-5 is top-k for fewer than 5 classes)."""
    k = min(5, scores.shape[1])
    hits = scores.topk(k, dim=1).indices == labels.to(scores.device).view(-1, 1)
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item()}


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float]:
    """{'knn_top1': ..., 'knn_top5': ...} in [0, 1]."""
    scores = knn_predict_scores(
        train_features, train_labels.to(train_features.device), test_features, num_classes, k, temperature
    )
    return {f"knn_{k}": v for k, v in top1_top5(scores, test_labels).items()}


# ----------------------------------------------------------------------------- label subsets


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of round(fraction * n_c) images of every class c (at least one each),
    the same for the same labels, fraction and seed (saved with the run)."""
    if fraction >= 1:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values


# ----------------------------------------------------------------------------- linear probe


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    l2: float = 1e-4,
    max_iter: int = 500,
) -> dict[str, float]:
    """Multinomial logistic regression on frozen features, trained to convergence (L-BFGS, full
    batch): minimises mean cross-entropy + l2/2 ||W||^2 on standardised features, which is
    scikit-learn's LogisticRegression with C = 1 / (l2 * n)."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    y_train = train_labels.to(x_train.device)
    classifier = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(),
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(x_train), y_train) + l2 / 2 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return top1_top5(classifier(x_test), test_labels)


# ----------------------------------------------------------------------------- fine-tuning


def finetune(
    encoder,
    train_images,
    train_labels,
    test_images,
    test_labels,
    num_classes: int,
    device,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    amp: bool = False,
) -> dict[str, float]:
    """A copy of the method's encoder (the pretrained one is untouched) plus a linear head,
    trained with labels under crop + flip augmentation, SGD with cosine decay; scored on the
    test split. The copy sees the encoder's own input transform, as kNN and the probe do."""
    torch.manual_seed(seed)
    model = nn.Sequential(copy.deepcopy(encoder.module), nn.Linear(encoder.dim, num_classes)).to(device)
    crop_flip = Augment(
        AugmentRecipe(crop_scale_min=0.2, jitter_p=0.0, grayscale_p=0.0),
        train_images.shape[-1],
        normalize=None,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    batch_size = min(batch_size, len(train_images))
    steps = epochs * max(1, len(train_images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            images = train_images[index.to(train_images.device)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(encoder.transform(crop_flip.unit(images)))
                loss = F.cross_entropy(logits.float(), train_labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with eval_mode(model):
        scores = extract_features(lambda x: model(encoder.transform(x)), test_images, device, amp=amp)
    return top1_top5(scores, test_labels)


# ----------------------------------------------------------------------------- all protocols


def fraction_suffix(fraction: float) -> str:
    """'' for all labels, '_1pct' / '_10pct' for label fractions (MLflow keys allow no '%')."""
    return "" if fraction >= 1 else f"_{100 * fraction:g}pct".replace(".", "p")


def monitored_knn(method, data, eval_cfg, device, prefix: str) -> dict[str, float]:
    """kNN of the other networks a method follows (`monitored_encoders`): `<prefix><name>_knn_top1`."""
    metrics = {}
    with eval_mode(method):
        for name, encoder in method.monitored_encoders().items():
            features = lambda x, e=encoder: e.module(e.transform(x))
            knn = knn_accuracy(
                extract_features(features, data.train_images, device),
                data.train_labels,
                extract_features(features, data.test_images, device),
                data.test_labels,
                len(data.classes),
                k=eval_cfg.knn_k,
                temperature=eval_cfg.knn_temperature,
            )
            metrics |= {f"{prefix}{name}_{k}": v for k, v in knn.items()}
    return metrics


def run_protocols(
    method, data, eval_cfg, device, seed: int = 0, amp: bool = False, prefix: str = "eval/"
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Every configured protocol on `method`'s frozen (or, for fine-tuning, copied) encoder.
    Returns (metrics, label subsets used); features are computed once for all protocols.
    On video data: mask propagation (J) instead, whatever the protocols (clips have no classes)."""
    if data.kind == "video":
        with eval_mode(method):
            scores = propagation_scores(
                method.dense_features, data.test_images, data.test_masks, device, eval_cfg
            )
        return {prefix + k: v for k, v in scores.items()}, {}
    with eval_mode(method):
        # Frozen features in fp32 whatever the training precision: kNN and the probe then measure
        # what training learned, not bf16 rounding (`amp` speeds up fine-tuning's training only).
        train_f = extract_features(method.features, data.train_images, device)
        test_f = extract_features(method.features, data.test_images, device)
    num_classes = len(data.classes)
    metrics, subsets = {}, {}
    # kNN always: it is the monitor every report and scheduler reads, and nearly free here.
    knn = knn_accuracy(
        train_f,
        data.train_labels,
        test_f,
        data.test_labels,
        num_classes,
        k=eval_cfg.knn_k,
        temperature=eval_cfg.knn_temperature,
    )
    metrics |= {f"{prefix}{k}": v for k, v in knn.items()}
    metrics |= monitored_knn(method, data, eval_cfg, device, prefix)
    for fraction in eval_cfg.label_fractions:
        keep = balanced_subset(data.train_labels, fraction, seed)
        suffix = fraction_suffix(fraction)
        if fraction < 1:
            subsets[f"labels{suffix}"] = keep.tolist()
        if "linear" in eval_cfg.protocols:
            result = linear_probe(
                train_f[keep.to(train_f.device)],
                data.train_labels[keep],
                test_f,
                data.test_labels,
                num_classes,
                l2=eval_cfg.linear_l2,
            )
            metrics |= {f"{prefix}linear_{k}{suffix}": v for k, v in result.items()}
        if "finetune" in eval_cfg.protocols:
            result = finetune(
                method.encoder(),
                data.train_images[keep.to(data.train_images.device)],
                data.train_labels[keep],
                data.test_images,
                data.test_labels,
                num_classes,
                device,
                epochs=eval_cfg.finetune_epochs,
                lr=eval_cfg.finetune_lr,
                seed=seed,
                amp=amp,
            )
            metrics |= {f"{prefix}finetune_{k}{suffix}": v for k, v in result.items()}
    return metrics, subsets


def protocol_eval(
    method, data: Dataset, study: StudyConfig, device: torch.device, prefix: str
) -> tuple[dict[str, float], dict]:
    """Every evaluation protocol of the study (kNN always) and the method's own, keys prefixed."""
    metrics, subsets = run_protocols(
        method, data, study.eval, device, seed=study.train.seed, amp=study.train.amp, prefix=prefix
    )
    with eval_mode(method):
        metrics |= {prefix + k: v for k, v in method.evaluate(data).items()}
    return metrics, subsets


def knn_eval(method, data: Dataset, study: StudyConfig, device: torch.device) -> dict[str, float]:
    """The per-epoch monitor: weighted kNN on eval-mode features, plus the method's own."""
    knn_only = dataclasses.replace(study.eval, protocols=["knn"], label_fractions=[1.0])
    return protocol_eval(method, data, dataclasses.replace(study, eval=knn_only), device, prefix="")[0]


def evaluate_checkpoint(
    study: StudyConfig, data: Dataset, checkpoint: Path | None, device: torch.device, prefix: str = "eval/"
) -> tuple[dict[str, float], dict, int]:
    """The study's protocols on a checkpoint's encoder (None: random initialisation).
    Returns (metrics, label subsets, epochs the checkpoint had trained)."""
    torch.manual_seed(study.train.seed)
    method, epoch = method_from_checkpoint(study, data, checkpoint, device)
    metrics, subsets = protocol_eval(method, data, study, device, prefix)
    return metrics, subsets, epoch
