"""VILA's ``mlp_downsample`` projector: merge 2 x 2 neighbouring patches, then a two-layer MLP.

    features [N, P, Cv] on a g x g grid (P = g * g, raster order, from the vision tower)
    --pad-->    g odd: one row of zeros at the bottom and one column at the right (27 -> 28)
    --merge-->  each 2 x 2 block (block row i, block column j) becomes one token of 4 * Cv channels,
                the four patches in the order
                    [top-left (2i, 2j), top-right (2i, 2j+1), bottom-left (2i+1, 2j), bottom-right (2i+1, 2j+1)]
    --> LayerNorm(4 Cv) --> Linear(4 Cv, D) --> GELU (exact, erf) --> Linear(D, D)
    --> [N, h * h, D], h = ceil(g / 2)          (SigLIP-so400m: 729 patches -> 196 tokens per frame)

Token order. VILA 1.5 / LongVILA (NVlabs/VILA's ``DownSampleBlock`` before NVILA) emit the blocks
column by column: token ``j * h + i`` is block (i, j) (``token_order="column"``, the default here, so
those checkpoints see their tokens where they were trained to). Later VILA code transposes back to
raster order, token ``i * h + j`` (``token_order="row"``). The channel order above is the same in
both, so the weights are interchangeable; only the sequence order differs.

Weights: VILA's ``mm_projector.layers.{1, 2, 4}`` are ``norm``, ``fc1``, ``fc2`` here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cupola.toolkit.config import check_choice
from cupola.toolkit.modules import LayerNorm

__all__ = ["TOKEN_ORDERS", "MLPDownsampleProjector", "grid_side", "merge_2x2"]

TOKEN_ORDERS = ("column", "row")


def grid_side(num_patches: int) -> int:
    """``g`` with ``g * g == num_patches``; an error if ``num_patches`` is not a perfect square."""
    g = math.isqrt(num_patches) if num_patches > 0 else 0
    if g == 0 or g * g != num_patches:
        raise ValueError(
            f"mlp_downsample needs the patches of a square grid: {num_patches} patches is not a perfect "
            "square (P = g * g, g = image_size // patch_size)"
        )
    return g


def merge_2x2(x_N_P_C: torch.Tensor, token_order: str = "column") -> torch.Tensor:
    """``[N, g*g, C] -> [N, ceil(g/2)**2, 4*C]``: zero-pad odd grids, concatenate each 2 x 2 block's
    patches (top-left, top-right, bottom-left, bottom-right) and order the blocks by ``token_order``."""
    check_choice("merge_2x2", "token_order", token_order, TOKEN_ORDERS)
    N, P, C = x_N_P_C.shape
    g = grid_side(P)
    x = x_N_P_C.reshape(N, g, g, C)
    if g % 2:
        x = F.pad(x, (0, 0, 0, 1, 0, 1))  # (channels, columns: +1 right, rows: +1 bottom)
    h = (g + 1) // 2
    x_N_Bi_Dr_Bj_Dc_C = x.reshape(N, h, 2, h, 2, C)  # row = 2 * Bi + Dr, column = 2 * Bj + Dc
    if token_order == "column":
        x = x_N_Bi_Dr_Bj_Dc_C.permute(0, 3, 1, 2, 4, 5)  # [N, Bj, Bi, Dr, Dc, C]
    else:
        x = x_N_Bi_Dr_Bj_Dc_C.permute(0, 1, 3, 2, 4, 5)  # [N, Bi, Bj, Dr, Dc, C]
    return x.reshape(N, h * h, 4 * C)


class MLPDownsampleProjector(nn.Module):
    """Vision features ``[N, P, vision_dim]`` -> LLM tokens ``[N, tokens_out(P), out_dim]`` (module docstring)."""

    NORM_EPS = 1e-5  # nn.LayerNorm's default, as in VILA

    def __init__(self, vision_dim: int, out_dim: int, *, token_order: str = "column") -> None:
        super().__init__()
        check_choice(self, "token_order", token_order, TOKEN_ORDERS)
        self.token_order = token_order
        self.norm = LayerNorm(4 * vision_dim, self.NORM_EPS)
        self.fc1 = nn.Linear(4 * vision_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        if self.fc1.weight.device.type != "meta":
            self.init_weights()

    @staticmethod
    def tokens_out(num_patches: int) -> int:
        """Tokens per frame after the merge: ``ceil(g / 2) ** 2`` for ``g * g`` patches (729 -> 196)."""
        return ((grid_side(num_patches) + 1) // 2) ** 2

    @torch.no_grad()
    def init_weights(self) -> None:
        """Unit LayerNorm and PyTorch's default ``nn.Linear`` init (VILA's projector keeps those too);
        deterministic given the RNG seed, valid after ``to_empty()``."""
        self.norm.reset_parameters()
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, features_N_P_C: torch.Tensor) -> torch.Tensor:
        x = merge_2x2(features_N_P_C, self.token_order)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
