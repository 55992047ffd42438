"""The autoregressive world model: a Llama-style decoder over the discrete video tokens of a DV (FSQ)
tokenizer, as Cosmos-1.0-Autoregressive.

A clip's indices ``[B, T', H', W']`` are flattened time-major into ``tokens_B_N`` (index
``(t * H' + h) * W' + w``), so "the next token" runs along width, then height, then time; a prefix of
whole latent frames is a prefix of the sequence. Positions are 3D RoPE over the (t, h, w) grid
(:func:`~cupola.toolkit.modules.rope.rope3d_cos_sin`); each block is

    x = x + self_attn(norm(x))                    causal, GQA, 3D RoPE, optional KV cache
    x = x + cross_attn(norm(x), text)             only with ``cross_attention=True``
    x = x + swiglu(norm(x))

and ``output(norm(x))`` gives logits over the ``vocab_size`` FSQ codes.

Sequence parallelism (training; ``ARWorldModel.sp``, set by ``parallelize_ar``) works as for the GPT:
each rank holds its share of every clip's tokens (:meth:`SequenceParallel.shard
<cupola.toolkit.parallel.sequence.SequenceParallel.shard>`), with its rows of the grid's 3D RoPE
table, and the causal self-attention sees the whole clip through :meth:`SequenceParallel.attention`;
cross-attention reads the whole text locally. KV-cached decoding runs on one rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cupola.collections.world.text import ByteTextEncoder, TextEncoderConfig
from cupola.toolkit.config import ConfigError, config_error, suggest
from cupola.toolkit.modules.attention import Attention, KVCache, StaticKVCache
from cupola.toolkit.modules.mlp import SwiGLU
from cupola.toolkit.modules.norms import RMSNorm
from cupola.toolkit.modules.rope import rope3d_cos_sin, rope3d_dims

__all__ = ["ARS_FLAVORS", "ARConfig", "ARWorldModel", "ar_config"]


@dataclass(kw_only=True, slots=True)
class ARConfig:
    """``vocab_size`` must equal the tokenizer's codebook size (``prod(fsq_levels)``: 64,000 for the
    Cosmos DV tokenizers, 125 for ``tiny_dv``). ``max_latent_*`` bound the (t, h, w) grid a clip may
    have (positions are 3D, so the limit is per axis, not a sequence length). ``cross_attention``:
    condition on text through ``text`` (a trained byte encoder inside the model, or frozen T5)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_latent_frames: int = 5
    max_latent_height: int = 40
    max_latent_width: int = 64
    cross_attention: bool = False
    text: TextEncoderConfig | None = None
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # provenance

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_tokens(self) -> int:
        return self.max_latent_frames * self.max_latent_height * self.max_latent_width

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise config_error(self, name, getattr(self, name), "must be an integer >= 1")
        for name in ("max_latent_frames", "max_latent_height", "max_latent_width"):
            if getattr(self, name) < 1:
                raise config_error(self, name, getattr(self, name), "must be >= 1")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise config_error(
                self,
                "n_kv_heads",
                self.n_kv_heads,
                f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) and n_heads by n_kv_heads",
            )
        rope3d_dims(self.head_dim)  # a clear error if a head cannot split between t, h and w
        if self.cross_attention and self.text is None:
            raise config_error(self, "text", None, "cross_attention=True needs a text encoder config")
        if not self.cross_attention and self.text is not None:
            raise config_error(self, "text", "TextEncoderConfig", "is only read with cross_attention=True")
        if self.text is not None:
            self.text.validate()


# Cosmos-1.0-Autoregressive-4B / -12B (nvidia/Cosmos-1.0-Autoregressive-*; the Cosmos repo's
# cosmos1/models/autoregressive/configs/base/model_config.py): untied embeddings, RoPE theta 500k,
# 3D RoPE over a 5 x 40 x 64 grid (33 frames of 640 x 1024 through DV8x16x16), vocab 64,000.
ARS_FLAVORS: dict[str, ARConfig] = {
    # CPU: for the tiny_dv tokenizer (FSQ 5x5x5 = 125 codes, 4x8x8): 9 frames of 32 px -> 3 x 4 x 4
    "tiny": ARConfig(
        vocab_size=125,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden_dim=192,
        rope_theta=10000.0,
        max_latent_frames=8,
        max_latent_height=16,
        max_latent_width=16,
    ),
    # ~4.01B parameters: 16 x 218M blocks + 2 x 262M embedding/output
    "cosmos_ar_4b": ARConfig(
        vocab_size=64000, dim=4096, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336
    ),
    # ~12.08B parameters: 40 x 286M blocks + 2 x 328M embedding/output
    "cosmos_ar_12b": ARConfig(
        vocab_size=64000, dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336
    ),
}


