"""Every method under real DDP: two gloo ranks run the training loop Ray Train runs (spawned
here with torch alone, as `torchrun` would: a Ray Train fit costs ~25 s, 13 of them would not fit
the suite; tests/test_ray.py runs the same loop through Ray's TorchTrainer)."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY, for_method
from sslab.methods.registry import METHODS
from sslab.platform.spec import trial_spec
from sslab.platform.train import train_loop
from sslab.platform.validate import build_study


def study_for(name: str) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(name=f"ddp-{name}")
    raw["train"].update(epochs=1, report_every_steps=2)
    raw["eval"] = {"knn_k": 20, "protocols": ["knn"], "random_init_baseline": False}
    return for_method(raw, name)


def _join(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _train_every_method(rank, world, init_file, root, out):
    _join(rank, world, init_file)
    for name in sorted(METHODS):
        config = trial_spec(build_study(study_for(name)), f"{root}/{name}", None)
        try:
            metrics = train_loop(config)
            result = metrics.get("loss", float("nan")) if rank == 0 else "ok"
        except Exception as err:  # one method's failure must not hide the others'
            result = f"{type(err).__name__}: {err}"
        out[(rank, name)] = result
    dist.destroy_process_group()


def test_every_method_trains_an_epoch_on_two_ddp_ranks(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_train_every_method, args=(2, str(tmp_path / "store"), str(tmp_path), out), nprocs=2, join=True)
    failures = {
        name: out[(rank, name)]
        for rank in (0, 1)
        for name in METHODS
        if isinstance(out[(rank, name)], str) and out[(rank, name)] != "ok"
    }
    assert not failures, failures
    for name in METHODS:
        assert math.isfinite(out[(0, name)]), name
        assert (tmp_path / name / "checkpoint.pt").exists(), name


# ----------------------------------------------------------------------------- same loss, any split

# Losses over the global batch (negatives, correlations, variances, Sinkhorn's marginals): the
# loss and gradient must not depend on how the batch is split over ranks.
CONTRASTIVE = ["simclr", "clip", "barlow_twins", "vicreg", "swav", "moco_v3", "simsiam"]


def _deterministic_loss(name: str, images: torch.Tensor, index: torch.Tensor):
    """The method's training loss with views fixed (no random augmentation) and batch norm on
    its running statistics, so that only the distributed maths can change the value."""
    torch.manual_seed(0)
    raw = study_for(name)
    study = build_study(raw)
    from sslab.platform.build import build_method
    from sslab.platform.data import load_dataset
    from sslab.platform.runtime import distribute, make_runtime

    data = load_dataset(study.data)
    method = build_method(
        study,
        data,
        torch.device("cpu"),
        total_steps=10,
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
    )
    for view in method.modules():
        if hasattr(view, "ops") and hasattr(view, "recipe"):  # an Augment: keep it, minus randomness
            view.ops = torch.nn.Identity()
    method.eval()
    model = distribute(method, make_runtime("local", study.train))
    loss, _ = model(images, 0, index)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    return loss.detach(), grads


def _split_loss(rank, world, init_file, name, images, index, out):
    _join(rank, world, init_file)
    n = len(images) // world
    part = slice(rank * n, (rank + 1) * n)
    out[rank] = _deterministic_loss(name, images[part], index[part])
    dist.destroy_process_group()


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_contrastive_loss_on_two_ranks_equals_the_single_process_loss(tmp_path, name):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    index = torch.arange(16)
    reference, reference_grads = _deterministic_loss(name, images, index)
    out = mp.Manager().dict()
    mp.spawn(_split_loss, args=(2, str(tmp_path / "store"), name, images, index, out), nprocs=2, join=True)
    assert ((out[0][0] + out[1][0]) / 2).item() == pytest.approx(reference.item(), rel=1e-5)
    # DDP averages the gradients: every rank holds the global batch's gradient
    # (to float32 rounding at the gradients' own scale: Barlow Twins' reach hundreds)
    scale = max(1.0, reference_grads.abs().max().item())
    assert torch.allclose(out[0][1], reference_grads, rtol=1e-4, atol=1e-5 * scale)
    assert torch.allclose(out[0][1], out[1][1])
