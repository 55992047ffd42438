"""Building blocks shared by the collections: norms, RoPE, attention, MLPs."""

from cupola.toolkit.modules.attention import Attention, KVCache, document_causal_mask, repeat_kv
from cupola.toolkit.modules.mlp import MLPS, SquaredReLUMLP, SwiGLU, build_mlp
from cupola.toolkit.modules.norms import NORMS, LayerNorm, RMSNorm, build_norm
from cupola.toolkit.modules.rope import (
    RopeScaling,
    RotaryEmbedding,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    rotary_dim,
)

__all__ = [
    "MLPS",
    "NORMS",
    "Attention",
    "KVCache",
    "LayerNorm",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "SquaredReLUMLP",
    "SwiGLU",
    "apply_rope",
    "build_mlp",
    "build_norm",
    "document_causal_mask",
    "repeat_kv",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotary_dim",
]
