"""Answers from a VILA model for image/video + text prompts: the chat template's prompt with media
placeholders, one prefill over the text and visual tokens into a KV cache, then greedy or top-p
decoding one token at a time (:func:`cupola.collections.llm.generate.decode`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cupola.collections.llm.generate import decode
from cupola.collections.vlm.models.vila import VILA, VILAConfig

__all__ = ["chat", "load_vlm", "media_pixels"]


def load_vlm(path: str | Path, device: str | torch.device = "cpu") -> tuple[VILA, dict[str, Any]]:
    """A trained VILA model (eval mode, fp32) and its run config from a cupola VLM run or checkpoint folder."""
    from omegaconf import OmegaConf

    from cupola.collections.llm.api import resolve_run_checkpoint
    from cupola.toolkit.config import from_dict
    from cupola.toolkit.modules.lora import merge_lora_weights
    from cupola.toolkit.training.checkpoint import load_model_weights

    ckpt = resolve_run_checkpoint(path)
    run_config = OmegaConf.to_container(OmegaConf.load(ckpt.parent.parent / "config.yaml"))
    if "trainable" not in run_config:
        raise ValueError(f"{path} is not a cupola VLM run (its config.yaml has no VLM stage); give a VLM run")
    config = from_dict(VILAConfig, run_config["model"])
    model = VILA(config)
    # a LoRA stage's adapters are merged: the plain model computes what the adapted one did
    weights = merge_lora_weights({k.removeprefix("model."): v for k, v in load_model_weights(ckpt).items()})
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), run_config


def media_pixels(
    cfg: VILAConfig, *, video: str | Path | None = None, image: str | Path | None = None, num_frames: int = 8
) -> tuple[torch.Tensor, str]:
    """Pixels ``[F, 3, S, S]`` of a video (``num_frames`` sampled uniformly) or an image, and the
    marker (``<video>`` / ``<image>``) that stands for them in a prompt."""
    from cupola.toolkit.data.video import read_frames, read_image, to_pixels

    if (video is None) == (image is None):
        raise ValueError("give exactly one of video= or image=")
    if video is not None:
        frames = read_frames(video, num_frames=num_frames)
        return to_pixels(frames, cfg.vision.image_size), "<video>"
    return to_pixels(read_image(image)[None], cfg.vision.image_size), "<image>"


@torch.no_grad()
def chat(
    model: VILA,
    tokenizer: Any,
    question: str,
    pixels_F_3_S_S: torch.Tensor | None = None,
    marker: str = "<video>",
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The model's answer to ``question`` about the frames (``marker`` is prepended when the question
    does not contain it). Greedy by default; ``temperature > 0`` samples with nucleus ``top_p``."""
    from cupola.collections.vlm.data.conversations import prompt_ids

    device = next(model.parameters()).device
    frames = 0 if pixels_F_3_S_S is None else pixels_F_3_S_S.shape[0]
    if frames and marker not in question:
        question = f"{marker}\n{question}"
    ids = prompt_ids(
        tokenizer,
        question,
        media_frames=[frames] if frames else [],
        tokens_per_frame=model.cfg.tokens_per_frame,
        media_token_id=model.cfg.media_token_id,
    )
    tokens = torch.tensor([ids], device=device)
    media = None if pixels_F_3_S_S is None else pixels_F_3_S_S.to(device)
    prompt = model.embed(tokens, media)
    new = decode(
        model.llm,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        seed=seed,
    )
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id])
