"""Where a tokenizer's weights come from: a cupola tokenizer run (its newest checkpoint) or a
Hugging Face diffusers ``AutoencoderKLCosmos`` folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cupola.collections.world.tokenizers.model import TokenizerConfig, VideoTokenizer
from cupola.toolkit.config import ConfigError
from cupola.toolkit.training.weights import SliceSource, TensorSource

__all__ = ["load_tokenizer", "tokenizer_sources"]

_STRUCTURE = [f.name for f in dataclasses.fields(TokenizerConfig) if f.name != "extra"]


def _run_config(ckpt: Path) -> TokenizerConfig:
    from omegaconf import OmegaConf

    from cupola.toolkit.config import from_dict

    config = OmegaConf.to_container(OmegaConf.load(ckpt.parent.parent / "config.yaml"))
    if "loss" not in config or "model" not in config:
        raise ConfigError(
            f"{ckpt.parent.parent} is not a cupola tokenizer run (its config.yaml has no tokenizer loss)"
        )
    return from_dict(TokenizerConfig, config["model"])


def _same(a: TokenizerConfig, b: TokenizerConfig) -> list[str]:
    return [n for n in _STRUCTURE if _norm(getattr(a, n)) != _norm(getattr(b, n))]


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


def _cupola_weights(path: str) -> tuple[TokenizerConfig, dict[str, torch.Tensor]] | None:
    """The config and tokenizer weights of a cupola tokenizer run/checkpoint, or None if it is not one."""
    from cupola.collections.llm.lightning import run_checkpoint
    from cupola.toolkit.training.checkpoint import load_model_weights

    ckpt = run_checkpoint(path)
    if ckpt is None:
        return None
    # the tokenizer's weights only (an adversarial-stage run also holds its discriminator)
    weights = {
        k.removeprefix("model."): v for k, v in load_model_weights(ckpt).items() if k.startswith("model.")
    }
    weights = {
        k.removeprefix("tokenizer."): v for k, v in weights.items() if not k.startswith("discriminator.")
    }
    return _run_config(ckpt), weights


def _diffusers_tokenizer(path: str) -> VideoTokenizer:
    from cupola.collections.world.tokenizers.convert import load_diffusers_tokenizer

    try:
        return load_diffusers_tokenizer(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{path}: neither a cupola tokenizer run/checkpoint nor a diffusers AutoencoderKLCosmos folder ({e})"
        ) from e


def _weights(path: str) -> tuple[TokenizerConfig, dict[str, torch.Tensor]]:
    found = _cupola_weights(path)
    if found is not None:
        return found
    model = _diffusers_tokenizer(path)
    return model.cfg, model.state_dict()


def tokenizer_sources(init_from: str, config: TokenizerConfig) -> dict[str, SliceSource]:
    """The weights of ``init_from`` for a model of ``config`` (their structures must agree)."""
    found, weights = _weights(init_from)
    differ = _same(found, config)
    if differ:
        raise ConfigError(
            f"init_from={init_from!r} holds a tokenizer that differs from model= in "
            + ", ".join(f"{n} ({getattr(found, n)} there, {getattr(config, n)} here)" for n in differ)
        )
    return {k: TensorSource(v) for k, v in weights.items()}


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VideoTokenizer:
    """A trained tokenizer (eval mode, fp32) from a cupola run/checkpoint or a diffusers folder."""
    found = _cupola_weights(str(path))
    if found is None:  # a diffusers folder: converted straight into a model
        return _diffusers_tokenizer(str(path)).to(device)
    cfg, weights = found
    model = VideoTokenizer(cfg)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.to(device).eval()
