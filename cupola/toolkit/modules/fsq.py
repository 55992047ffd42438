"""Finite scalar quantization (FSQ, Mentzer et al. 2023, arXiv 2309.15505): each of ``d`` channels is
bounded and rounded to one of ``levels[i]`` values; a code is the tuple of the ``d`` values, so the
implicit codebook holds ``prod(levels)`` codes (Cosmos' DV tokenizers: levels ``[8, 8, 8, 5, 5, 5]``,
64,000 codes) — no codebook to learn, no commitment loss, no collapse. Gradients pass the rounding
straight through.

    z_B_d_...   --bound-->  tanh-squashed into each channel's range
                --round-->  integers in [-(L//2), (L-1)//2]  (even L: shifted by 1/2 before rounding)
                --scale-->  codes in [-1, 1] (divided by L//2)
    index = sum_i digit_i * prod(levels[:i])     (digit_i = integer + L_i//2 in [0, L_i))
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FSQ"]


class FSQ(nn.Module):
    """``forward(z_B_d_*) -> (codes_B_d_*, indices_B_*)``; ``d = len(levels)`` channels on dim 1."""

    def __init__(self, levels: list[int] | tuple[int, ...], eps: float = 1e-3) -> None:
        super().__init__()
        if not levels or any(not isinstance(n, int) or n < 2 for n in levels):
            raise ValueError(
                f"FSQ levels={levels!r}: give a non-empty list of integers >= 2, e.g. [8, 8, 8, 5, 5, 5]"
            )
        self.levels = tuple(levels)
        self.eps = eps
        self._basis_values = tuple(math.prod(levels[:i]) for i in range(len(levels)))
        # tables made on use, not buffers: a model built on the meta device and materialised with
        # to_empty() would hold garbage in non-persistent buffers

    @property
    def _levels(self) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=torch.float32)

    @property
    def _basis(self) -> torch.Tensor:
        return torch.tensor(self._basis_values, dtype=torch.int64)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _shape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash each channel into ``(-(L-1)/2, (L-1)/2)`` (shifted by 1/2 for even ``L``), so rounding
        lands on exactly ``L`` integers."""
        levels = self._shape(self._levels.to(z.device, z.dtype), z.ndim)
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[1] != self.dim:
            raise ValueError(f"FSQ: {z.shape[1]} channels on dim 1, expected {self.dim} (one per level)")
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through
        half_width = self._shape(
            torch.div(self._levels, 2, rounding_mode="floor").to(z.device, z.dtype), z.ndim
        )
        codes = rounded / half_width
        return codes, self.codes_to_indices(codes)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, d, *]`` in [-1, 1] → indices ``[B, *]`` in ``[0, codebook_size)``."""
        half_width = self._shape(
            torch.div(self._levels, 2, rounding_mode="floor").to(codes.device), codes.ndim
        )
        digits = torch.round(codes.float() * half_width + half_width).long()
        return (digits * self._shape(self._basis.to(codes.device), codes.ndim)).sum(1)

    def indices_to_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices ``[B, *]`` → codes ``[B, d, *]`` in [-1, 1] (what :meth:`forward` returned for them)."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(
                f"FSQ indices must lie in [0, {self.codebook_size}); got [{int(indices.min())}, {int(indices.max())}]"
            )
        basis = self._basis.to(indices.device).view(1, -1, *([1] * (indices.ndim - 1)))
        levels = self._levels.long().to(indices.device).view(1, -1, *([1] * (indices.ndim - 1)))
        digits = (indices.unsqueeze(1) // basis) % levels
        half_width = torch.div(levels, 2, rounding_mode="floor")
        return ((digits - half_width).to(dtype)) / half_width.to(dtype)
