"""Sequence-parallel attention over the ``sp`` ranks: Ulysses inside ``sp_ulysses`` groups, ring
(zigzag by default) across ``sp_ring`` groups — pure Ulysses when ``sp_ring == 1``, pure ring when
``sp_ulysses == 1``, the 2D hybrid (USP / LongVILA's MM-SP) otherwise.

    q, k, v  [B, H, T/sp, D]   (this rank's tokens, as SPLayout assigns them)
      --all-to-all over sp_ulysses-->  [B, H/U, T/ring, D]   (the ring rank's share, U-th of the heads)
      --ring attention over sp_ring-->  same shape
      --all-to-all back-->  [B, H, T/sp, D]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cupola.toolkit.parallel.sequence.layout import SPLayout
from cupola.toolkit.parallel.sequence.ring import ring_attention
from cupola.toolkit.parallel.sequence.ulysses import gather_heads, kv_heads_for, scatter_heads

__all__ = ["SequenceParallel"]


@dataclass
class SequenceParallel:
    """The sequence-parallel context of one rank: its layout, its groups and its place in them.

    ``sp_group``: all ``ring * ulysses`` ranks (rank order = ``ring_rank * ulysses + ulysses_rank``);
    ``ring_group`` / ``ulysses_group``: this rank's row and column of the grid (None when that
    degree is 1).
    """

    layout: SPLayout
    sp_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.sp_group) if self.sp_group is not None else 0

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of whole sequences ``x`` (along ``dim``)."""
        return self.layout.shard(x, self.rank, dim)

    def positions(self, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global token indices this rank holds (the RoPE positions of an unpacked sequence)."""
        return self.layout.indices(seq_len, self.rank).to(device)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Whole sequences from every rank's part (not differentiable; for ids, outputs, tests)."""
        if self.sp_group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.layout.size)]
        dist.all_gather(parts, x.contiguous(), group=self.sp_group)
        return self.layout.unshard(parts, dim)

    @torch.compiler.disable  # collectives and a custom autograd Function: run eagerly
    def attention(
        self,
        q_B_H_T_D: torch.Tensor,
        k_B_H_T_D: torch.Tensor,
        v_B_H_T_D: torch.Tensor,
        *,
        causal: bool = True,
        document_ids_B_T: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of this rank's queries over the whole sequence; ``[B, Hq, T/sp, D]``.
        ``document_ids_B_T``: this rank's tokens' document ids (packed samples), or None."""
        documents = None if document_ids_B_T is None else self.gather(document_ids_B_T)
        u = self.layout.ulysses
        q, k, v = q_B_H_T_D, k_B_H_T_D, v_B_H_T_D
        if u > 1:
            n_q = q.shape[1]
            q = scatter_heads(q, self.ulysses_group, u)
            k = scatter_heads(kv_heads_for(k, n_q, u), self.ulysses_group, u)
            v = scatter_heads(kv_heads_for(v, n_q, u), self.ulysses_group, u)
        if self.layout.ring == 1:  # Ulysses alone: whole sequences per head, SDPA's best kernel, native GQA
            out = _local_attention(q, k, v, causal, documents, scale)
        else:
            out = ring_attention(
                q, k, v, self.ring_group, self.layout, causal=causal, documents_B_T=documents, scale=scale
            )
        return gather_heads(out, self.ulysses_group, u) if u > 1 else out


def _local_attention(
    q, k, v, causal: bool, documents: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    mask = None
    if documents is not None:
        mask = documents[:, :, None] == documents[:, None, :]
        if causal:
            mask = (
                mask & torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool, device=mask.device).tril()
            )
        mask = mask[:, None]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
