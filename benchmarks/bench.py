"""`sslab bench`: training throughput of three data paths, side by side in one run.

  sslab       uint8 dataset tensor on the device, whole-batch augmentation there (the real loop)
  dataloader  torchvision DataLoader with PIL transforms in worker processes (the usual setup)
  bare        the model's forward + backward + step on views made once (the ceiling)

The same method, model, batch and optimiser in all three; only where the views come from
differs. `--precision` times the bare step instead in fp32, bf16 autocast, channels_last and
both, side by side. Every path is also put against the machine's limit: the FLOPs of one
training step (torch's flop counter) over its time, as a fraction of a large matmul's FLOP/s
in fp32 and in bf16 measured on the same threads. Prints the ratios and writes everything to a
JSON file. Needs torch alone (no Ray, no MLflow), so it runs on a bare GPU machine too.
`--streaming` instead times the step on batches from the uint8 tensor against the same step on
batches decoded from the image files per batch (`data.loading: stream`).
"""

from __future__ import annotations

import json
import os
import platform as std_platform
import time
from itertools import cycle
from pathlib import Path

import torch
from torch import nn

from sslab.platform.augment import ColorJitter
from sslab.platform.build import build_method
from sslab.platform.data import load_dataset
from sslab.platform.optim import build_optimizer
from sslab.platform.train import train_step
from sslab.platform.validate import build_study


class ViewFeed(nn.Module):
    """Stands in for a method's augmentation: returns views prepared elsewhere, in order."""

    def __init__(self):
        super().__init__()
        self.views: list[torch.Tensor] = []

    def forward(self, images):
        return self.views.pop(0)


def _study(args) -> dict:
    return {
        "name": "bench",
        "method": args.method,
        "data": {
            "name": args.data,
            "root": args.root,
            "subset": args.images,
            "train_size": args.images,
            "test_size": 16,
            "image_size": 32,
        },
        "backbone": {"name": args.backbone, "width": args.width},
        "train": {
            "batch_size": args.batch_size,
            "amp": args.amp,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "lr": 0.1,
            "use_gpu": args.device == "cuda",
        },
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(step_fns: dict, rounds: int, steps: int, warmup: int, device) -> tuple[dict, dict]:
    """Median seconds per step of each path, and each path's first step (which includes
    torch.compile's compilation). The paths take turns, `steps` at a time, so that drift
    (warm-up, thermal, other load) hits them all alike rather than whichever ran first."""
    import statistics

    first = {}
    for name, fn in step_fns.items():
        start = time.perf_counter()
        fn()
        _sync(device)
        first[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            fn()
    times = {name: [] for name in step_fns}
    for _ in range(rounds):
        for name, fn in step_fns.items():
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, first


def measured_ceiling(device: torch.device, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an n x n matmul in fp32 and in bf16 on this device and thread count: what the
    hardware gives the densest kernel, the yardstick for a training step's achieved FLOP/s. No
    bf16 ceiling where bf16 is emulated (it is no ceiling, and takes minutes to measure)."""
    import statistics

    from sslab.platform.runtime import native_bf16

    ceiling = {}
    kinds = (
        (("fp32", torch.float32), ("bf16", torch.bfloat16))
        if native_bf16(device)
        else (("fp32", torch.float32),)
    )
    for name, dtype in kinds:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up: kernel choice, caches
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - start)
        ceiling[name] = 2 * n**3 / statistics.median(times)
    return ceiling


def step_flops(step_fn) -> float:
    """FLOPs of one call of `step_fn` (forward, backward, optimiser), by torch's flop counter:
    matmuls and convolutions, the work that dominates a training step."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_fn()
    return float(counter.get_total_flops())


def _pil_loader(data, recipe, batch_size: int, workers: int, views: int, mean, std, pin: bool):
    """The conventional pipeline: PIL images, torchvision transforms per sample, DataLoader."""
    import torchvision.transforms as T
    from PIL import Image

    s = recipe.jitter_strength
    transform = T.Compose(
        [
            T.RandomResizedCrop(data.image_size, scale=(recipe.crop_scale_min, 1.0)),
            T.RandomHorizontalFlip(recipe.flip_p),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))], p=recipe.jitter_p),
            T.RandomGrayscale(recipe.grayscale_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    arrays = data.train_images.permute(0, 2, 3, 1).cpu().numpy()

    class PilDataset(torch.utils.data.Dataset):  # like torchvision's CIFAR10: a PIL image per item
        def __len__(self):
            return len(arrays)

        def __getitem__(self, i):
            image = Image.fromarray(arrays[i])
            return [transform(image) for _ in range(views)]

    return torch.utils.data.DataLoader(
        PilDataset(),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )


def run_bench(args) -> dict:
    device = torch.device(args.device)
    study = build_study(_study(args))
    data = load_dataset(study.data)
    data.train_images = data.train_images.to(device)
    if args.streaming:
        return _streaming_bench(args, study, data, device)
    steps, flops_step = (_precision_paths if args.precision else _data_paths)(args, study, data, device)
    seconds, first_step = _time_interleaved(steps, args.rounds, args.steps, args.warmup, device)
    flops = step_flops(flops_step)
    ceiling = measured_ceiling(device)
    batch, views_per_image = args.batch_size, 2
    paths = {
        name: {
            "seconds_per_step": s,
            "first_step_seconds": first_step[name],
            "images_per_s": batch / s,
            "views_per_s": views_per_image * batch / s,
            "seconds_per_epoch": args.epoch_images / batch * s,
            "flops_per_s": flops / s,
            "fraction_of_fp32_ceiling": flops / s / ceiling["fp32"],
            "fraction_of_bf16_ceiling": flops / s / ceiling["bf16"] if "bf16" in ceiling else None,
        }
        for name, s in seconds.items()
    }
    if args.precision:
        ratios = {
            f"{name}_speedup_vs_fp32": seconds["fp32"] / s for name, s in seconds.items() if name != "fp32"
        }
    else:
        ratios = {
            "data_path_overhead_vs_bare": seconds["sslab"] / seconds["bare"] - 1,
            "sslab_speedup_vs_dataloader": seconds["dataloader"] / seconds["sslab"],
            "sslab_speedup_vs_before": seconds[BEFORE] / seconds["sslab"],
        }
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores, {std_platform.processor() or std_platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "fn", "command")},
        "flops_per_step": flops,
        "ceiling_flops_per_s": ceiling,
        "paths": paths,
        "ratios": ratios,
    }


