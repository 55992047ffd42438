"""HF SigLIP vision tower (``SiglipVisionModel``) <-> cupola :class:`VisionTower`: configs, state
dicts, checkpoint folders.

The mapping is a renaming; no tensor is changed (both sides hold ``nn.Linear`` weights as
``[out, in]`` and the patch embedding as a ``[dim, C, p, p]`` convolution):

    embeddings.patch_embedding.{weight,bias}           patch_embed.{weight,bias}
    embeddings.position_embedding.weight               pos_embed.weight
    encoder.layers.{i}.layer_norm1.{weight,bias}       layers.{i}.attention_norm.{weight,bias}
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*    layers.{i}.attention.{wq,wk,wv,wo}.*
    encoder.layers.{i}.layer_norm2.{weight,bias}       layers.{i}.ffn_norm.{weight,bias}
    encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}     layers.{i}.feed_forward.{fc1,fc2}.{weight,bias}
    post_layernorm.{weight,bias}                       post_layernorm.{weight,bias}

HF names carry a ``vision_model.`` prefix in checkpoint files written by transformers 4.x and in
full ``SiglipModel`` checkpoints (google/siglip-*); transformers 5.x's ``SiglipVisionModel`` holds
and saves them without it. Both layouts are read; :func:`vision_state_dict_to_hf` writes the
prefixed one, which both major versions load.

Dropped on import, by name: the attention-pooling ``head.*`` (SigLIP's contrastive image embedding;
a VLM reads patch features), the ``embeddings.position_ids`` buffer older files saved, and in a
full ``SiglipModel`` the ``text_model.*`` tower and ``logit_scale``/``logit_bias``. Every other key is
accounted for: an unknown or missing tensor, or one of the wrong shape, is an error that names it.
Nothing here downloads.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from cupola.collections.vlm.models.vision import VisionConfig, VisionTower
from cupola.toolkit import hub
from cupola.toolkit.config import ConfigError

if TYPE_CHECKING:
    from cupola.toolkit.training.weights import SliceSource

__all__ = [
    "load_siglip_vision",
    "siglip_vision_sources",
    "vision_config_from_hf",
    "vision_config_to_hf",
    "vision_state_dict_from_hf",
    "vision_state_dict_to_hf",
]


class _Shaped(Protocol):
    shape: torch.Size


T = TypeVar("T", bound=_Shaped)  # a tensor, or a lazy weight source (anything with .shape)

HF_PREFIX = "vision_model."
# SiglipVisionConfig's defaults: config.json files of full SiglipModels leave out the ones they keep.
_HF_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# Both are GELU with the tanh approximation (gelu_new computes the same formula by hand).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")

_LAYER_KEYS = {
    "encoder.layers.{i}.layer_norm1.{p}": "layers.{i}.attention_norm.{p}",
    "encoder.layers.{i}.self_attn.q_proj.{p}": "layers.{i}.attention.wq.{p}",
    "encoder.layers.{i}.self_attn.k_proj.{p}": "layers.{i}.attention.wk.{p}",
    "encoder.layers.{i}.self_attn.v_proj.{p}": "layers.{i}.attention.wv.{p}",
    "encoder.layers.{i}.self_attn.out_proj.{p}": "layers.{i}.attention.wo.{p}",
    "encoder.layers.{i}.layer_norm2.{p}": "layers.{i}.ffn_norm.{p}",
    "encoder.layers.{i}.mlp.fc1.{p}": "layers.{i}.feed_forward.fc1.{p}",
    "encoder.layers.{i}.mlp.fc2.{p}": "layers.{i}.feed_forward.fc2.{p}",
}
_GLOBAL_KEYS = {
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.patch_embedding.bias": "patch_embed.bias",
    "embeddings.position_embedding.weight": "pos_embed.weight",
    "post_layernorm.weight": "post_layernorm.weight",
    "post_layernorm.bias": "post_layernorm.bias",
}
_DROPPED_HF = re.compile(
    r"^(?:(?:vision_model\.)?(?:head\..*|embeddings\.position_ids)|text_model\..*|logit_scale|logit_bias)$"
)


def _error(field: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"HF SigLIP vision config: {field}={value!r} is not supported; {allowed}")


def _square(field: str, value: Any) -> int:
    """An int from HF's ``int | [h, w]`` image/patch sizes; only square ones map to VisionConfig."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _error(field, value, "only square sizes (an int or [s, s]) are supported")
        value = value[0]
    return int(value)


