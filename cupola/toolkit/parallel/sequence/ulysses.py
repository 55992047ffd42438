"""DeepSpeed-Ulysses (arXiv 2309.14509): an all-to-all turns "my tokens, all heads" into "all tokens
(of the group), my heads", attention runs on whole sequences per head, and a second all-to-all turns
the output back. Differentiable (the all-to-alls' backward is the opposite all-to-all).

Heads must divide among the ranks: ``Hq % U == 0``; KV heads either divide too or are replicated
to ``U`` (when ``U % Hkv == 0``) so each rank gets the KV head its query heads use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cupola.toolkit.parallel.collectives import all_to_all

__all__ = ["gather_heads", "kv_heads_for", "scatter_heads"]


def kv_heads_for(k_B_H_T_D: torch.Tensor, n_q_heads: int, degree: int) -> torch.Tensor:
    """KV heads ready to scatter over ``degree`` ranks: as they are if ``degree`` divides them,
    else each repeated ``degree / Hkv`` times (query head ``h`` keeps using KV head ``h // (Hq/Hkv)``)."""
    hkv = k_B_H_T_D.shape[1]
    if n_q_heads % degree:
        raise ValueError(f"Ulysses: {n_q_heads} query heads do not divide among sp_ulysses={degree} ranks")
    if hkv % degree == 0:
        return k_B_H_T_D
    if degree % hkv:
        raise ValueError(
            f"Ulysses: {hkv} KV heads neither divide among sp_ulysses={degree} ranks nor divide it; "
            "choose sp_ulysses a divisor or a multiple of the KV head count"
        )
    B, H, T, D = k_B_H_T_D.shape
    rep = degree // hkv
    return k_B_H_T_D[:, :, None].expand(B, H, rep, T, D).reshape(B, H * rep, T, D)


def scatter_heads(x_B_H_T_D: torch.Tensor, group: dist.ProcessGroup | None, degree: int) -> torch.Tensor:
    """``[B, H, T, D]`` (my tokens) -> ``[B, H/U, U*T, D]`` (the group's tokens in rank order, my heads)."""
    B, H, T, D = x_B_H_T_D.shape
    x = x_B_H_T_D.reshape(B, degree, H // degree, T, D).transpose(0, 1).contiguous()
    y = all_to_all(x, None, None, group)  # y[u]: rank u's tokens of my heads
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // degree, degree * T, D)


def gather_heads(x_B_h_T_D: torch.Tensor, group: dist.ProcessGroup | None, degree: int) -> torch.Tensor:
    """The inverse of :func:`scatter_heads`: ``[B, H/U, U*T, D]`` -> ``[B, H, T, D]``."""
    B, h, TT, D = x_B_h_T_D.shape
    x = x_B_h_T_D.reshape(B, h, degree, TT // degree, D).permute(2, 0, 1, 3, 4).contiguous()
    y = all_to_all(x, None, None, group)  # y[u]: my tokens of rank u's heads
    return y.transpose(0, 1).reshape(B, degree * h, TT // degree, D)