def _streaming_bench(args, study, data, device) -> dict:
    """sslab's step on batches indexed from the uint8 tensor ("memory") against the same step on
    batches decoded from the same image files by `--loader-workers` processes ("stream", what
    `data.loading: stream` trains on). Each round times `--steps` consecutive steps of each; the
    stream's pipeline starts afresh every round and first runs 2 batches per worker untimed (its
    prefetch depth), so the timed steps are its sustained rate, not a full prefetch buffer.
    With `--ray-data`, a third path decodes the same batches as Ray Data tasks on a local Ray
    (`data.stream_engine: ray_data`), with as many tasks at once as loader workers."""
    import statistics

    from sslab.platform.data import scan_image_folder, subset_items
    from sslab.platform.streaming import ImageFiles, epoch_batches

    if args.data != "imagefolder":
        raise SystemExit("sslab bench --streaming needs --data imagefolder --root DIR (files to stream)")
    method = build_method(study, data, device, total_steps=1_000_000)
    optimizer = build_optimizer(method, study.train)
    items = subset_items(scan_image_folder(Path(args.root).expanduser().resolve()).train, args.images, 0)
    files = ImageFiles([f for f, _ in items], data.image_size)  # the files of `data`'s subset
    gen = torch.Generator().manual_seed(0)
    draw = lambda: torch.randint(len(files), (args.batch_size,), generator=gen)
    lead = 2 * max(1, args.loader_workers)

    def step(images, index):
        train_step(
            method, method, optimizer, images.to(device, non_blocking=True), 0, index.to(device), args.amp
        )

    def timed(batches, indices) -> list[float]:
        times = []
        for images, index in zip(batches, indices):
            _sync(device)
            start = time.perf_counter()
            step(images, index)
            _sync(device)
            times.append(time.perf_counter() - start)
        return times

    for _ in range(args.warmup):
        index = draw()
        step(data.train_images[index.to(device)], index)
    engines = {"stream": "dataloader"}
    if args.ray_data:
        from sslab.platform.ray_cluster import start_local_ray

        start_local_ray()
        engines["stream_ray_data"] = "ray_data"
    times = {"memory": []} | {name: [] for name in engines}
    for _ in range(args.rounds):
        indices = [draw() for _ in range(args.steps)]
        times["memory"] += timed((data.train_images[i.to(device)] for i in indices), indices)
        for name, engine in engines.items():
            indices = [draw() for _ in range(lead + args.steps)]
            batches = epoch_batches(files, indices, args.loader_workers, device, engine)
            for index, images in zip(indices[:lead], batches):  # the pipeline fills, untimed
                step(images, index)
            times[name] += timed(batches, indices[lead:])
    seconds = {name: statistics.median(t) for name, t in times.items()}
    cost = lambda name: seconds[name] / seconds["memory"] - 1
    return {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "fn", "command")},
        "paths": {
            name: {"seconds_per_step": s, "images_per_s": args.batch_size / s} for name, s in seconds.items()
        },
        "ratios": {
            f"{'streaming' if name == 'stream' else name}_cost_vs_memory": cost(name) for name in engines
        },
    }