def vision_config_from_hf(hf_config: Mapping[str, Any] | Any, *, select_layer: int = -2) -> VisionConfig:
    """A :class:`VisionConfig` from a transformers ``SiglipVisionConfig`` (object or dict), or from a
    full ``SiglipConfig`` (its ``vision_config`` is read). ``select_layer`` is the VLM's choice (VILA:
    -2); HF configs do not hold it."""
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if config.get("vision_config") is not None:  # a full SiglipConfig (vision + text towers)
        vision = config["vision_config"]
        config = vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)
    model_type = config.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise _error(
            "model_type",
            model_type,
            "expected 'siglip_vision_model' (or a 'siglip' config with vision_config)",
        )
    config = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if config["hidden_act"] not in _TANH_GELU:
        raise _error("hidden_act", config["hidden_act"], f"the vision MLP is GELU-tanh, one of {_TANH_GELU}")
    cfg = VisionConfig(
        image_size=_square("image_size", config["image_size"]),
        patch_size=_square("patch_size", config["patch_size"]),
        num_channels=int(config["num_channels"]),
        dim=int(config["hidden_size"]),
        n_layers=int(config["num_hidden_layers"]),
        n_heads=int(config["num_attention_heads"]),
        mlp_hidden_size=int(config["intermediate_size"]),
        layer_norm_eps=float(config["layer_norm_eps"]),
        select_layer=select_layer,
    )
    cfg.validate()
    return cfg


def vision_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """The ``config.json`` dict of the equivalent ``SiglipVisionModel``, without the pooling head
    (``vision_use_head: false``: :func:`vision_state_dict_to_hf` has no ``head.*`` tensors)."""
    cfg.validate()
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": False,
    }


def _key_map(cfg: VisionConfig) -> dict[str, str]:
    """HF key (unprefixed) -> cupola key, for every tensor of the tower."""
    mapping = dict(_GLOBAL_KEYS)
    for i in range(cfg.n_layers):
        for p in ("weight", "bias"):
            mapping.update({hf.format(i=i, p=p): ours.format(i=i, p=p) for hf, ours in _LAYER_KEYS.items()})
    return mapping


def _shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, h = cfg.dim, cfg.mlp_hidden_size
    per_layer = {
        "attention_norm.weight": (d,),
        "attention_norm.bias": (d,),
        "ffn_norm.weight": (d,),
        "ffn_norm.bias": (d,),
        "feed_forward.fc1.weight": (h, d),
        "feed_forward.fc1.bias": (h,),
        "feed_forward.fc2.weight": (d, h),
        "feed_forward.fc2.bias": (d,),
    }
    for w in ("wq", "wk", "wv", "wo"):
        per_layer |= {f"attention.{w}.weight": (d, d), f"attention.{w}.bias": (d,)}
    shapes = {f"layers.{i}.{k}": v for i in range(cfg.n_layers) for k, v in per_layer.items()}
    return shapes | {
        "patch_embed.weight": (d, cfg.num_channels, cfg.patch_size, cfg.patch_size),
        "patch_embed.bias": (d,),
        "pos_embed.weight": (cfg.num_patches, d),
        "post_layernorm.weight": (d,),
        "post_layernorm.bias": (d,),
    }


def _check_keys(direction: str, given: set[str], expected: set[str]) -> None:
    missing, unknown = sorted(expected - given), sorted(given - expected)
    if missing or unknown:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unknown keys {unknown}"] if unknown else []
        raise KeyError(f"{direction}: {'; '.join(parts)}")


