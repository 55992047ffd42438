"""Tokenizer checkpoints in Hugging Face formats → :class:`VideoTokenizer`.

diffusers' ``AutoencoderKLCosmos`` (the Cosmos-1.0 continuous tokenizers in diffusers layout: a
folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``, or a pipeline folder with
it under ``vae/``) maps one to one onto cupola's module tree; the attention projections, 1x1x1
convolutions there, are linear layers here. Loading is strict: a missing or unexpected tensor is an
error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cupola.collections.world.tokenizers.model import TokenizerConfig, VideoTokenizer
from cupola.toolkit.hub import load_state_dict, read_config, resolve_checkpoint_dir

__all__ = ["diffusers_config", "from_diffusers_state_dict", "load_diffusers_tokenizer"]

DIFFUSERS_CLASS = "AutoencoderKLCosmos"

# (diffusers name pattern, cupola name), applied in order to each key
_RENAMES = [
    (r"^quant_conv\.", "quant."),
    (r"^post_quant_conv\.", "post_quant."),
    (r"\.conv_in\.", ".stem."),
    (r"\.conv_out\.", ".head."),
    (r"\.conv_s\.", ".spatial."),
    (r"\.conv_t\.", ".temporal."),
    (r"\.norm(\d?|_out)\.norm\.", r".norm\1."),
    (r"\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", r".stages.\2.layers.\3.res."),
    (r"\.(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.", r".stages.\2.layers.\3.space."),
    (r"\.(down|up)_blocks\.(\d+)\.temp_attentions\.(\d+)\.", r".stages.\2.layers.\3.time."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.conv1\.", r".stages.\1.resample.space."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.conv2\.", r".stages.\1.resample.time."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.conv1\.", r".stages.\1.resample.time."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.conv2\.", r".stages.\1.resample.space."),
    (r"\.(down|up)samplers\.0\.conv3\.", ".resample.mix."),
    (r"\.(down|up)_blocks\.(\d+)\.resample\.", r".stages.\2.resample."),
    (r"\.mid_block\.resnets\.(\d)\.", r".mid.res\1."),
    (r"\.mid_block\.attentions\.0\.", ".mid.space."),
    (r"\.mid_block\.temp_attentions\.0\.", ".mid.time."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj."),
]


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def diffusers_config(config: dict) -> TokenizerConfig:
    """A :class:`TokenizerConfig` from an ``AutoencoderKLCosmos`` ``config.json``."""
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ValueError(
            f"config.json describes a {config['_class_name']!r}, not a diffusers {DIFFUSERS_CLASS}"
        )
    if config.get("in_channels", 3) != 3 or config.get("out_channels", 3) != 3:
        raise ValueError("only RGB tokenizers (in_channels = out_channels = 3) are supported")
    extra = {
        k: config[k] for k in ("latents_mean", "latents_std", "scaling_factor") if config.get(k) is not None
    }
    cfg = TokenizerConfig(
        temporal_compression=config.get("temporal_compression_ratio", 8),
        spatial_compression=config.get("spatial_compression_ratio", 8),
        latent_channels=config.get("latent_channels", 16),
        encoder_channels=tuple(config.get("encoder_block_out_channels", (128, 256, 512, 512))),
        decoder_channels=tuple(config.get("decode_block_out_channels", (256, 512, 512, 512))),
        num_res_blocks=config.get("num_layers", 2),
        attention_resolutions=tuple(config.get("attention_resolutions", (32,))),
        resolution=config.get("resolution", 1024),
        patch_size=config.get("patch_size", 4),
        patch_method=config.get("patch_type", "haar"),
        extra={"source": DIFFUSERS_CLASS, **extra},
    )
    cfg.validate()
    return cfg


def from_diffusers_state_dict(cfg: TokenizerConfig, state_dict: dict[str, torch.Tensor]) -> VideoTokenizer:
    """A :class:`VideoTokenizer` holding an ``AutoencoderKLCosmos`` state dict's weights (strict), in
    their dtype."""
    model = VideoTokenizer(cfg).to(next(iter(state_dict.values())).dtype)
    expected = model.state_dict()
    weights = {}
    for key, tensor in state_dict.items():
        name = _rename(key)
        if name not in expected:
            raise ValueError(f"diffusers tensor {key!r} (as {name!r}) has no place in a cupola tokenizer")
        weights[name] = tensor.reshape(expected[name].shape)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"the diffusers checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    model.load_state_dict(weights, strict=True)
    return model


def load_diffusers_tokenizer(path: str | Path) -> VideoTokenizer:
    """A tokenizer from a local diffusers folder (or a pipeline folder with ``vae/``, or a repo id
    already in the local Hugging Face cache); fp32, eval mode."""
    folder = resolve_checkpoint_dir(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    cfg = diffusers_config(read_config(folder))
    state = load_state_dict(folder, stem="diffusion_pytorch_model")
    return from_diffusers_state_dict(cfg, {k: v.float() for k, v in state.items()}).eval()
