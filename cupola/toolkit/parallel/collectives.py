"""Differentiable collectives shared by the parallel layers."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

__all__ = ["all_to_all"]


def all_to_all(
    x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group
) -> torch.Tensor:
    """Rows (dim 0) of ``x`` sent in ``in_splits`` chunks, ``out_splits`` received (None: equal
    chunks); differentiable (the backward is the opposite all-to-all) and traceable by compile."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))