def _check_shape(direction: str, key: str, value: _Shaped, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{direction}: {key} has shape {tuple(value.shape)}, the config expects {shape}")


def vision_state_dict_from_hf(hf_sd: Mapping[str, T], cfg: VisionConfig) -> dict[str, T]:
    """Rename an HF SigLIP state dict to :class:`VisionTower` names (values are passed through, not
    copied: tensors or lazy weight sources).

    Reads ``SiglipVisionModel`` keys with or without the ``vision_model.`` prefix, and full
    ``SiglipModel`` state dicts; drops the pooling head and the other unused tensors listed in the
    module docstring. Every layer and ``post_layernorm`` is kept, whatever ``select_layer`` is.
    """
    direction = "HF SigLIP -> VisionTower"
    kept = {k: v for k, v in hf_sd.items() if not _DROPPED_HF.match(k)}
    prefixed = any(k.startswith(HF_PREFIX) for k in kept)
    prefix = HF_PREFIX if prefixed else ""
    mapping = {prefix + hf: ours for hf, ours in _key_map(cfg).items()}
    _check_keys(direction, set(kept), set(mapping))
    shapes = _shapes(cfg)
    out = {}
    for hf_key, key in mapping.items():
        _check_shape(direction, hf_key, kept[hf_key], shapes[key])
        out[key] = kept[hf_key]
    return out


def vision_state_dict_to_hf(
    sd: Mapping[str, T], cfg: VisionConfig, *, prefix: str = HF_PREFIX
) -> dict[str, T]:
    """Rename a :class:`VisionTower` state dict to HF ``SiglipVisionModel`` names (no pooling head).

    ``prefix="vision_model."`` (default) is the checkpoint-file layout transformers 4.x and 5.x both
    load; ``prefix=""`` matches a transformers 5.x ``SiglipVisionModel.state_dict()``.
    """
    direction = "VisionTower -> HF SigLIP"
    mapping = {ours: prefix + hf for hf, ours in _key_map(cfg).items()}
    _check_keys(direction, set(sd), set(mapping))
    shapes = _shapes(cfg)
    out = {}
    for key, hf_key in mapping.items():
        _check_shape(direction, key, sd[key], shapes[key])
        out[hf_key] = sd[key]
    return out


def _checkpoint_config(folder: os.PathLike[str], select_layer: int) -> VisionConfig:
    try:
        return vision_config_from_hf(hub.read_config(folder), select_layer=select_layer)
    except ConfigError as e:
        raise ConfigError(f"{folder}/config.json: {e}") from e


def load_siglip_vision(path_or_repo_id: str | os.PathLike[str], *, select_layer: int = -2) -> VisionTower:
    """A :class:`VisionTower` holding the weights of a local HF SigLIP folder (``config.json`` +
    safetensors of a ``SiglipVisionModel`` or a full ``SiglipModel``), or of a repo id already in the
    local HF cache. Never downloads: a missing checkpoint is an error that says how to fetch it.

    The tensors keep the checkpoint's dtype; move or cast the tower afterwards.
    """
    folder = hub.resolve_checkpoint_dir(path_or_repo_id)
    cfg = _checkpoint_config(folder, select_layer)
    sd = vision_state_dict_from_hf(hub.load_state_dict(folder), cfg)
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower.load_state_dict(sd, strict=True, assign=True)
    return tower


def siglip_vision_sources(
    path_or_repo_id: str | os.PathLike[str], cfg: VisionConfig
) -> dict[str, SliceSource]:
    """Lazy :class:`VisionTower` weight sources (``cupola.toolkit.training.weights``) from a local HF
    SigLIP folder or cached repo id, for loading straight into a sharded model. The checkpoint's
    architecture must equal ``cfg``'s (``select_layer`` aside: it is the VLM's choice)."""
    from cupola.toolkit.training.weights import safetensors_sources

    folder = hub.resolve_checkpoint_dir(path_or_repo_id)
    found = _checkpoint_config(folder, cfg.select_layer)
    mismatched = {
        f.name: (getattr(found, f.name), getattr(cfg, f.name))
        for f in dataclasses.fields(VisionConfig)
        if getattr(found, f.name) != getattr(cfg, f.name)
    }
    if mismatched:
        raise ConfigError(
            f"{path_or_repo_id!r} holds a SigLIP vision tower that differs from the model's vision config; "
            f"fields (checkpoint, config): {mismatched}. Set those model.vision.* overrides or pick the "
            "matching flavor"
        )
    return vision_state_dict_from_hf(safetensors_sources(folder), cfg)
