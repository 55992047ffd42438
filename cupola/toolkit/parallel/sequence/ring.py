"""Ring attention (arXiv 2310.01889): each rank keeps its queries and passes its keys/values around
the ring, one peer-to-peer hop per step, merging the blocks' outputs by their log-sum-exp; the
backward passes keys/values around again with their gradient accumulators riding along, so every
``dk``/``dv`` arrives back at its owner after a full turn. Communication of the next block overlaps
the current block's computation.

With zigzag ordering (see :class:`~cupola.toolkit.parallel.sequence.layout.SPLayout`) causal work is
the same on every rank: the diagonal block is causal, blocks from lower ranks are seen by all local
queries but only through their first chunk, blocks from higher ranks only by the second local chunk.
Packed sequences (``document_ids``) use explicit masks built from the global token order, so they
are correct for any order; blocks a rank cannot see at all are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cupola.toolkit.parallel.sequence.blocks import Mask, block_backward, block_forward, merge
from cupola.toolkit.parallel.sequence.layout import SPLayout

__all__ = ["ring_attention"]


@dataclass(frozen=True)
class _Block:
    q: slice
    kv: slice
    mask: Mask


@dataclass
class _Plan:
    """Which block of (queries, keys/values) a ring rank computes at each step, and with which mask."""

    layout: SPLayout
    seq_len: int  # the whole sequence (all ring ranks' shares)
    rank: int
    causal: bool
    documents: torch.Tensor | None  # [B, seq_len] in global order, or None
    scale: float | None

    def block(self, src: int) -> _Block | None:
        """The block of the keys/values that came from ring rank ``src``; None when nothing is seen."""
        full = slice(None)
        if self.documents is not None:
            q_idx = self.layout.ring_share(self.seq_len, self.rank).to(self.documents.device)
            k_idx = self.layout.ring_share(self.seq_len, src).to(self.documents.device)
            dq, dk = self.documents[:, q_idx], self.documents[:, k_idx]
            mask = dq[:, :, None] == dk[:, None, :]
            if self.causal:
                mask = mask & (k_idx[None, None, :] <= q_idx[None, :, None])
            return _Block(full, full, mask[:, None]) if bool(mask.any()) else None
        if not self.causal:
            return _Block(full, full, None)
        if src == self.rank:
            return _Block(full, full, "causal")
        if not self.layout.zigzag:
            return _Block(full, full, None) if src < self.rank else None
        half = self.seq_len // (2 * self.layout.ring)
        if src < self.rank:  # their first chunk precedes both of ours; their second follows both
            return _Block(full, slice(0, half), None)
        return _Block(slice(half, None), full, None)  # only our second chunk follows theirs


def _expand(kv: torch.Tensor, rep: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, Hkv * rep, T, D]`` (each KV head serving ``rep`` query heads)."""
    if rep == 1:
        return kv
    B, H, T, D = kv.shape
    return kv[:, :, None].expand(B, H, rep, T, D).reshape(B, H * rep, T, D)


def _fold(grad: torch.Tensor, rep: int) -> torch.Tensor:
    """The gradient of :func:`_expand`: sum each KV head's ``rep`` copies."""
    if rep == 1:
        return grad
    B, H, T, D = grad.shape
    return grad.view(B, H // rep, rep, T, D).sum(2)


def _pass_on(t: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, list]:
    """Start sending ``t`` to the next ring rank and receiving the previous rank's into a new buffer."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size) if group is not None else (rank + 1) % size
    prv = dist.get_global_rank(group, (rank - 1) % size) if group is not None else (rank - 1) % size
    recv = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, plan: _Plan):  # type: ignore[override]
        size = plan.layout.ring
        rep = q.shape[1] // k.shape[1]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        for step in range(size):
            if step < size - 1:
                next_kv, works = _pass_on(kv, group)
            block = plan.block((plan.rank - step) % size)
            if block is not None:
                block_out, block_lse = block_forward(
                    q[:, :, block.q],
                    _expand(kv[0][:, :, block.kv], rep),
                    _expand(kv[1][:, :, block.kv], rep),
                    block.mask,
                    plan.scale,
                )
                out[:, :, block.q], lse[:, :, block.q] = merge(
                    out[:, :, block.q], lse[:, :, block.q], block_out, block_lse
                )
            if step < size - 1:
                _wait(works)
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.plan, ctx.size, ctx.rep = group, plan, size, rep
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, size, rep = ctx.plan, ctx.group, ctx.size, ctx.rep
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # travels with the block it belongs to
        for step in range(size):
            if step < size - 1:
                next_kv, kv_works = _pass_on(kv, group)
            block = plan.block((plan.rank - step) % size)
            if block is not None:
                g_q, g_k, g_v = block_backward(
                    dout[:, :, block.q],
                    q[:, :, block.q],
                    _expand(kv[0][:, :, block.kv], rep),
                    _expand(kv[1][:, :, block.kv], rep),
                    out[:, :, block.q],
                    lse[:, :, block.q],
                    block.mask,
                    plan.scale,
                )
                dq[:, :, block.q] += g_q
                dkv[0][:, :, block.kv] += _fold(g_k.to(acc), rep)
                dkv[1][:, :, block.kv] += _fold(g_v.to(acc), rep)
            if size > 1:
                dkv, dkv_works = _pass_on(dkv, group)  # after the last step: back to its owner
                _wait(dkv_works)
            if step < size - 1:
                _wait(kv_works)
                kv = next_kv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(
    q_B_H_T_D: torch.Tensor,
    k_B_H_T_D: torch.Tensor,
    v_B_H_T_D: torch.Tensor,
    group: dist.ProcessGroup | None,
    layout: SPLayout,
    *,
    causal: bool = True,
    documents_B_T: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of this ring rank's queries over the whole sequence's keys/values.

    ``q`` ``[B, Hq, Tl, D]``, ``k``/``v`` ``[B, Hkv, Tl, D]`` (``Hq`` a multiple of ``Hkv``): this
    rank's share of the sequence as ``layout.ring_share`` orders it (``Tl = T / layout.ring``).
    ``documents_B_T``: document ids of the *whole* sequence in global order (packed samples attend
    within their document), or None. ``group``: the ring's process group (None: the default group,
    or no communication at all without torch.distributed). Returns ``[B, Hq, Tl, D]``.
    """
    size = layout.ring
    if size > 1 and dist.get_world_size(group) != size:
        raise ValueError(
            f"ring_attention: the group has {dist.get_world_size(group)} ranks but layout.ring={size}"
        )
    if q_B_H_T_D.shape[1] % k_B_H_T_D.shape[1]:
        raise ValueError(
            f"ring_attention: {q_B_H_T_D.shape[1]} query heads are not a multiple of {k_B_H_T_D.shape[1]} KV heads"
        )
    plan = _Plan(
        layout=layout,
        seq_len=q_B_H_T_D.shape[2] * layout.ring,
        rank=dist.get_rank(group) if size > 1 else 0,
        causal=causal,
        documents=documents_B_T,
        scale=scale,
    )
    return _RingAttention.apply(q_B_H_T_D, k_B_H_T_D, v_B_H_T_D, group if size > 1 else None, plan)