def _data_paths(args, study, data, device):
    """sslab's data path, the DataLoader's and the bare step (views made once), on one method."""
    method = build_method(study, data, device, total_steps=1_000_000)
    if args.compile:
        method.backbone.compile()
    optimizer = build_optimizer(method, study.train)
    views_per_image, batch = 2, args.batch_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def sslab_step():
        index = torch.randint(len(data.train_images), (batch,), generator=gen).to(device)
        train_step(method, method, optimizer, data.train_images[index], 0, index, args.amp)

    first = torch.arange(batch, device=device)  # the images the fixed views come from
    real_augment = method.augment
    fixed = [real_augment(data.train_images[:batch]) for _ in range(views_per_image)]
    feed = ViewFeed()

    def bare_step():
        feed.views = list(fixed)
        train_step(method, method, optimizer, data.train_images[:batch], 0, first, args.amp)

    loader = _pil_loader(
        data,
        real_augment.recipe,
        batch,
        args.loader_workers,
        views_per_image,
        real_augment.normalize.mean.flatten().tolist(),
        real_augment.normalize.std.flatten().tolist(),
        device.type == "cuda",
    )
    batches = cycle(loader)

    def loader_step():
        feed.views = [v.to(device, non_blocking=True) for v in next(batches)]
        if study.train.channels_last:
            feed.views = [v.contiguous(memory_format=torch.channels_last) for v in feed.views]
        train_step(method, method, optimizer, data.train_images[:batch], 0, first, args.amp)

    def with_augment(augment, fn):
        def step():
            method.augment = augment
            fn()

        return step

    steps = {
        "sslab": with_augment(real_augment, sslab_step),
        "bare": with_augment(feed, bare_step),
        "dataloader": with_augment(feed, loader_step),
        BEFORE: _before_path(args, study, data, device),
    }
    return steps, with_augment(feed, bare_step)


BEFORE = "main@c08d6ab"  # the sslab path as main ran it before the speed work


def _before_path(args, study, data, device):
    """sslab's path as main ran it at c08d6ab: fp32, NCHW, eager, and kornia's per-image crop
    and its ColorJitter (whose hue round trip through HSV cost more than the rest of the jitter)."""
    import dataclasses

    import kornia.augmentation as K

    before = dataclasses.replace(
        study, train=dataclasses.replace(study.train, amp=False, channels_last=False, compile=False)
    )
    torch.manual_seed(0)
    method = build_method(before, data, device, total_steps=1_000_000)
    optimizer = build_optimizer(method, before.train)
    recipe, ops = method.augment.recipe, method.augment.ops
    size, s = data.image_size, recipe.jitter_strength
    ops[0] = K.RandomResizedCrop((size, size), scale=(recipe.crop_scale_min, recipe.crop_scale_max))
    for i, op in enumerate(ops):
        if isinstance(op, ColorJitter):
            ops[i] = K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5), p=recipe.jitter_p)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step():
        index = torch.randint(len(data.train_images), (args.batch_size,), generator=gen).to(device)
        train_step(method, method, optimizer, data.train_images[index], 0, index, False)

    return step


PRECISIONS = {  # name: (bf16 autocast, channels_last, torch.compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "channels_last": (False, True, False),
    "bf16+channels_last": (True, True, False),
    "bf16+cl+compile": (True, True, True),
}


