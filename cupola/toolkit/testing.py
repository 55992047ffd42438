"""Run a function in several real processes on gloo — how distributed code is tested on CPU.

    def _check(rank: int, world_size: int, tmp: str) -> None:
        ...  # torch.distributed is initialised (gloo); assert here

    def test_something(tmp_path):
        spawn(_check, 2, str(tmp_path))

``fn`` must be a module-level function (it is pickled by reference). A failure in any rank
fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a gloo group."""
    mp.spawn(_worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def kill_marked_processes(variable: str, marker: str, since: float, timeout: float = 20.0) -> None:
    """SIGKILL every process started at or after ``since`` (epoch seconds) whose environment has
    ``variable=marker``, and wait for them: what a test's subprocess left behind outside its
    process group (Ray's raylet, GCS and workers start sessions of their own). Fails if any survive."""
    import psutil

    marked = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            if proc.info["create_time"] >= since - 1 and proc.environ().get(variable) == marker:
                proc.kill()
                marked.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    _, alive = psutil.wait_procs(marked, timeout=timeout)
    assert not alive, f"processes with {variable}={marker} still alive: {alive}"
