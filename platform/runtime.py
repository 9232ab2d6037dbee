"""A training process as the loop sees it: its `Runtime`, whether its device computes bf16
natively, the one DDP wrap of a method, and the lines it prints. Ray is imported only when the
runtime needs it, so the loop runs with torch alone."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslab.methods.base import Method
from sslab.platform import distributed
from sslab.platform.config import TrainConfig
from sslab.platform.tune_results import tune_result


@dataclass
class Runtime:
    """Where this process runs (rank, world size, device) and where its epochs are reported:
    nowhere else ("local", also under torchrun), to Tune ("tune") or to Ray Train ("train").
    The loop reports every epoch the same way; what each place needs is decided here."""

    kind: str
    rank: int
    world_size: int
    device: torch.device
    trial_name: str = ""
    tune_checkpoints: bool = False  # PBT: Tune hands checkpoints from trial to trial

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def report(self, metrics: dict, epoch: int, is_last: bool, checkpoint_dir: Path | None) -> None:
        """One epoch's metrics; `checkpoint_dir` where this epoch saved one."""
        if self.kind == "tune":
            import ray.tune

            result = tune_result(metrics, self.trial_name, epoch, is_last, pbt=self.tune_checkpoints)
            given = checkpoint_dir if self.tune_checkpoints else None
            ray.tune.report(result, checkpoint=given and ray.tune.Checkpoint.from_directory(given))
        elif self.kind == "train":
            import ray.train

            ray.train.report(metrics)  # a barrier: every rank calls it


def make_runtime(
    kind: str, train: TrainConfig, trial_name: str = "", tune_checkpoints: bool = False
) -> Runtime:
    """kind "train": a Ray Train worker; otherwise this process, in a process group if one was
    started (torchrun, or the DDP tests) and alone if not."""
    if kind == "train":
        import ray.train.torch

        device = ray.train.torch.get_device()
    elif train.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    return Runtime(
        kind,
        distributed.rank(),
        distributed.world_size(),
        device,
        trial_name,
        tune_checkpoints=kind == "tune" and tune_checkpoints,
    )


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it (Ampere on), or a CPU
    with AVX512-BF16 or AMX (Linux, where /proc/cpuinfo says). Elsewhere bf16 is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # e.g. Apple's MPS: bf16 is the device's own business
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def distribute(method: Method, runtime: Runtime) -> nn.Module:
    """What the loop calls for a training step: the method, or under several workers DDP around
    the whole method (its forward is the training step). Hooks, checkpoints and evaluation keep
    using `method` itself, as DINO's and MAE's reference trainers keep `model_without_ddp`."""
    if runtime.world_size == 1:
        return method
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # No buffer sync in forward: each rank keeps its own BN statistics (as SimCLR's per-device
    # BN), and a forward on one rank alone (kNN on rank 0) needs no collective. torch >= 2.14
    # names this forward_sync_buffers; older releases broadcast_buffers.
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(method, device_ids=device_ids, **no_sync)


def process_rss_mb() -> float:
    """This process's resident memory (MB): a trial logs it at its start (what an earlier trial
    left in a reused process) and every epoch."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def release_freed_memory() -> None:
    """Hands what a finished trial freed back to the OS. Tune runs each trial in a new thread of
    a reused process; glibc keeps what a thread's arena freed, so without this the process grew
    by 200-480 MB per trial (measured: RssAnon 487 -> 1899 MB over 5 tiny SimCLR trials, back to
    631 MB after malloc_trim; benchmarks/trial_memory.py)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(libc).malloc_trim if libc else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return
    if trim:
        trim(0)


def say(runtime: Runtime, text: str) -> None:
    if runtime.is_main:
        print(f"[{runtime.trial_name}] {text}", flush=True)