def _precision_paths(args, study, data, device):
    """The bare step (views made once) of the same model, initialised alike, in each precision
    and memory format: what bf16 autocast and channels_last buy on this device."""
    import dataclasses

    steps = {}
    batch = data.train_images[: args.batch_size]
    first = torch.arange(args.batch_size, device=device)
    variants = {k: v for k, v in PRECISIONS.items() if args.compile or not v[2]}
    for name, (amp, channels_last, compile_) in variants.items():
        variant = dataclasses.replace(
            study, train=dataclasses.replace(study.train, amp=amp, channels_last=channels_last)
        )
        torch.manual_seed(0)
        method = build_method(variant, data, device, total_steps=1_000_000)
        if compile_:
            method.backbone.compile()
        optimizer = build_optimizer(method, variant.train)
        views = [method.augment(batch) for _ in range(2)]
        method.augment = ViewFeed()

        def step(method=method, optimizer=optimizer, views=views, amp=amp):
            method.augment.views = list(views)
            train_step(method, method, optimizer, batch, 0, first, amp)

        steps[name] = step
    return steps, steps["fp32"]


def format_result(result: dict) -> str:
    s = result["settings"]
    if s.get("streaming"):
        return "\n".join(
            [
                f"device: {result['device']}, torch {result['torch']}, {result['threads']} threads; "
                f"{s['method']} / {s['backbone']} width {s['width']}, batch {s['batch_size']}, "
                f"{s['loader_workers']} decoders, median of {s['rounds']} rounds x {s['steps']} steps",
            ]
            + [
                f"{name:<16}{p['seconds_per_step']:>9.4f} s/step{p['images_per_s']:>9.0f} images/s"
                for name, p in result["paths"].items()
            ]
            + [
                f"{name.removesuffix('_cost_vs_memory')} costs {100 * cost:+.1f}% per step against "
                "the in-memory tensor"
                for name, cost in result["ratios"].items()
            ]
        )
    lines = [
        f"device: {result['device']}, torch {result['torch']}, {result['threads']} threads",
        f"{s['method']} / {s['backbone']} width {s['width']}, batch {s['batch_size']}, "
        f"amp {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}, "
        f"median of {s['rounds']} rounds x {s['steps']} steps per path (interleaved), "
        f"after {s['warmup']} warm-up",
        f"{'path':<19}{'s/step':>9}{'1st step':>9}{'images/s':>11}{'views/s':>11}{'s/epoch':>10}"
        f"  (epoch = {s['epoch_images']} images)",
    ]
    lines[-1] += "   GFLOP/s  of fp32 / bf16 ceiling"
    for name, p in result["paths"].items():
        lines.append(
            f"{name:<19}{p['seconds_per_step']:>9.4f}{p['first_step_seconds']:>9.2f}{p['images_per_s']:>11.0f}"
            f"{p['views_per_s']:>11.0f}{p['seconds_per_epoch']:>10.2f}"
            f"{p['flops_per_s'] / 1e9:>10.1f}  {100 * p['fraction_of_fp32_ceiling']:5.1f}% / "
            + (f"{100 * p['fraction_of_bf16_ceiling']:4.1f}%" if p["fraction_of_bf16_ceiling"] else "n/a")
        )
    c = result["ceiling_flops_per_s"]
    lines.append(
        f"one training step: {result['flops_per_step'] / 1e9:.2f} GFLOP (torch's flop counter); ceiling: "
        f"2048x2048 matmul {c['fp32'] / 1e9:.1f} GFLOP/s fp32, "
        + (f"{c['bf16'] / 1e9:.1f} GFLOP/s bf16" if "bf16" in c else "bf16 emulated here (no ceiling)")
    )
    r = result["ratios"]
    if "data_path_overhead_vs_bare" in r:
        lines.append(
            f"sslab data path costs {100 * r['data_path_overhead_vs_bare']:+.1f}% over the bare model step; "
            f"sslab is {r['sslab_speedup_vs_dataloader']:.2f}x the DataLoader pipeline, "
            f"and {r['sslab_speedup_vs_before']:.2f}x sslab's path as main ran it at c08d6ab"
        )
    else:
        lines.append(
            "speed-up over fp32: "
            + ", ".join(f"{k.removesuffix('_speedup_vs_fp32')} {v:.2f}x" for k, v in r.items())
        )
    return "\n".join(lines)


def main(args) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_bench(args)
    print(format_result(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written to {args.out}")
    return 0
