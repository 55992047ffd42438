"""GPT decoder: pre-norm transformer blocks with RoPE, grouped-query attention and a SwiGLU or
squared-ReLU MLP. Covers Llama 3 / 3.2 and Nemotron-4 checkpoints.

Single-device code, laid out like torchtitan's llama3 (``tok_embeddings``, ``layers["i"]``,
``norm``, ``output``) so that ``parallelize_gpt`` can shard it block by block afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from cupola.toolkit.config import ConfigError, check_choice, config_error, suggest
from cupola.toolkit.modules import (
    MLPS,
    NORMS,
    Attention,
    KVCache,
    RopeScaling,
    RotaryEmbedding,
    build_mlp,
    build_norm,
    document_causal_mask,
    rotary_dim,
)
from cupola.toolkit.modules.moe import MoE, MoEConfig

__all__ = [
    "FLAVORS",
    "GPT",
    "GPTConfig",
    "RopeScaling",
    "TransformerBlock",
    "gpt_config",
    "num_flops_per_token",
    "num_matmul_params",
]


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention); filled in by validate()
    ffn_hidden_size: int
    mlp: str = "swiglu"  # "swiglu" | "squared_relu"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" | "layernorm1p" (zero-centered gamma, Nemotron)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_percent: float = 1.0  # fraction of each head's channels that rotate (Nemotron: 0.5)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEConfig | None = None  # every block's feed-forward is a Mixture-of-Experts when set

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise config_error(self, name, value, "must be an integer >= 1")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise config_error(
                self, "n_kv_heads", self.n_kv_heads, f"must be >= 1 and divide n_heads ({self.n_heads})"
            )
        if self.dim % self.n_heads:
            raise config_error(self, "dim", self.dim, f"must be divisible by n_heads ({self.n_heads})")
        check_choice(self, "mlp", self.mlp, MLPS)
        check_choice(self, "norm", self.norm, NORMS)
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise config_error(self, name, getattr(self, name), "must be > 0")
        rot = rotary_dim(self.head_dim, self.rotary_percent)
        if not 0 < self.rotary_percent <= 1 or rot == 0 or rot % 2:
            raise config_error(
                self,
                "rotary_percent",
                self.rotary_percent,
                f"must be in (0, 1] with head_dim ({self.head_dim}) * rotary_percent a positive even integer",
            )
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.moe is not None:
            self.moe.validate()


# Sizes, with the source of each number. "tiny" is for CPU tests and demos.
FLAVORS: dict[str, GPTConfig] = {
    # vocab 512 holds a byte-level tokenizer (256 bytes + specials).
    "tiny": GPTConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=192, max_seq_len=256
    ),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    # (1.24B parameters; tied embeddings; Llama 3.1 rope scaling with factor 32).
    "llama3_2_1b": GPTConfig(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_size=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        max_seq_len=131072,
        tie_embeddings=True,
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json (8.03B parameters).
    # Llama 3 8B, not 3.1: no rope scaling and an 8192 context (3.1 adds rope_scaling factor 8, 128k).
    "llama3_8b": GPTConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_size=14336,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    # Nemotron-4 15B, arXiv 2402.16819 section 2 (32 layers, 6144 hidden, 48 heads, 8 KV heads,
    # squared ReLU, no biases, untied embeddings, 256k vocab, 4096 sequence) and NeMo's
    # Nemotron4Config15B / NemotronConfig (LayerNorm with zero-centered gamma, rotary_percent 0.5,
    # rotary base 10000, init_method_std 0.0134); HF equivalent: transformers NemotronConfig defaults.
    "nemotron4_15b": GPTConfig(
        vocab_size=256000,
        dim=6144,
        n_layers=32,
        n_heads=48,
        n_kv_heads=8,
        ffn_hidden_size=24576,
        mlp="squared_relu",
        norm="layernorm1p",
        norm_eps=1e-5,
        rope_theta=10000.0,
        rotary_percent=0.5,
        max_seq_len=4096,
        init_std=0.0134,
    ),
}


def gpt_config(flavor: str, **overrides: object) -> GPTConfig:
    """A validated copy of ``FLAVORS[flavor]`` with ``overrides`` applied (``gpt_config("tiny", n_layers=4)``)."""
    if flavor not in FLAVORS:
        raise ConfigError(
            f"unknown GPT flavor {flavor!r}.{suggest(flavor, FLAVORS)} Available flavors: {', '.join(FLAVORS)}"
        )
    cfg = copy.deepcopy(FLAVORS[flavor])
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(
                f"GPTConfig: unknown field {key!r}.{suggest(key, names)} Valid fields: {', '.join(names)}"
            )
        if key == "rope_scaling" and isinstance(value, dict):
            value = RopeScaling(**value)
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def num_matmul_params(cfg: GPTConfig) -> int:
    """Weights that take part in a matmul per token: all linear layers plus the output projection.

    For a Mixture-of-Experts only the *active* weights count: the router and ``top_k`` experts.

    The input embedding is a lookup, not a matmul, so it is excluded; the output projection is
    counted even when it shares its weight with the embedding.
    """
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    attention = cfg.dim * cfg.dim * 2 + cfg.dim * kv_dim * 2  # wq, wo, wk, wv
    if cfg.moe is None:
        mlp = cfg.dim * cfg.ffn_hidden_size * (3 if cfg.mlp == "swiglu" else 2)
    else:  # active parameters only: the router and the top_k experts a token visits
        m = cfg.moe
        mlp = cfg.dim * m.num_experts + m.top_k * cfg.dim * m.expert_hidden_size * (
            3 if m.mlp == "swiglu" else 2
        )
    return cfg.n_layers * (attention + mlp) + cfg.vocab_size * cfg.dim


def num_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / torchtitan convention.

    ``6 * N + 12 * n_layers * n_heads * head_dim * seq_len``: ``N`` matmul weights (see
    :func:`num_matmul_params`; embeddings excluded) cost 2 FLOPs per weight forward and 4
    backward; attention scores and the weighted sum cost ``2 * 2 * n_heads * head_dim * seq_len``
    forward per layer, times 3 with backward. The causal mask is not discounted, and recomputation
    (activation checkpointing) is not counted: this is "model FLOPs" for MFU.
    """
    cfg.validate()
    return 6.0 * num_matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


