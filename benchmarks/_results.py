"""What every multi-GPU benchmark records beside its numbers: where it ran and with what."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def gpu_meta(world: int) -> dict:
    """Device, GPU count and versions (torch, CUDA, NCCL, Python)."""
    return {
        "device": torch.cuda.get_device_name(0),
        "gpus": world,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "python": platform.python_version(),
    }


def results_path(name: str, world: int) -> Path:
    """``benchmarks/results/<name>_<device>_<n>gpu.json`` (the folder created)."""
    slug = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "_").lower()
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}_{slug}_{world}gpu.json"


def cuda_median_seconds(
    fn: Callable[[], object], iters: int, barrier: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` on the GPU (CUDA events), ``barrier()`` before each run if given."""
    import torch

    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if barrier is not None:
            barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
