"""Sequence parallelism for inference commands launched by torchrun (``cupola eval niah --sp N``,
``cupola vlm chat --sp N``): one process per rank, the process group and the mesh built here."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from cupola.toolkit.config import ConfigError

__all__ = ["launched_sequence_parallel"]


def launched_sequence_parallel(sp: int, sp_ulysses: int, device: str, command: str):
    """This process's :class:`~cupola.toolkit.parallel.sequence.SequenceParallel` over ``sp``
    processes (``sp_ulysses`` of them Ulysses, -1: all), and its device (``cuda:<local rank>`` on
    GPUs). Needs torchrun (or an initialised process group) with exactly ``sp`` processes; otherwise
    a :class:`ConfigError` that shows ``command`` launched right."""
    from cupola.toolkit.parallel.dims import ParallelDims

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != sp:
        raise ConfigError(
            f"--sp {sp} needs {sp} processes, this is {world}: launch with "
            f"`torchrun --nproc-per-node {sp} -m cupola {command} ... --sp {sp}`"
        )
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = f"cuda:{torch.cuda.current_device()}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dims = ParallelDims(sp=sp, sp_ulysses=sp_ulysses)
    dims.build_mesh("cuda" if cuda else "cpu")
    return dims.sequence_parallel(), device
