"""HF Llama (``LlamaForCausalLM``) <-> cupola GPT: configs, state dicts, checkpoint folders.

The mapping is a renaming; no tensor is changed. cupola's RoPE uses the same half-split
("rotate_half") channel layout as HF transformers, so q/k rows need no permutation in either
direction. (Meta's original ``consolidated.*.pth`` checkpoints use the interleaved layout and
must first go through HF's ``convert_llama_weights_to_hf``.) Every key is accounted for: an
unknown or missing key, or a tensor of the wrong shape, is an error that names it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cupola.collections.llm.models.gpt.model import GPTConfig
from cupola.toolkit import hub
from cupola.toolkit.modules import RopeScaling, rotary_dim

__all__ = [
    "gpt_to_hf_llama_config",
    "gpt_to_hf_llama_state_dict",
    "hf_llama_config_to_gpt",
    "hf_llama_to_gpt_state_dict",
    "load_hf_llama",
    "save_hf_llama",
]

# HF name pattern -> GPT name pattern; "{i}" is the layer index.
_LAYER_KEYS = {
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
_GLOBAL_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# Buffers some older HF checkpoints saved; derived from the config, safe to drop.
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _error(what: str, field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{what}: {field}={value!r} is not supported; {allowed}")


def _hf_rope(hf_config: Mapping, what: str = "HF Llama config") -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from a transformers 4.x (``rope_theta`` + ``rope_scaling``) or 5.x
    (``rope_parameters``) config."""
    params = dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    original = int(params.get("original_max_position_embeddings", hf_config["max_position_embeddings"]))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=original,
        )
    elif rope_type == "linear":
        scaling = RopeScaling(kind="linear", factor=float(params["factor"]))
    elif rope_type == "yarn":
        unsupported = [
            k for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k) is not None
        ]
        if unsupported or params.get("truncate", True) is False:
            raise _error(
                what, "rope_scaling", params, "YaRN with the default attention factor and truncate=True"
            )
        scaling = RopeScaling(
            kind="yarn",
            factor=float(params["factor"]),
            beta_fast=float(params.get("beta_fast", 32.0)),
            beta_slow=float(params.get("beta_slow", 1.0)),
            original_max_position_embeddings=original,
        )
    else:
        raise _error(what, "rope_type", rope_type, "supported: 'default', 'llama3', 'linear', 'yarn'")
    return theta, scaling


def _hf_decoder_fields(hf_config: Mapping, what: str) -> dict:
    """``GPTConfig`` fields of a Llama-layout decoder (attention, norms, RoPE, embeddings), shared by
    the Llama and the MoE converters; the feed-forward fields are the caller's."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise _error(what, "head_dim", head_dim, "GPT needs head_dim == hidden_size / num_attention_heads")
    theta, scaling = _hf_rope(hf_config, what)
    return dict(
        vocab_size=hf_config["vocab_size"],
        dim=hidden,
        n_layers=hf_config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or heads,
        norm="rmsnorm",
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )


def hf_llama_config_to_gpt(hf_config: Mapping) -> GPTConfig:
    """A ``GPTConfig`` from the dict of an HF Llama ``config.json``."""
    what = "HF Llama config"
    model_type = hf_config.get("model_type", "llama")
    if model_type != "llama":
        raise _error(what, "model_type", model_type, "expected 'llama' (LlamaForCausalLM)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise _error(what, "hidden_act", hf_config["hidden_act"], "Llama MLPs are SwiGLU ('silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag, False):
            raise _error(what, flag, hf_config[flag], "GPT has no linear biases")
    cfg = GPTConfig(
        **_hf_decoder_fields(hf_config, what), ffn_hidden_size=hf_config["intermediate_size"], mlp="swiglu"
    )
    cfg.validate()
    return cfg


def gpt_to_hf_llama_config(cfg: GPTConfig) -> dict:
    """The ``config.json`` dict of the equivalent ``LlamaForCausalLM`` (readable by transformers 4.x and 5.x)."""
    cfg.validate()
    what = "GPTConfig -> HF Llama"
    if cfg.mlp != "swiglu":
        raise _error(what, "mlp", cfg.mlp, "Llama needs 'swiglu'")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_hf_decoder_config(cfg, what, "Llama"),
        "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": "silu",
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def _hf_decoder_config(cfg: GPTConfig, what: str, family: str) -> dict:
    """``config.json`` entries of a Llama-layout decoder (attention, norms, RoPE, embeddings), shared
    by the Llama and the MoE converters; the feed-forward entries are the caller's."""
    if cfg.norm != "rmsnorm":
        raise _error(what, "norm", cfg.norm, f"{family} needs 'rmsnorm'")
    if cfg.rotary_percent != 1.0:
        raise _error(what, "rotary_percent", cfg.rotary_percent, f"{family} rotates every channel (1.0)")
    rope_scaling, theta = None, cfg.rope_theta
    sc = cfg.rope_scaling
    if sc is not None and sc.kind == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": sc.factor,
            "low_freq_factor": sc.low_freq_factor,
            "high_freq_factor": sc.high_freq_factor,
            "original_max_position_embeddings": sc.original_max_position_embeddings,
        }
    elif sc is not None and sc.kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": sc.factor}
    elif sc is not None and sc.kind == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": sc.factor,
            "beta_fast": sc.beta_fast,
            "beta_slow": sc.beta_slow,
            "original_max_position_embeddings": sc.original_max_position_embeddings,
        }
    elif sc is not None and sc.kind == "ntk":  # static NTK-aware scaling is exactly a larger base
        d = rotary_dim(cfg.head_dim, cfg.rotary_percent)
        theta = cfg.rope_theta * sc.factor ** (d / (d - 2))
    elif sc is not None:
        raise _error(what, "rope_scaling.kind", sc.kind, "exportable: 'llama3', 'linear', 'yarn', 'ntk'")
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 4.x reads rope_theta + rope_scaling; 5.x reads rope_parameters (and the 4.x keys).
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def _key_map(cfg: GPTConfig, layer_keys: Mapping[str, str] = _LAYER_KEYS) -> dict[str, str]:
    """HF key -> GPT key for every tensor of the model (``lm_head.weight`` included even when tied)."""
    mapping = dict(_GLOBAL_KEYS)
    for i in range(cfg.n_layers):
        mapping.update({hf.format(i=i): gpt.format(i=i) for hf, gpt in layer_keys.items()})
    return mapping


