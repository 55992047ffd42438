"""Answers from a VILA model for image/video + text prompts: the chat template's prompt with media
placeholders, one prefill over the text and visual tokens into a KV cache, then greedy or top-p
decoding one token at a time (:func:`cupola.collections.llm.generate.decode`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cupola.collections.llm.generate import decode
from cupola.collections.vlm.models.vila import VILA, VILAConfig

__all__ = ["chat", "load_vlm", "media_frames", "media_pixels"]


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


def media_frames(
    *, video: str | Path | None = None, image: str | Path | None = None, num_frames: int = 8
) -> int:
    """How many frames :func:`media_pixels` gives for this media (1 for an image), without decoding."""
    from cupola.toolkit.data.video import image_info, sample_indices, video_info

    if (video is None) == (image is None):
        raise ValueError("give exactly one of video= or image=")
    if image is not None:
        image_info(image)
        return 1
    info = video_info(video)
    return len(sample_indices(info.frames, info.fps, num_frames=num_frames))


def media_pixels(
    cfg: VILAConfig,
    *,
    video: str | Path | None = None,
    image: str | Path | None = None,
    num_frames: int = 8,
    part: slice | None = None,
) -> tuple[torch.Tensor, str]:
    """Pixels ``[F, 3, S, S]`` of a video (``num_frames`` sampled uniformly) or an image, and the
    marker (``<video>`` / ``<image>``) that stands for them in a prompt.

    ``part``: decode only these of the frames — a sequence-parallel rank's share
    (``media_share(media_frames(...), sp_size, sp_rank)``): MM-SP's first stage starts at the decoder."""
    from cupola.toolkit.data.video import read_frames, read_image, to_pixels

    if (video is None) == (image is None):
        raise ValueError("give exactly one of video= or image=")
    if video is not None:
        size = (cfg.vision.image_size,) * 2
        frames = read_frames(video, num_frames=num_frames, size=size, part=part)
        return to_pixels(frames, cfg.vision.image_size), "<video>"
    pixels = to_pixels(read_image(image)[None], cfg.vision.image_size)
    return (pixels if part is None else pixels[part]), "<image>"


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
    sp=None,
    frames: int | None = None,
) -> str:
    """The model's answer to ``question`` about the frames (``marker`` is prepended when the question
    does not contain it). Greedy by default; ``temperature > 0`` samples with nucleus ``top_p``.

    Sequence-parallel (``sp``; ``model.llm`` set up by ``apply_sp``; call on every rank):
    ``pixels`` is this rank's share of the media's ``frames`` frames (:func:`media_pixels` with
    ``part=media_share(frames, sp.layout.size, sp.rank)``). The prompt is prefilled across the ranks by two-stage sharding, its
    KV cache stays sharded, and every rank returns the same answer."""
    from cupola.collections.vlm.data.conversations import prompt_ids

    device = next(model.parameters()).device
    mine = 0 if pixels_F_3_S_S is None else pixels_F_3_S_S.shape[0]
    if sp is None:
        frames = mine
    elif frames is None:
        raise ValueError("chat(sp=...) needs frames=: the media's whole frame count (pixels are a share)")
    if frames and marker not in question:
        question = f"{marker}\n{question}"
    ids = prompt_ids(
        tokenizer,
        question,
        media_frames=[frames] if frames else [],
        tokens_per_frame=model.cfg.tokens_per_frame,
        media_token_id=model.cfg.media_token_id,
    )
    media = None if pixels_F_3_S_S is None or not frames else pixels_F_3_S_S.to(device)
    options = {
        "temperature": temperature,
        "top_p": top_p,
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "seed": seed,
    }
    if sp is None:
        prompt = model.embed(torch.tensor([ids], device=device), media)
        new = decode(model.llm, prompt, max_new_tokens, **options)
    else:  # pad to split evenly; the padding's keys are never kept (SequenceParallelKVCache)
        padded = ids + [tokenizer.eos_id] * (-len(ids) % sp.layout.multiple)
        mine_pixels = media if media is not None and mine else None
        prompt = model.embed_sequence_parallel(torch.tensor([padded], device=device), mine_pixels, sp)
        new = decode(model.llm, prompt, max_new_tokens, sp=sp, prompt_len=len(ids), **options)
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id])
