"""The diffusion transformer (DiT) of Cosmos' diffusion WFMs, over tokenizer latents.

``x_B_C_T_H_W`` latents (plus conditioning channels) are cut into ``1 x 2 x 2`` patches
(:attr:`DiTConfig.patch`), embedded, and run through blocks of

- self-attention over all video tokens with QK RMSNorm and 3D RoPE (fps-aware time positions),
- cross-attention to text embeddings (QK RMSNorm; padding keys masked),
- a GELU MLP,

each wrapped in AdaLN modulation (shift, scale, gate) from the noise-level embedding. The
modulation is **AdaLN-LoRA**: a block computes its ``3 x dim`` parameters through a rank-``r``
bottleneck (``dim -> r -> 3 dim``) and adds a ``3 x dim`` term shared by all blocks, which saves
most of AdaLN's parameters (at 7B, ``r = 256``: 12.6M instead of 151M per block). Gates and the
output projection start at zero, so a fresh model is the identity on its skip path.

The noise embedding is **per latent frame** (``emb_B_F_D``): Video2World's conditioning frames carry
their own (small) noise level, and action conditioning adds each frame's action embedding to it.

**Sequence parallelism** (:attr:`DiT.sp`, set by ``parallelize_wfm``): each rank embeds and runs the
blocks on its share of the ``F * S`` tokens (:meth:`SequenceParallel.shard
<cupola.toolkit.parallel.sequence.SequenceParallel.shard>`, zigzag for the ring), self-attention
attends over all of them through :meth:`SequenceParallel.attention` (bidirectional), cross-attention
reads the whole (replicated) text locally, the RoPE and absolute-position tables of the whole grid
are sharded the same way, and each token takes its own frame's modulation. The output is gathered
back (differentiably) before unpatchifying, so callers see the whole prediction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from cupola.collections.world.common import check_token_split
from cupola.collections.world.text import TextEncoderConfig
from cupola.toolkit.config import config_error
from cupola.toolkit.modules.norms import RMSNorm
from cupola.toolkit.modules.rope import apply_rope, rope3d_cos_sin, rope3d_dims
from cupola.toolkit.parallel.sequence import SequenceParallel

__all__ = ["DIT_FLAVORS", "DiT", "DiTConfig", "dit_config"]


@dataclass(kw_only=True, slots=True)
class DiTConfig:
    """Sizes of the DiT and what it is conditioned on.

    ``latent_channels``: the tokenizer's (16 for Cosmos CV tokenizers). ``video2world``: add a mask
    channel marking conditioning frames. ``action_dim``: actions per *pixel* frame transition
    (0 = no action conditioning); ``actions_per_latent``: transitions a latent frame covers (the
    tokenizer's temporal compression). ``camera``: add 6 Plücker channels (per-pixel camera rays)
    to the input. ``abs_pos_grid``: the largest patch grid (frames, rows, columns) of the learned,
    factorized absolute position embeddings added to the patch embeddings (as Cosmos' "extra absolute
    position embedding"; RoPE alone is relative, so at high noise a token would not know where it
    is); None for RoPE only.
    """

    latent_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    adaln_lora_dim: int = 16
    rope_theta: float = 10000.0
    base_fps: float = 24.0
    rope_extrapolation: tuple[float, float, float] = (1.0, 1.0, 1.0)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    video2world: bool = False
    action_dim: int = 0
    actions_per_latent: int = 4
    camera: bool = False
    abs_pos_grid: tuple[int, int, int] | None = (64, 64, 64)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def in_channels(self) -> int:
        return self.latent_channels + int(self.video2world) + 6 * int(self.camera)

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise config_error(self, "n_heads", self.n_heads, f"must divide dim={self.dim}")
        rope3d_dims(self.head_dim)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise config_error(self, "patch", self.patch, "must be three positive sizes (t, h, w)")
        if self.action_dim and not self.video2world:
            raise config_error(
                self,
                "action_dim",
                self.action_dim,
                "action conditioning predicts from given frames: set video2world=True",
            )
        self.text.validate()


_T5_11B = TextEncoderConfig(kind="t5", dim=1024, max_length=512, path="checkpoints/t5-11b")

DIT_FLAVORS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(latent_channels=4, dim=128, n_layers=4, n_heads=4, adaln_lora_dim=32),
    # Cosmos-1.0-Diffusion-7B/14B (as in diffusers' CosmosTransformer3DModel configs): text from T5-11B's
    # encoder (the original T5 "XXL", 1024 wide), AdaLN-LoRA rank 256, absolute positions for up to
    # 128 x 240 x 240 latents (704 x 1280 at 8x is 88 x 160), RoPE NTK stretch (t, h, w) 2,1,1 / 2,2,2
    "cosmos_dit_7b": DiTConfig(
        dim=4096,
        n_layers=28,
        n_heads=32,
        adaln_lora_dim=256,
        rope_extrapolation=(2.0, 1.0, 1.0),
        abs_pos_grid=(128, 120, 120),
        text=_T5_11B,
    ),
    "cosmos_dit_14b": DiTConfig(
        dim=5120,
        n_layers=36,
        n_heads=40,
        adaln_lora_dim=256,
        rope_extrapolation=(2.0, 2.0, 2.0),
        abs_pos_grid=(128, 120, 120),
        text=_T5_11B,
    ),
}


def dit_config(flavor: str, **changes) -> DiTConfig:
    if flavor not in DIT_FLAVORS:
        raise config_error("DiTConfig", "flavor", flavor, f"must be one of {sorted(DIT_FLAVORS)}")
    return dataclasses.replace(DIT_FLAVORS[flavor], **changes)


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[..., dim]`` of ``c_noise`` (cos half first)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half
    )
    angles = c_noise.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaLNLoRA(nn.Module):
    """``k`` modulation vectors ``[B, F, k, dim]`` = ``up(down(silu(emb))) + shared``."""

    def __init__(self, dim: int, rank: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, k * dim, bias=False)

    def forward(self, emb_B_F_D: torch.Tensor, shared_B_F_KD: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(F.silu(emb_B_F_D))) + shared_B_F_KD
        return out.unflatten(-1, (self.k, -1))


def _per_token(mod_B_F_K_D: torch.Tensor, token_frames: torch.Tensor | None) -> torch.Tensor:
    """Modulation by group of tokens ``[B, G, K, dim]``: per frame (``G = F``, whole time-major
    sequences) or, under sequence parallelism, per token (``G = N``, ``token_frames``: each local
    token's frame)."""
    return mod_B_F_K_D if token_frames is None else mod_B_F_K_D.index_select(1, token_frames)


def _modulate(x_B_N_D: torch.Tensor, shift_B_G_D: torch.Tensor, scale_B_G_D: torch.Tensor) -> torch.Tensor:
    """``x (1 + scale) + shift``, group ``g`` of the ``G`` equal runs of tokens taking ``shift[:, g]``."""
    x = x_B_N_D.unflatten(1, (shift_B_G_D.shape[1], -1))
    return (x * (1 + scale_B_G_D[:, :, None]) + shift_B_G_D[:, :, None]).flatten(1, 2)


def _gate(x_B_N_D: torch.Tensor, gate_B_G_D: torch.Tensor) -> torch.Tensor:
    return (x_B_N_D.unflatten(1, (gate_B_G_D.shape[1], -1)) * gate_B_G_D[:, :, None]).flatten(1, 2)


def _gather_tokens(x_B_N_D: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Whole sequences ``[B, N * sp, D]`` from every SP rank's part, in order; differentiable (the
    backward sums the ranks' gradients and keeps this rank's part, the all-gather's adjoint)."""
    n = x_B_N_D.shape[1] * sp.layout.size
    parts = funcol.wait_tensor(funcol.all_gather_single_autograd(x_B_N_D.contiguous(), 1, sp.sp_group))
    order = torch.cat([sp.layout.indices(n, r) for r in range(sp.layout.size)]).to(x_B_N_D.device)
    return parts.index_select(1, torch.argsort(order))


class DiTAttention(nn.Module):
    """Multi-head attention with RMSNorm on queries and keys; self-attention (RoPE) or cross-attention."""

    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        kv_dim = context_dim or dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(kv_dim, dim, bias=False)
        self.wv = nn.Linear(kv_dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        # self-attention under sequence parallelism (set by parallelize_wfm): a SequenceParallel whose
        # attention sees every token while this rank holds its share; None for local attention
        self.sp = None

    def forward(
        self,
        x_B_N_D: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, N, _ = x_B_N_D.shape
        kv = x_B_N_D if context is None else context
        q = self.q_norm(self.wq(x_B_N_D).view(B, N, -1, self.head_dim))
        k = self.k_norm(self.wk(kv).view(B, kv.shape[1], -1, self.head_dim))
        v = self.wv(kv).view(B, kv.shape[1], -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.sp is not None:
            out = self.sp.attention(q, k, v, causal=False)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, N, -1))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = DiTAttention(d, cfg.n_heads, eps=cfg.eps)
        self.cross_attn = DiTAttention(d, cfg.n_heads, context_dim=cfg.text.dim, eps=cfg.eps)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden, bias=False), nn.GELU(approximate="tanh"), nn.Linear(hidden, d, bias=False)
        )
        self.mod_self = AdaLNLoRA(d, cfg.adaln_lora_dim, 3)
        self.mod_cross = AdaLNLoRA(d, cfg.adaln_lora_dim, 3)
        self.mod_mlp = AdaLNLoRA(d, cfg.adaln_lora_dim, 3)

    def forward(
        self,
        x_B_N_D: torch.Tensor,
        emb_B_F_D: torch.Tensor,
        shared_B_F_3D: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor,
        context_mask: torch.Tensor,
        token_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_B_N_D``: whole time-major sequences (``N = F * S``), or under sequence parallelism this
        rank's tokens with ``token_frames`` (each one's latent frame)."""
        x = x_B_N_D
        for norm, mod, run in (
            (self.norm1, self.mod_self, lambda h: self.self_attn(h, rope=rope)),
            (self.norm2, self.mod_cross, lambda h: self.cross_attn(h, context, mask=context_mask)),
            (self.norm3, self.mod_mlp, self.mlp),
        ):
            shift, scale, gate = _per_token(mod(emb_B_F_D, shared_B_F_3D), token_frames).unbind(-2)
            x = x + _gate(run(_modulate(norm(x), shift, scale)), gate)
        return x


class DiT(nn.Module):
    """``forward(x_B_C_T_H_W, c_noise_B_T, context, context_mask, fps=, actions=) -> F_B_Cout_T_H_W``.

    ``x`` holds the latents (already scaled by ``c_in``) followed by the conditioning channels
    (mask, Plücker); ``c_noise_B_T`` is per latent frame; ``context_B_L_Dtext`` with
    ``context_mask_B_L`` (True = a real token). The output has ``latent_channels`` channels.

    Under sequence parallelism (``self.sp``, set by ``parallelize_wfm``) every rank takes the whole
    inputs and returns the whole output, but runs the blocks on its share of the tokens only; the
    token count ``F * S`` must be a multiple of the layout's (:attr:`SPLayout.multiple`).
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pt, ph, pw = cfg.patch
        d = cfg.dim
        self.patch_embed = nn.Linear(cfg.in_channels * pt * ph * pw, d, bias=False)
        self.pos_embed = (
            nn.ParameterList(nn.Parameter(torch.empty(n, d)) for n in cfg.abs_pos_grid)
            if cfg.abs_pos_grid
            else None
        )
        self.t_freq = 256
        self.t_embed = nn.Sequential(nn.Linear(self.t_freq, d), nn.SiLU(), nn.Linear(d, d))
        self.shared_mod = nn.Linear(d, 3 * d, bias=False)  # AdaLN-LoRA's shared term, all blocks
        self.action_embed = (
            nn.Sequential(nn.Linear(cfg.action_dim * cfg.actions_per_latent, d), nn.SiLU(), nn.Linear(d, d))
            if cfg.action_dim
            else None
        )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.final_mod = AdaLNLoRA(d, cfg.adaln_lora_dim, 2)
        self.final_shared = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, cfg.latent_channels * pt * ph * pw, bias=False)
        self.sp = None  # a SequenceParallel once parallelize_wfm applies sequence parallelism

    def init_weights(self) -> None:
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embed.weight)
        if self.pos_embed is not None:
            for table in self.pos_embed:
                nn.init.normal_(table, std=std)
        # adaLN-Zero: every gate and the output start at zero
        for block in self.blocks:
            for mod in (block.mod_self, block.mod_cross, block.mod_mlp):
                nn.init.zeros_(mod.up.weight)
        nn.init.zeros_(self.shared_mod.weight)
        nn.init.zeros_(self.final_mod.up.weight)
        nn.init.zeros_(self.final_shared.weight)
        nn.init.zeros_(self.out.weight)
        if self.action_embed is not None:
            nn.init.zeros_(self.action_embed[-1].weight)  # an action model starts as its base model

    def patchify(self, x_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x_B_C_T_H_W.shape
        pt, ph, pw = self.cfg.patch
        if T % pt or H % ph or W % pw:
            raise ValueError(
                f"latents of {T}x{H}x{W} (T x H x W) do not divide into {pt}x{ph}x{pw} patches: use a video size "
                "whose latent grid is a multiple of the patch size"
            )
        x = x_B_C_T_H_W.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T // pt, (H // ph) * (W // pw), C * pt * ph * pw)

    def unpatchify(self, x_B_N_P: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        """The inverse of :meth:`patchify` for output patches ``[B, N, P]`` (``N = F * S`` time-major)."""
        B = x_B_N_P.shape[0]
        pt, ph, pw = self.cfg.patch
        C = self.cfg.latent_channels
        x = x_B_N_P.reshape(B, T // pt, H // ph, W // pw, C, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(B, C, T, H, W)

    def absolute_positions(self, frames: int, rows: int, cols: int) -> torch.Tensor:
        """``[frames, rows * cols, dim]``: the sum of the time, row and column tables."""
        grid = self.cfg.abs_pos_grid
        if frames > grid[0] or rows > grid[1] or cols > grid[2]:
            raise ValueError(
                f"a latent patch grid of {frames}x{rows}x{cols} exceeds abs_pos_grid={grid}: use a shorter or "
                "smaller video, or a model built with a larger abs_pos_grid"
            )
        t, h, w = (table[:n] for table, n in zip(self.pos_embed, (frames, rows, cols), strict=True))
        return (t[:, None, None] + h[None, :, None] + w[None, None, :]).reshape(frames, rows * cols, -1)

    def embed_actions(self, actions_B_N_A: torch.Tensor, frames: int) -> torch.Tensor:
        """Per-latent-frame action embeddings ``[B, frames, dim]``: latent frame ``f >= 1`` sees the
        ``actions_per_latent`` transitions that lead into it; frame 0 (the first frame) none."""
        k, a = self.cfg.actions_per_latent, self.cfg.action_dim
        B, N, A = actions_B_N_A.shape
        if A != a or N != (frames - 1) * k:
            raise ValueError(
                f"actions of shape {tuple(actions_B_N_A.shape)}: expected [B, {(frames - 1) * k}, {a}] "
                f"({k} per latent frame after the first, {a} values each)"
            )
        emb = self.action_embed(actions_B_N_A.reshape(B, frames - 1, k * a))
        return torch.cat([emb.new_zeros(B, 1, emb.shape[-1]), emb], dim=1)

    def forward(
        self,
        x_B_C_T_H_W: torch.Tensor,
        c_noise_B_T: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        *,
        fps: torch.Tensor | float | None = None,
        actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        _, C, T, H, W = x_B_C_T_H_W.shape
        if C != cfg.in_channels:
            raise ValueError(
                f"DiT input has {C} channels, expected {cfg.in_channels} (latents + conditioning)"
            )
        pt, ph, pw = cfg.patch
        Fr, rows, cols = T // pt, H // ph, W // pw
        x = self.patchify(x_B_C_T_H_W).flatten(1, 2)  # [B, N, C * pt * ph * pw], N = F * S time-major
        rope = rope3d_cos_sin(
            Fr,
            rows,
            cols,
            cfg.head_dim,
            theta=cfg.rope_theta,
            fps=fps,
            base_fps=cfg.base_fps,
            extrapolation=cfg.rope_extrapolation,
            device=x.device,
        )
        positions = (
            self.absolute_positions(Fr, rows, cols).flatten(0, 1) if self.pos_embed is not None else None
        )
        token_frames = None
        if self.sp is not None:  # this rank's tokens, their frames, and their rows of the tables
            check_token_split(self.sp, Fr * rows * cols, f"the DiT's {Fr}x{rows}x{cols} patch grid")
            mine = self.sp.positions(Fr * rows * cols, x.device)
            x = x.index_select(1, mine)
            rope = tuple(t.index_select(-2, mine) for t in rope)
            positions = None if positions is None else positions.index_select(0, mine)
            token_frames = mine // (rows * cols)
        x = self.patch_embed(x)
        if positions is not None:
            x = x + positions.to(x.dtype)
        c_noise = c_noise_B_T[:, ::pt]  # a temporal patch takes its first frame's level
        emb = self.t_embed(timestep_embedding(c_noise, self.t_freq).to(x.dtype))
        if self.action_embed is not None:
            if actions is None:
                raise ValueError("this model is action-conditioned: pass actions=[B, N, action_dim]")
            emb = emb + self.embed_actions(actions.to(x.dtype), T)[:, ::pt]
        shared = self.shared_mod(F.silu(emb))
        mask = context_mask[:, None, None, :].to(torch.bool)
        for block in self.blocks:
            x = block(x, emb, shared, rope, context.to(x.dtype), mask, token_frames)
        final = self.final_mod(emb, self.final_shared(F.silu(emb)))
        shift, scale = _per_token(final, token_frames).unbind(-2)
        x = self.out(_modulate(self.final_norm(x), shift, scale))
        if self.sp is not None:
            x = _gather_tokens(x, self.sp)
        return self.unpatchify(x, T, H, W)