class TransformerBlock(nn.Module):
    """``h = x + attention(norm(x)); out = h + feed_forward(norm(h))``."""

    def __init__(self, layer_id: int, cfg: GPTConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = build_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads)
        self.ffn_norm = build_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.feed_forward = (
            MoE(cfg.dim, cfg.moe) if cfg.moe is not None else build_mlp(cfg.mlp, cfg.dim, cfg.ffn_hidden_size)
        )

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)

    def forward(
        self,
        x_B_T_C: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x_B_T_C + self.attention(
            self.attention_norm(x_B_T_C),
            rope,
            mask=mask,
            kv_cache=kv_cache,
            layer=self.layer_id,
            document_ids=document_ids,
        )
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(
            cfg.head_dim,
            cfg.max_seq_len,
            theta=cfg.rope_theta,
            scaling=cfg.rope_scaling,
            rotary_percent=cfg.rotary_percent,
        )
        # A ModuleDict keyed by layer index keeps checkpoint names stable if layers are removed
        # (pipeline stages), and lets parallelize_gpt wrap blocks in place.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(cfg.n_layers)})
        self.norm = build_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.sp = None  # a SequenceParallel once parallelize_gpt applies sequence parallelism
        self._tie()
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def _tie(self) -> None:
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """(Re)initialize every parameter and the RoPE tables; deterministic given the RNG seed.

        Call after ``to_empty()`` when the model was built on the meta device. Linear and
        embedding weights are N(0, init_std); the projections that write into the residual
        stream (``wo``, ``w2``) use ``init_std / sqrt(2 * n_layers)`` (GPT-2 / Megatron scaled init).
        """
        self._tie()  # to_empty() on a plain module unties shared parameters
        self.rope.reset_buffers(buffer_device)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers.values():
            layer.init_weights(std, out_std)
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def embed(self, tokens_B_T: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, T, dim]``."""
        return self.tok_embeddings(tokens_B_T)

    def forward_embeddings(
        self,
        h_B_T_C: torch.Tensor,
        positions_B_T: torch.Tensor | None = None,
        document_ids_B_T: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        logits: bool = True,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for input embeddings (full sequence, e.g. text and image tokens mixed).

        ``positions_B_T`` gives each token's RoPE position (packed or offset sequences); default
        ``0..T-1``. Attention is causal over the whole row, or, with ``document_ids_B_T`` (packed
        samples), causal within each document only (:func:`document_causal_mask`). With
        ``kv_cache`` (:meth:`new_kv_cache`) the tokens continue the cached ones: positions default
        to ``length..length+T-1`` and the cache advances by ``T``.

        Under sequence parallelism (``self.sp``, set by ``parallelize_gpt``) every input is this
        rank's part of the sequence (``SequenceParallel.shard``) and so is the output; positions
        default to the global indices of the tokens this rank holds.

        ``logits=False`` returns the last block's hidden states ``[B, T, dim]`` instead (apply
        :meth:`head` to the rows needed: a long prompt's prefill needs one, not ``T x vocab``).
        """
        B, T = h_B_T_C.shape[:2]
        sp = self.sp if kv_cache is None else None
        if kv_cache is not None and positions_B_T is None:
            positions_B_T = kv_cache.positions(B, T, h_B_T_C.device)
        if sp is not None and positions_B_T is None:
            positions_B_T = sp.positions(T * sp.layout.size, h_B_T_C.device).expand(B, T)
        rope = self.rope(T, positions_B_T)
        if sp is not None:  # the SP attention masks documents itself, never a dense T x T mask
            mask, documents = None, document_ids_B_T
        else:
            mask = None if document_ids_B_T is None else document_causal_mask(document_ids_B_T)
            documents = None
        h = h_B_T_C
        for layer in self.layers.values():
            if kv_cache is not None:
                h = layer(h, rope, mask=mask, kv_cache=kv_cache)
            elif documents is not None:
                h = layer(h, rope, document_ids=documents)
            else:
                h = layer(h, rope, mask=mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.head(h) if logits else h

    def head(self, h_C: torch.Tensor) -> torch.Tensor:
        """Logits from last-block hidden states (final norm, then the output projection)."""
        return self.output(self.norm(h_C))

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for up to ``max_len`` (default ``max_seq_len``) tokens per sequence."""
        return KVCache(self.cfg.n_layers, max_len or self.cfg.max_seq_len)

    def forward(
        self,
        tokens_B_T: torch.Tensor,
        positions_B_T: torch.Tensor | None = None,
        document_ids_B_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_embeddings(self.embed(tokens_B_T), positions_B_T, document_ids_B_T)