def _gpt_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = {
        "attention.wq.weight": (cfg.dim, cfg.dim),
        "attention.wk.weight": (kv, cfg.dim),
        "attention.wv.weight": (kv, cfg.dim),
        "attention.wo.weight": (cfg.dim, cfg.dim),
        "feed_forward.w1.weight": (cfg.ffn_hidden_size, cfg.dim),
        "feed_forward.w3.weight": (cfg.ffn_hidden_size, cfg.dim),
        "feed_forward.w2.weight": (cfg.dim, cfg.ffn_hidden_size),
        "attention_norm.weight": (cfg.dim,),
        "ffn_norm.weight": (cfg.dim,),
    }
    shapes = {f"layers.{i}.{k}": v for i in range(cfg.n_layers) for k, v in per_layer.items()}
    shapes |= {
        "tok_embeddings.weight": (cfg.vocab_size, cfg.dim),
        "norm.weight": (cfg.dim,),
        "output.weight": (cfg.vocab_size, cfg.dim),
    }
    return shapes


def _check_keys(direction: str, given: set[str], expected: set[str], optional: set[str]) -> None:
    unknown = sorted(given - expected - optional)
    missing = sorted(expected - given)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unknown:
            parts.append(f"unknown keys {unknown}")
        raise KeyError(f"{direction}: {'; '.join(parts)}")


def _check_shape(direction: str, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{direction}: {key} has shape {tuple(tensor.shape)}, the config expects {shape}")


def hf_llama_to_gpt_state_dict(sd: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename an HF Llama state dict to GPT names (tensors are shared, not copied).

    With tied embeddings ``lm_head.weight`` may be absent (HF drops it on save); the result then
    holds ``output.weight`` as the same tensor as ``tok_embeddings.weight``, as ``GPT.state_dict()`` does.
    """
    direction = "HF Llama -> GPT"
    mapping = _key_map(cfg)
    given = {k for k in sd if not _IGNORED_HF.match(k)}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    _check_keys(direction, given, set(mapping) - optional, optional)
    shapes = _gpt_shapes(cfg)
    out = {}
    for hf_key, gpt_key in mapping.items():
        if hf_key in optional:
            continue
        _check_shape(direction, hf_key, sd[hf_key], shapes[gpt_key])
        out[gpt_key] = sd[hf_key]
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def gpt_to_hf_llama_state_dict(sd: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename a GPT state dict to HF Llama names; with tied embeddings ``lm_head.weight`` is left out."""
    direction = "GPT -> HF Llama"
    gpt_to_hf_llama_config(cfg)  # fails early if the architecture is not Llama's
    mapping = {gpt: hf for hf, gpt in _key_map(cfg).items()}
    optional = {"output.weight"} if cfg.tie_embeddings else set()
    _check_keys(direction, set(sd), set(mapping) - optional, optional)
    shapes = _gpt_shapes(cfg)
    out = {}
    for gpt_key, hf_key in mapping.items():
        if gpt_key in optional:
            continue
        _check_shape(direction, gpt_key, sd[gpt_key], shapes[gpt_key])
        out[hf_key] = sd[gpt_key]
    return out


def load_hf_llama(path_or_repo_id: str | os.PathLike[str]) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """``(cfg, state_dict)`` for ``GPT(cfg).load_state_dict(state_dict)`` from an HF Llama folder or cached repo id."""
    folder = hub.resolve_checkpoint_dir(path_or_repo_id)
    cfg = hf_llama_config_to_gpt(hub.read_config(folder))
    return cfg, hf_llama_to_gpt_state_dict(hub.load_state_dict(folder), cfg)


# Module wrappers that parallelize_gpt may insert (torch.compile, activation checkpointing).
_WRAPPER_SEGMENT = re.compile(r"(?<![^.])(?:_orig_mod|_checkpoint_wrapped_module)\.")


def _full_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain tensors under the model's own names; DTensors (FSDP/TP) are gathered, so every rank must call this."""
    from torch.distributed.tensor import DTensor

    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    return {
        _WRAPPER_SEGMENT.sub("", k): v.full_tensor() if isinstance(v, DTensor) else v for k, v in sd.items()
    }


def save_hf_llama(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    cfg: GPTConfig,
    out_dir: str | os.PathLike[str],
    max_shard_size: int = 5 * 2**30,
) -> Path:
    """Write an HF Llama checkpoint folder (``config.json`` + safetensors) that ``from_pretrained`` loads.

    Sharded models (DTensor parameters) are gathered first; call it on every rank, rank 0 writes.
    """
    import torch.distributed as dist

    hf_sd = gpt_to_hf_llama_state_dict(_full_state_dict(model_or_state_dict), cfg)
    config = gpt_to_hf_llama_config(cfg)
    dtype = str(hf_sd["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5.x / 4.x names
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return Path(out_dir)
    return hub.save_checkpoint(out_dir, hf_sd, config, max_shard_size=max_shard_size)