def ar_config(name: str, **overrides: object) -> ARConfig:
    """A validated copy of ``ARS_FLAVORS[name]`` with ``overrides`` applied (e.g. ``cross_attention=True,
    text=TextEncoderConfig(...)``)."""
    if name not in ARS_FLAVORS:
        raise ConfigError(
            f"unknown autoregressive flavor {name!r}; choose one of {sorted(ARS_FLAVORS)}.{suggest(name, ARS_FLAVORS)}"
        )
    cfg = dataclasses.replace(ARS_FLAVORS[name], **overrides)
    cfg.validate()
    return cfg


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from text ``context_B_L_Dtext``; padding keys masked.
    No positions (the text encoder has its own). Grouped-query heads like the self-attention."""

    def __init__(self, dim: int, context_dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(context_dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(context_dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(linear.weight, mean=0.0, std=out_std if linear is self.wo else std)

    def forward(
        self, x_B_N_D: torch.Tensor, context_B_L_C: torch.Tensor, mask_B_L: torch.Tensor | None
    ) -> torch.Tensor:
        B, N, _ = x_B_N_D.shape
        L = context_B_L_C.shape[1]
        q = self.wq(x_B_N_D).view(B, N, -1, self.head_dim).transpose(1, 2)
        k = self.wk(context_B_L_C).view(B, L, -1, self.head_dim).transpose(1, 2)
        v = self.wv(context_B_L_C).view(B, L, -1, self.head_dim).transpose(1, 2)
        mask = None if mask_B_L is None else mask_B_L[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(B, N, -1))


class ARBlock(nn.Module):
    def __init__(self, cfg: ARConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads)
        if cfg.cross_attention:
            self.cross_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.cross_attention = CrossAttention(cfg.dim, cfg.text.dim, cfg.n_heads, cfg.n_kv_heads)
        else:
            self.cross_attention_norm = self.cross_attention = None
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden_dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)
        if self.cross_attention is not None:
            self.cross_attention_norm.reset_parameters()
            self.cross_attention.init_weights(std, out_std)

    def forward(
        self,
        x_B_N_D: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        x = x_B_N_D + self.attention(
            self.attention_norm(x_B_N_D), rope, kv_cache=kv_cache, layer=self.layer_id
        )
        if self.cross_attention is not None:
            x = x + self.cross_attention(self.cross_attention_norm(x), context, context_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class ARWorldModel(nn.Module):
    """``forward(tokens_B_N, grid=(T, H, W), context=, context_mask=, kv_cache=, start=) -> logits_B_N_V``.

    ``tokens_B_N``: FSQ indices of the grid's tokens ``start .. start + N - 1`` (time-major); the
    logits at ``i`` predict token ``start + i + 1``. ``context_B_L_D``/``context_mask_B_L``: text
    embeddings (:meth:`encode_text`), required with ``cross_attention``. ``kv_cache``
    (:meth:`new_kv_cache`): the tokens continue the cached ones (``start`` defaults to its length).

    Under sequence parallelism (``self.sp``) and without a KV cache, ``tokens_B_N`` is this rank's
    part (``SequenceParallel.shard``) of the grid's tokens ``start .. start + N * sp - 1`` and the
    logits are its part too; ``N * sp`` must be a multiple of the layout's (``SPLayout.multiple``).
    """

    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(ARBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        use_bytes = cfg.cross_attention and cfg.text.kind == "bytes"
        self.text_encoder = ByteTextEncoder(cfg.text) if use_bytes else None
        self.sp = None  # a SequenceParallel once parallelize_ar applies sequence parallelism

    def init_weights(self) -> None:
        """N(0, init_std) weights; ``wo``/``w2`` (writing into the residual) scaled by 1/sqrt(2 n_layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.reset_parameters()
        nn.init.normal_(self.output.weight, mean=0.0, std=std)
        if self.text_encoder is not None:
            self.text_encoder.init_weights()

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg.n_layers, max_len or self.cfg.max_tokens)

    def decode_step(
        self,
        token_B_1: torch.Tensor,
        cache: StaticKVCache,
        rope_table: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, V]`` after one token at ``cache.position`` (a device tensor), then the cache
        steps on. Static shapes and no host reads, so a CUDA graph can capture it (see
        :func:`~cupola.collections.world.autoregressive.sample.generate`). ``rope_table``: the whole
        grid's ``rope(grid, 0, T * H * W)``. The cache's Python ``length`` stays at the prefill's."""
        x = self.tok_embeddings(token_B_1)
        rope = tuple(t.index_select(0, cache.position) for t in rope_table)
        if context is not None:
            context = context.to(x.dtype)
        for layer in self.layers:
            x = layer(x, rope, context, context_mask, cache)
        cache.step()
        return self.output(self.norm(x))[:, -1]

    def encode_text(self, prompts: list[str], external=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context_B_L_D, mask_B_L)`` from the model's byte encoder, or ``external`` (a T5TextEncoder)."""
        encoder = self.text_encoder if self.text_encoder is not None else external
        if encoder is None:
            raise ValueError("this model reads T5 embeddings: pass the T5TextEncoder as `external`")
        return encoder(list(prompts))

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        c = self.cfg
        limits = (c.max_latent_frames, c.max_latent_height, c.max_latent_width)
        if len(grid) != 3 or any(g < 1 or g > m for g, m in zip(grid, limits, strict=True)):
            raise ValueError(
                f"latent grid {tuple(grid)} (frames, height, width) exceeds the model's "
                f"max_latent_frames/height/width = {limits}; use shorter/smaller clips or a model built for them"
            )

    def rope(
        self, grid: tuple[int, int, int], start: int, n: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[n, head_dim/2]`` of tokens ``start .. start + n - 1`` of the grid (only the
        latent frames they touch are computed)."""
        _, H, W = grid
        per_frame = H * W
        f0, f1 = start // per_frame, -(-(start + n) // per_frame)
        cos, sin = rope3d_cos_sin(
            f1 - f0, H, W, self.cfg.head_dim, theta=self.cfg.rope_theta, frame_offset=f0, device=device
        )
        rows = slice(start - f0 * per_frame, start - f0 * per_frame + n)
        return cos[rows], sin[rows]

    def forward(
        self,
        tokens_B_N: torch.Tensor,
        grid: tuple[int, int, int],
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start: int | None = None,
    ) -> torch.Tensor:
        T, H, W = grid = tuple(int(g) for g in grid)
        self.check_grid(grid)
        sp = self.sp if kv_cache is None else None
        N = tokens_B_N.shape[1] * (sp.layout.size if sp is not None else 1)  # the whole sequences' length
        if kv_cache is not None:
            if start is not None and start != kv_cache.length:
                raise ValueError(f"start={start} but the KV cache holds {kv_cache.length} tokens")
            start = kv_cache.length
        start = start or 0
        if start + N > T * H * W:
            raise ValueError(f"tokens {start}..{start + N - 1} lie outside the {T}x{H}x{W} grid")
        if (context is None) != (self.cfg.cross_attention is False):
            raise ValueError(
                "pass context (text embeddings) exactly when the model has cross_attention "
                f"(cross_attention={self.cfg.cross_attention})"
            )
        x = self.tok_embeddings(tokens_B_N)
        rope = self.rope(grid, start, N, x.device)
        if sp is not None:  # this rank's rows of the whole sequences' table
            mine = sp.positions(N, x.device)
            rope = tuple(t.index_select(0, mine) for t in rope)
        if context is not None:
            context = context.to(x.dtype)
        for layer in self.layers:
            x = layer(x, rope, context, context_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(N)
        return self.output(self.norm(x))
