"""Expert parallelism: a MoE block's experts split along E over an ``ep`` mesh, tokens moved by all-to-all.

Each rank routes its own tokens with the (replicated) router, sorts them by expert as on one
device, and hands ``(x_M_C, counts_E)`` to ``moe.experts``. :func:`apply_ep` wraps that call:

    dispatch  counts all-to-all (E/ep per peer) → token all-to-all (uneven splits) → regroup the
              received rows from (source rank, local expert) to (local expert, source rank) order
    compute   the local experts (grouped GEMM or reference loop) on the regrouped rows
    combine   undo the regrouping → token all-to-all back → rows in the caller's order

The expert weights become DTensors sharded ``Shard(0)`` on the ``ep`` mesh (as torchtitan's
``ExpertParallel``): the state-dict names and global shapes stay those of the single-device
model, so ``torch.distributed.checkpoint`` and converters see whole experts, and FSDP2
(``fully_shard(moe.experts, mesh=dp_shard_mod_ep)``) shards them further. The experts compute on
the local shards (``to_local()``); gradients come back as ``Shard(0)`` DTensors holding, for the
local experts, the sum over every rank's tokens.

The token splits are data-dependent, so the dispatch reads them on the host (one sync per
block per forward), and capacity, when set, applies to each rank's own tokens (as aux loss does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from cupola.toolkit.config import ConfigError
from cupola.toolkit.modules.moe import Experts, MoE
from cupola.toolkit.parallel.collectives import all_to_all

__all__ = ["apply_ep", "regroup_permutation"]


def regroup_permutation(counts_R_L: torch.Tensor, total: int) -> torch.Tensor:
    """Row indices that reorder segments laid out ``(r, l)`` (``counts_R_L[r, l]`` rows each, ``total``
    in all) into ``(l, r)`` order: ``rows[perm]`` is regrouped, ``out[perm] = rows`` undoes it."""
    R, L = counts_R_L.shape
    flat = counts_R_L.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat
    seg = torch.arange(R * L, device=flat.device).view(R, L).T.reshape(-1)  # segments in (l, r) order
    seg_counts, seg_starts = flat[seg], starts[seg]
    new_starts = torch.cumsum(seg_counts, 0) - seg_counts
    offset_in_seg = torch.arange(total, device=flat.device) - torch.repeat_interleave(
        new_starts, seg_counts, output_size=total
    )
    return torch.repeat_interleave(seg_starts, seg_counts, output_size=total) + offset_in_seg


class _Dispatch:
    """What the combine step needs from the dispatch of the same forward."""

    __slots__ = ("in_splits", "out_splits", "perm")

    def __init__(self, in_splits: list[int], out_splits: list[int], perm: torch.Tensor) -> None:
        self.in_splits, self.out_splits, self.perm = in_splits, out_splits, perm


def _dispatch(mesh: DeviceMesh, experts: Experts, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    x_M_C, counts_E = args
    ep, group = mesh.size(), mesh.get_group()
    local = counts_E.numel() // ep
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=group)
    recv_R_L = recv_counts.view(ep, local)  # [source rank, local expert]
    splits = torch.stack([counts_E.view(ep, local).sum(1), recv_R_L.sum(1)]).tolist()  # one host sync
    in_splits, out_splits = splits
    x_recv = all_to_all(x_M_C, out_splits, in_splits, group)
    perm = regroup_permutation(recv_R_L, sum(out_splits))
    experts._ep_dispatch = _Dispatch(in_splits, out_splits, perm)
    return x_recv[perm], recv_R_L.sum(0)


def _combine(mesh: DeviceMesh, experts: Experts, y_local: torch.Tensor) -> torch.Tensor:
    d: _Dispatch = experts._ep_dispatch
    experts._ep_dispatch = None
    y_recv = y_local.new_zeros(y_local.shape).index_put((d.perm,), y_local)  # back to (rank, expert) order
    return all_to_all(y_recv, d.in_splits, d.out_splits, mesh.get_group())


def apply_ep(moe: MoE, ep_mesh: DeviceMesh) -> None:
    """Shard ``moe``'s experts over the 1-D ``ep_mesh`` (``dims.submesh("ep")``) in place.

    Works on a model on the meta device (nothing is communicated) or on real weights (the
    experts of rank 0's copy are scattered, as ``distribute_tensor`` does). The router stays a
    plain, replicated parameter.
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"apply_ep expects a cupola MoE block, got {type(moe).__name__}")
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_ep needs a 1-D expert-parallel mesh, got {ep_mesh.ndim} dimensions")
    ep, num_experts = ep_mesh.size(), moe.cfg.num_experts
    if num_experts % ep:
        raise ConfigError(
            f"MoEConfig.num_experts={num_experts} is not divisible by the expert-parallel degree ep={ep}; "
            "each expert-parallel rank holds num_experts/ep whole experts, so choose ep dividing num_experts"
        )
    experts = moe.experts
    if getattr(experts, "_ep_mesh", None) is not None:
        raise RuntimeError("apply_ep: this MoE block's experts are already expert-parallel")
    for name, param in list(experts.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            raise RuntimeError(
                f"apply_ep: experts.{name} is already a DTensor; apply expert parallelism first"
            )
        sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts._ep_mesh = ep_mesh
    experts._ep_dispatch = None
    experts.register_forward_pre_hook(lambda mod, args: _dispatch(ep_mesh, mod, args))
    experts.register_forward_hook(lambda mod, args, out: _combine(ep_mesh, mod, out))
